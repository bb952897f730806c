"""Relayer messages inside a QSTP stream: length-prefixed protobuf, converted at the edge.

A QSTP stream is a byte stream (large sends are split into chunks), so each message
is ``u32 big-endian length ‖ protobuf``. :class:`MessageReader` is a sans-IO
de-framer with a named bound on message size. The ``to_*``/``from_*`` functions are
the only place ``relayer_pb2`` objects exist: everything past them uses
:class:`pqcnet.relayer.frame.Frame` and the small dataclasses below.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf.message import DecodeError, Message

from pqcnet.proto import relayer_pb2 as pb
from pqcnet.relayer.counters import MAX_COUNTERS_PER_MESSAGE, SignedAckCounter
from pqcnet.relayer.errors import FieldMissing, FieldTooLarge, FrameRejected, RelayerError
from pqcnet.relayer.frame import Frame, Topic, make_frame, slot_setters
from pqcnet.relayer.receipts import VolumeReceipt

M = TypeVar("M", bound=Message)
_new = object.__new__

_LEN = struct.Struct(">I")
#: largest single message on a relayer stream; bounds per-stream buffering
MAX_MESSAGE = 8 * 1024 * 1024
#: about where a delivery share too large for one message is cut (half of MAX_MESSAGE:
#: room for the per-frame encoding the size estimate does not count exactly)
DELIVERY_SPLIT = MAX_MESSAGE // 2
#: largest frame payload a relayer may be configured to accept: it fits one message
MAX_PAYLOAD_LIMIT = DELIVERY_SPLIT
#: bytes of protobuf encoding per delivered frame besides payload and ids (tags,
#: lengths, seq, qos), rounded up
_FRAME_OVERHEAD = 32


class MessageTooLarge(FrameRejected):
    """A message's length prefix exceeds :data:`MAX_MESSAGE` (stream is closed)."""

    code = 14


class MessageReader:
    """Turns stream chunks into whole message bodies."""

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self.max_message = max_message
        self._buf = bytearray()

    def feed(self, chunk: bytes) -> list[bytes]:
        """Add ``chunk``; return every complete message body it finished."""
        self._buf += chunk
        out: list[bytes] = []
        while len(self._buf) >= 4:
            (n,) = _LEN.unpack_from(self._buf)
            if n > self.max_message:
                raise MessageTooLarge(f"message of {n} bytes over {self.max_message}")
            if len(self._buf) < 4 + n:
                break
            out.append(bytes(self._buf[4 : 4 + n]))
            del self._buf[: 4 + n]
        return out


def pack(body: bytes) -> bytes:
    """Length-prefix one message body."""
    return _LEN.pack(len(body)) + body


# ------------------------------------------------------------------ ingress side


@dataclass(frozen=True, slots=True)
class Incoming:
    """One decoded publisher frame, or why it cannot be one."""

    #: seq as sent (0 when missing), echoed in the result
    seq: int
    frame: Frame | None
    error: RelayerError | None
    retry: bool


@dataclass(frozen=True, slots=True)
class Result:
    """What the relayer answers for one frame."""

    seq: int
    accepted: bool
    overflowed: bool = False
    code: int = 0
    reason: str = ""
    retriable: bool = False


@dataclass(frozen=True, slots=True)
class Subscribe:
    """A subscriber's request: one customer, some or all channels."""

    customer: str
    channels: frozenset[str]


@dataclass(frozen=True, slots=True)
class Ack:
    """A subscriber took every frame up to ``seq`` of each topic (cumulative)."""

    upto: dict[Topic, int]


@dataclass(frozen=True, slots=True)
class Counters:
    """A client's signed ack counters (decision 0014); no reply."""

    items: tuple[SignedAckCounter, ...]


@dataclass(frozen=True, slots=True)
class ReceiptRequest:
    """A customer asks for its signed receipt of one epoch."""

    customer: str
    epoch: int


ClientRequest = tuple[int, list[Incoming]] | Subscribe | Ack | Counters | ReceiptRequest


def _parse(cls: type[M], body: bytes, refusal: str) -> M:
    """``body`` parsed as a ``cls`` message, or :class:`FrameRejected` with ``refusal``."""
    msg = cls()
    try:
        msg.ParseFromString(body)
    except DecodeError:
        raise FrameRejected(refusal) from None
    return msg


def decode_client(body: bytes) -> ClientRequest:
    """Parse a ClientMessage; :class:`FrameRejected` if it is not one."""
    msg = _parse(pb.ClientMessage, body, "message is not a valid relayer ClientMessage")
    which = msg.WhichOneof("body")
    if which == "subscribe":
        if not msg.subscribe.customer_id:
            raise FieldMissing("subscribe: customer id is missing")
        return Subscribe(msg.subscribe.customer_id, frozenset(msg.subscribe.channel_ids))
    if which == "ack":
        upto: dict[Topic, int] = {}
        for t in msg.ack.topics:
            topic = (t.customer_id, t.channel_id)
            upto[topic] = max(upto.get(topic, 0), t.seq)
        return Ack(upto)
    if which == "counters":
        if len(msg.counters.counters) > MAX_COUNTERS_PER_MESSAGE:
            raise FieldTooLarge(f"{len(msg.counters.counters)} counters in one message; "
                                f"max {MAX_COUNTERS_PER_MESSAGE}")
        return Counters(tuple(SignedAckCounter.from_pb(c) for c in msg.counters.counters))
    if which == "receipt":
        if not msg.receipt.customer_id:
            raise FieldMissing("receipt: customer id is missing")
        return ReceiptRequest(msg.receipt.customer_id, msg.receipt.epoch)
    if which != "publish":
        raise FieldMissing("message has neither publish, subscribe, ack, counters nor receipt")
    return msg.publish.request_id, [_incoming(f) for f in msg.publish.frames]


_INCOMING_SET = slot_setters(Incoming, "seq", "frame", "error", "retry")
_RESULT_SET = slot_setters(Result, "seq", "accepted", "overflowed", "code", "reason", "retriable")


def _incoming(f: pb.IngressFrame, _set: tuple[Callable[[Any, Any], None], ...] = _INCOMING_SET
              ) -> Incoming:
    customer, channel, seq, payload = f.customer_id, f.channel_id, f.seq, f.payload
    if not (customer and channel and seq and payload):
        # a field at its default value: present (explicitly sent) or missing? Only then
        # ask, one HasField each; a non-default value is present by definition
        for field in ("customer_id", "channel_id", "seq", "payload"):
            if not f.HasField(field):
                return Incoming(seq, None, FieldMissing(f"{field} is missing"), f.retry)
    qos = f.qos
    if not qos and not f.HasField("qos"):
        qos = 1  # absent: the standard QoS (0 sent explicitly is best-effort)
    item: Incoming = _new(Incoming)  # Incoming(seq, frame, None, retry), cheaper
    _set[0](item, seq)
    _set[1](item, make_frame(customer, channel, seq, payload, qos))
    _set[2](item, None)
    _set[3](item, f.retry)
    return item


def accepted(seq: int, overflowed: bool,
             _set: tuple[Callable[[Any, Any], None], ...] = _RESULT_SET) -> Result:
    """``Result(seq, True, overflowed=overflowed)`` for the hot path (see ``slot_setters``)."""
    res: Result = _new(Result)
    _set[0](res, seq)
    _set[1](res, True)
    _set[2](res, overflowed)
    _set[3](res, 0)
    _set[4](res, "")
    _set[5](res, False)
    return res


def encode_reply(request_id: int, results: Sequence[Result]) -> bytes:
    """A framed PublishReply."""
    msg = pb.RelayerMessage()
    msg.reply.request_id = request_id
    add = msg.reply.results.add
    accepted_ = pb.FrameResult.ACCEPTED
    for r in results:
        if r.accepted and not r.overflowed:  # the usual case; proto3 omits the zero fields
            add(seq=r.seq, status=accepted_)
            continue
        add(seq=r.seq, status=accepted_ if r.accepted else pb.FrameResult.REJECTED,
            error_code=r.code, reason=r.reason, overflowed=r.overflowed, retriable=r.retriable)
    return pack(msg.SerializeToString())


def encode_error(code: int, reason: str) -> bytes:
    """A framed request-level ErrorReply."""
    msg = pb.RelayerMessage()
    msg.error.code = code
    msg.error.reason = reason
    return pack(msg.SerializeToString())


def encode_receipt(receipt: VolumeReceipt) -> bytes:
    """A framed VolumeReceipt reply."""
    msg = pb.RelayerMessage()
    msg.receipt.CopyFrom(receipt.to_pb())
    return pack(msg.SerializeToString())


def encode_deliveries(frames: Iterable[Frame]) -> bytes:
    """A framed DeliveryBatch."""
    msg = pb.RelayerMessage()
    add = msg.deliveries.frames.add
    for f in frames:
        add(customer_id=f.customer, channel_id=f.channel, seq=f.seq, payload=f.payload, qos=f.qos)
    return pack(msg.SerializeToString())


def encode_delivery_messages(frames: Sequence[Frame]) -> list[bytes]:
    """``frames`` as framed DeliveryBatches a subscriber accepts: each body at most
    :data:`MAX_MESSAGE`, in order. One message when it fits (the common case: encoded
    once, as before); a larger share — a backlog of big frames, a redelivery after a
    reset — is cut into messages of about :data:`DELIVERY_SPLIT` bytes. Before, the
    whole share went as one message: the subscriber refused it (MessageTooLarge),
    reconnected and got the same message again, for good."""
    one = encode_deliveries(frames)
    if len(one) - _LEN.size <= MAX_MESSAGE:
        return [one]
    return [m for part in message_parts(frames) for m in encode_delivery_messages(part)]


def message_parts(frames: Sequence[Frame], max_frames: int | None = None
                  ) -> list[Sequence[Frame]]:
    """``frames`` cut, in order, into parts of about :data:`DELIVERY_SPLIT` bytes (an
    upper estimate of their encoding) and at most ``max_frames`` frames each. Raises
    :class:`MessageTooLarge` for a frame that cannot fit a message by itself."""
    parts: list[Sequence[Frame]] = []
    start = size = 0
    for i, f in enumerate(frames):
        n = len(f.payload) + _FRAME_OVERHEAD + 4 * (len(f.customer) + len(f.channel))
        if n > MAX_MESSAGE:
            raise MessageTooLarge(f"a frame of {len(f.payload)} bytes does not fit a "
                                  f"relayer message ({MAX_MESSAGE} bytes)")
        if i > start and (size + n > DELIVERY_SPLIT
                          or (max_frames is not None and i - start >= max_frames)):
            parts.append(frames[start:i])
            start, size = i, 0
        size += n
    parts.append(frames[start:])
    return parts


# ------------------------------------------------------------------ client side

#: frames in one publish request (the ingress refuses more; the SDK splits larger calls)
MAX_FRAMES_PER_REQUEST = 4096


def encode_publish(request_id: int, frames: Sequence[Frame], *, retry: bool = False) -> bytes:
    """A framed PublishRequest."""
    msg = pb.ClientMessage()
    msg.publish.request_id = request_id
    add = msg.publish.frames.add
    for f in frames:
        add(customer_id=f.customer, channel_id=f.channel, seq=f.seq, payload=f.payload,
            qos=f.qos, retry=retry)
    return pack(msg.SerializeToString())


def encode_subscribe(customer: str, channels: Iterable[str] = ()) -> bytes:
    """A framed SubscribeRequest."""
    msg = pb.ClientMessage()
    msg.subscribe.customer_id = customer
    msg.subscribe.channel_ids.extend(channels)
    return pack(msg.SerializeToString())


def encode_ack(upto: Mapping[Topic, int]) -> bytes:
    """A framed DeliveryAck (highest seq taken per topic)."""
    msg = pb.ClientMessage()
    add = msg.ack.topics.add
    for (customer, channel), seq in upto.items():
        add(customer_id=customer, channel_id=channel, seq=seq)
    return pack(msg.SerializeToString())


def encode_counters(counters: Sequence[SignedAckCounter]) -> bytes:
    """A framed AckCounters message."""
    msg = pb.ClientMessage()
    msg.counters.counters.extend(c.to_pb() for c in counters)
    return pack(msg.SerializeToString())


def encode_receipt_request(customer: str, epoch: int) -> bytes:
    """A framed ReceiptRequest."""
    msg = pb.ClientMessage()
    msg.receipt.customer_id = customer
    msg.receipt.epoch = epoch
    return pack(msg.SerializeToString())


@dataclass(frozen=True, slots=True)
class ServerError:
    """A request-level error the relayer sent."""

    code: int
    reason: str


ServerMessage = tuple[int, list[Result]] | list[Frame] | ServerError | VolumeReceipt


def decode_server(body: bytes) -> ServerMessage:
    """Parse a RelayerMessage into a reply, a delivery batch or an error."""
    msg = _parse(pb.RelayerMessage, body, "not a valid RelayerMessage")
    which = msg.WhichOneof("body")
    if which == "reply":
        return msg.reply.request_id, [
            Result(r.seq, r.status == pb.FrameResult.ACCEPTED, r.overflowed, r.error_code,
                   r.reason, r.retriable) for r in msg.reply.results]
    if which == "deliveries":
        return [Frame(d.customer_id, d.channel_id, d.seq, d.payload, d.qos)
                for d in msg.deliveries.frames]
    if which == "error":
        return ServerError(msg.error.code, msg.error.reason)
    if which == "receipt":
        return VolumeReceipt.from_pb(msg.receipt)
    raise FrameRejected("empty RelayerMessage")
