"""Vertices: the canonical signed encoding, the id, and the wire form.

Why a hand-written canonical encoding: protobuf serialization is not canonical
(field order, unknown fields and default-valued fields may vary between encoders),
so the bytes that are hashed and signed are a fixed layout instead (all integers
big-endian; ``lp(x)`` is a u32 length followed by ``x``)::

    lp(b"pqcnet/qsdag/vertex/v1")     domain-separation prefix
    u16 kind
    lp(author, UTF-8)
    u64 counter                       author's monotonic counter (genesis: 0)
    u64 timestamp_ms
    u32 key_version
    u16 n_parents, then n * 32-byte parent ids (ascending, no duplicates)
    lp(payload)

* vertex id = **SHA3-256** over those bytes (the signature is not covered: it is
  checked separately, and ML-DSA signing is randomized, so ids stay content ids);
* signature = ML-DSA over those bytes with FIPS 204 context ``pqcnet/qsdag/vertex/v1``.

The wire/storage form is the ``pqcnet.qsdag.Vertex`` protobuf (without the id);
:func:`decode` checks every bound and the parent ordering, so a decoded vertex
always re-encodes to the bytes that were signed.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
from dataclasses import dataclass, field, replace
from enum import IntEnum

from google.protobuf.message import DecodeError

from pqcnet.crypto.pqc import SigningKey, length_prefixed
from pqcnet.proto import qsdag_pb2
from pqcnet.qsdag.errors import InvalidNodeId, MalformedVertex, Rejection

DOMAIN = b"pqcnet/qsdag/vertex/v1"
FORMAT_VERSION = 1
ID_SIZE = 32
#: Most parents a vertex may name: bounds verification work and tip fan-in.
MAX_PARENTS = 16
#: Largest payload: ledger records are small facts, not bulk data.
MAX_PAYLOAD = 256 * 1024
#: Longest author node id (UTF-8 bytes).
MAX_AUTHOR = 128
#: Largest encoded vertex accepted from a peer (payload + parents + signature).
MAX_WIRE = MAX_PAYLOAD + MAX_PARENTS * (ID_SIZE + 2) + 8 * 1024
_MAX_U64 = 2**64 - 1
_MAX_U32 = 2**32 - 1


class VertexKind(IntEnum):
    """What a vertex records; values equal the ``pqcnet.qsdag.VertexKind`` enum."""

    GENESIS = 1
    KEY_VERSION = 2
    ATTESTATION = 3
    VOLUME_PROOF = 4
    PERFORMANCE_REPORT = 5
    POLICY_ANCHOR = 6
    ROUTE = 7
    GOVERNANCE_DIRECTIVE = 8
    SLASHING_EVIDENCE = 9
    RELAY_RECORD = 10


@dataclass(frozen=True, slots=True)
class Vertex:
    """One signed ledger entry. Build with :func:`sign_vertex`; decode with :func:`decode`."""

    kind: VertexKind
    #: node id of the author (registered through a KEY_VERSION vertex or genesis)
    author: str
    #: author's counter: exactly one more than its previous vertex (genesis: 0)
    counter: int
    #: milliseconds since the Unix epoch, author's clock
    timestamp_ms: int
    #: version of the author's key that signed this vertex
    key_version: int
    #: ids of the parent vertices, ascending; empty only for genesis
    parents: tuple[bytes, ...]
    #: serialized payload message for ``kind`` (see :mod:`pqcnet.qsdag.payloads`)
    payload: bytes
    #: ML-DSA signature over :meth:`canonical`
    signature: bytes = b""
    # Memo of (canonical bytes, id): every field is immutable, and the ledger needs
    # both several times per vertex (id, signature check, orphan indexes).
    _memo: tuple[bytes, bytes] | None = field(default=None, init=False, repr=False,
                                              compare=False)

    def _canon_and_id(self) -> tuple[bytes, bytes]:
        memo = self._memo
        if memo is None:
            canon = canonical_bytes(
                self.kind, self.author, self.counter, self.timestamp_ms,
                self.key_version, self.parents, self.payload,
            )
            memo = (canon, hashlib.sha3_256(canon).digest())
            object.__setattr__(self, "_memo", memo)
        return memo

    def canonical(self) -> bytes:
        """The exact bytes that are hashed for the id and signed."""
        return self._canon_and_id()[0]

    @property
    def id(self) -> bytes:
        """SHA3-256 over :meth:`canonical` (32 bytes)."""
        return self._canon_and_id()[1]

    def encode(self) -> bytes:
        """The wire/storage form (``pqcnet.qsdag.Vertex`` protobuf)."""
        return to_proto(self).SerializeToString()


def canonical_bytes(
    kind: int, author: str, counter: int, timestamp_ms: int,
    key_version: int, parents: tuple[bytes, ...], payload: bytes,
) -> bytes:
    """Canonical encoding (module docstring); raises :class:`MalformedVertex` on bad fields."""
    check_node_id(author, "author", error=MalformedVertex)
    author_b = author.encode("utf-8")
    _check_fields(int(kind), author_b, counter, timestamp_ms, key_version, parents, payload)
    return b"".join((
        _DOMAIN_LP,
        _HEAD.pack(int(kind), len(author_b)),
        author_b,
        _FIXED.pack(counter, timestamp_ms, key_version, len(parents)),
        *parents,
        _LEN.pack(len(payload)),
        payload,
    ))


# The fixed parts of the layout above (built once: the encoding runs for every vertex).
_DOMAIN_LP = length_prefixed(DOMAIN)
_HEAD = struct.Struct(">HI")  # kind, then the author's length prefix
_FIXED = struct.Struct(">QQIH")
_LEN = struct.Struct(">I")


def _check_fields(
    kind: int, author: bytes, counter: int, timestamp_ms: int, key_version: int,
    parents: tuple[bytes, ...], payload: bytes,
) -> None:
    if kind not in VertexKind._value2member_map_:
        raise MalformedVertex(f"unknown vertex kind {kind}")
    if not (0 <= counter <= _MAX_U64 and 0 <= timestamp_ms <= _MAX_U64):
        raise MalformedVertex("counter/timestamp out of u64 range")
    if not 1 <= key_version <= _MAX_U32:
        raise MalformedVertex("key_version must be 1..2^32-1")
    if len(parents) > MAX_PARENTS:
        raise MalformedVertex(f"{len(parents)} parents; at most {MAX_PARENTS}")
    if any(len(p) != ID_SIZE for p in parents):
        raise MalformedVertex(f"parent ids must be {ID_SIZE} bytes")
    if any(a >= b for a, b in itertools.pairwise(parents)):
        raise MalformedVertex("parents must be ascending and unique")
    if kind == VertexKind.GENESIS and (parents or counter != 0):
        raise MalformedVertex("genesis has no parents and counter 0")
    if kind != VertexKind.GENESIS and not parents:
        raise MalformedVertex("only genesis may have no parents")
    if len(payload) > MAX_PAYLOAD:
        raise MalformedVertex(f"payload is {len(payload)} bytes; at most {MAX_PAYLOAD}")


def check_node_id(value: str, what: str = "node id", *,
                  error: type[Rejection] = InvalidNodeId) -> None:
    """Node ids key storage prefixes (``node ‖ 0x00 ‖ …``) and appear in logs, so an
    id is 1..:data:`MAX_AUTHOR` bytes of UTF-8 of printable characters only
    (``str.isprintable``: no NUL/control, format such as bidi overrides, surrogate,
    unassigned, or separator other than the ASCII space).

    Raises ``error`` (an :class:`InvalidNodeId` unless the caller's context has a
    more specific rejection, e.g. :class:`MalformedVertex` while decoding).
    """
    if not isinstance(value, str):
        raise error(f"{what} must be a string")
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError:
        raise error(f"{what} is not valid UTF-8") from None
    if not 1 <= len(raw) <= MAX_AUTHOR:
        raise error(f"{what} must be 1..{MAX_AUTHOR} bytes of UTF-8, got {len(raw)}")
    if not value.isprintable():
        bad = next(ch for ch in value if not ch.isprintable())
        raise error(f"{what} contains control/separator character U+{ord(bad):04X}")


def sign_vertex(
    signer: SigningKey, *, kind: VertexKind, author: str, counter: int, timestamp_ms: int,
    key_version: int, parents: tuple[bytes, ...] | list[bytes], payload: bytes,
) -> Vertex:
    """Build and sign a vertex (parents are sorted and de-duplicated here)."""
    unsigned = Vertex(
        kind=VertexKind(kind), author=author, counter=counter, timestamp_ms=timestamp_ms,
        key_version=key_version, parents=tuple(sorted(set(parents))), payload=payload,
    )
    sig = signer.sign(unsigned.canonical(), context=DOMAIN)
    return replace(unsigned, signature=sig)


def to_proto(v: Vertex) -> qsdag_pb2.Vertex:
    """Boundary conversion to the protobuf message."""
    return qsdag_pb2.Vertex(
        version=FORMAT_VERSION, kind=int(v.kind), author=v.author,  # type: ignore[arg-type]
        counter=v.counter, timestamp_ms=v.timestamp_ms, key_version=v.key_version,
        parents=list(v.parents), payload=v.payload, signature=v.signature,
    )


def from_proto(msg: qsdag_pb2.Vertex) -> Vertex:
    """Boundary conversion from the protobuf message, with every bound checked."""
    if msg.version != FORMAT_VERSION:
        raise MalformedVertex(f"unsupported vertex format version {msg.version}")
    v = Vertex(
        kind=VertexKind(msg.kind) if msg.kind in VertexKind._value2member_map_ else msg.kind,  # type: ignore[arg-type]
        author=msg.author, counter=msg.counter, timestamp_ms=msg.timestamp_ms,
        key_version=msg.key_version, parents=tuple(msg.parents), payload=msg.payload,
        signature=msg.signature,
    )
    v.canonical()  # validates every field
    if not v.signature or len(v.signature) > 8192:
        raise MalformedVertex("signature missing or oversized")
    return v


def decode(data: bytes) -> Vertex:
    """Parse the wire form; any problem is a :class:`MalformedVertex`."""
    if len(data) > MAX_WIRE:
        raise MalformedVertex(f"encoded vertex is {len(data)} bytes; at most {MAX_WIRE}")
    msg = qsdag_pb2.Vertex()
    try:
        msg.ParseFromString(data)
    except (DecodeError, ValueError) as exc:
        raise MalformedVertex(f"cannot decode vertex: {exc}") from None
    return from_proto(msg)
