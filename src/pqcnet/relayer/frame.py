"""The relayer's unit of work: one publisher frame, its limits, codec and shard.

A :class:`Frame` is what a publisher sends (customer, channel, seq, payload, QoS)
and what the bus stores. The bus record is a small fixed binary layout rather than
protobuf so the hot path (encode on ingress, decode in the shard worker) is a
single ``struct`` call and bus backends stay independent of ``proto/``.

Sharding is ``blake2b(len‖channel ‖ len‖customer) mod N``: stable across processes
and Python versions (unlike ``hash()``), and length-prefixed so ``("ab","c")`` and
``("a","bc")`` never collide by construction.
"""

from __future__ import annotations

import functools
import hashlib
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pqcnet.crypto.pqc import length_prefixed
from pqcnet.relayer.errors import FieldMissing, FieldTooLarge, FrameRejected

#: bus record layout version; bump when the layout changes
RECORD_VERSION = 1
_HEADER = struct.Struct(">BQBHHI")  # version, seq, qos, len(customer), len(channel), len(payload)

#: default bound on one payload: the largest message a single frame may carry
MAX_PAYLOAD = 1024 * 1024
#: bound on customer/channel ids (they become metric labels and storage keys)
MAX_ID = 128
#: QoS hints: 0 best-effort, 1 standard, 2 priority (metered separately)
MAX_QOS = 2
#: topics whose shard is remembered (the hash is most of the ingress cost per frame)
SHARD_CACHE = 65_536

Topic = tuple[str, str]
"""(customer id, channel id): the unit of ordering and deduplication."""


@dataclass(frozen=True, slots=True)
class FrameLimits:
    """Named bounds checked on every ingress frame."""

    #: bytes in one payload; bounds relayer memory per in-flight frame
    max_payload: int = MAX_PAYLOAD
    #: bytes in a customer or channel id; bounds label cardinality and key size
    max_id: int = MAX_ID


@dataclass(frozen=True, slots=True)
class Frame:
    """One published frame."""

    #: who pays for the traffic
    customer: str
    #: the customer's logical channel; ordering is per (customer, channel)
    channel: str
    #: per-topic sequence number starting at 1, strictly increasing
    seq: int
    #: opaque application bytes
    payload: bytes
    #: QoS hint (0..MAX_QOS)
    qos: int = 1

    @property
    def topic(self) -> Topic:
        """The ordering unit."""
        return (self.customer, self.channel)


_new = object.__new__


def slot_setters(cls: type, *names: str) -> tuple[Callable[[Any, Any], None], ...]:
    """The ``__set__`` of each named slot of ``cls``, for hot-path constructors.

    A frozen dataclass's ``__init__`` stores every field through
    ``object.__setattr__``, which is several times slower than the slot descriptor
    itself; :func:`make_frame` and its siblings (``wire.accepted``,
    ``sequencer.Deliver``) build the same immutable object by setting the slots
    directly. Only for classes whose ``__init__`` does nothing else.
    """
    return tuple(vars(cls)[name].__set__ for name in names)


_FRAME_SET = slot_setters(Frame, "customer", "channel", "seq", "payload", "qos")


def make_frame(customer: str, channel: str, seq: int, payload: bytes, qos: int = 1,
               _set: tuple[Callable[[Any, Any], None], ...] = _FRAME_SET) -> Frame:
    """``Frame(customer, channel, seq, payload, qos)``, cheaper (see :func:`slot_setters`).

    The ids are interned: every frame of a topic decodes its own copies, and the marks,
    the meter and the ingress sessions keep a topic for long, so without it each kept
    its own copy of the same strings (an interned string still goes when unused)."""
    frame: Frame = _new(Frame)
    _set[0](frame, sys.intern(customer))
    _set[1](frame, sys.intern(channel))
    _set[2](frame, seq)
    _set[3](frame, payload)
    _set[4](frame, qos)
    return frame


def topic_key(topic: Topic) -> bytes:
    """Unambiguous bytes for a topic (storage keys, hashing)."""
    return length_prefixed(topic[0].encode(), topic[1].encode())


@functools.lru_cache(maxsize=SHARD_CACHE)
def shard_for(customer: str, channel: str, shards: int) -> int:
    """Stable shard of a topic: blake2b over channel ‖ customer, mod ``shards`` (cached)."""
    digest = hashlib.blake2b(
        length_prefixed(channel.encode(), customer.encode()), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big") % shards


def validate(frame: Frame, limits: FrameLimits) -> Frame:
    """Return ``frame`` or raise a :class:`FrameRejected` subclass naming the bad field."""
    if not frame.customer:
        raise FieldMissing("customer id is missing")
    if not frame.channel:
        raise FieldMissing("channel id is missing")
    if frame.seq < 1:
        raise FieldMissing("seq is missing (must be >= 1)")
    for name, value in (("customer", frame.customer), ("channel", frame.channel)):
        if len(value.encode()) > limits.max_id:
            raise FieldTooLarge(f"{name} id over {limits.max_id} bytes")
    return validate_body(frame, limits)


def validate_body(frame: Frame, limits: FrameLimits) -> Frame:
    """The checks of :func:`validate` that do not depend on the topic's ids: what a
    frame of a topic whose ids already passed still needs (the ingress checks the ids
    once per topic per request)."""
    if frame.seq < 1:
        raise FieldMissing("seq is missing (must be >= 1)")
    if len(frame.payload) > limits.max_payload:
        raise FieldTooLarge(f"payload of {len(frame.payload)} bytes over {limits.max_payload}")
    if not 0 <= frame.qos <= MAX_QOS:
        raise FrameRejected(f"qos {frame.qos} outside 0..{MAX_QOS}")
    if frame.seq >= 1 << 64:
        raise FieldTooLarge("seq over 64 bits")
    return frame


def encode(frame: Frame) -> bytes:
    """The bus record for ``frame``."""
    c, ch = frame.customer.encode(), frame.channel.encode()
    header = _HEADER.pack(RECORD_VERSION, frame.seq, frame.qos, len(c), len(ch), len(frame.payload))
    return b"".join((header, c, ch, frame.payload))


def decode(record: bytes) -> Frame:
    """Parse a bus record; a corrupt record raises :class:`FrameRejected`."""
    if len(record) < _HEADER.size:
        raise FrameRejected("bus record shorter than its header")
    version, seq, qos, lc, lch, lp = _HEADER.unpack_from(record)
    if version != RECORD_VERSION:
        raise FrameRejected(f"bus record version {version}, expected {RECORD_VERSION}")
    off = _HEADER.size
    if len(record) != off + lc + lch + lp:
        raise FrameRejected("bus record length does not match its header")
    try:
        customer = record[off : off + lc].decode()
        channel = record[off + lc : off + lc + lch].decode()
    except UnicodeDecodeError:
        raise FrameRejected("bus record ids are not UTF-8") from None
    return make_frame(customer, channel, seq, record[off + lc + lch :], qos)


def topic_from_key(key: bytes) -> Topic:
    """Inverse of :func:`topic_key`."""
    (lc,) = struct.unpack_from(">I", key)
    customer = key[4 : 4 + lc].decode()
    (lch,) = struct.unpack_from(">I", key, 4 + lc)
    return (customer, key[8 + lc : 8 + lc + lch].decode())
