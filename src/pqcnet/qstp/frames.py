"""QSTP frame codec: the wire format that runs *inside* TLS 1.3.

TLS gives us confidentiality, integrity and ordering; this layer adds what TLS does
not: stream multiplexing, per-stream sequence numbers, credit-based flow control,
explicit backpressure (FLOW pause/resume), liveness (PING/PONG), rekey notices,
graceful shutdown (GOAWAY) and typed errors. Every frame is a fixed 20-byte
big-endian header followed by ``length`` payload bytes::

    version u8 | type u8 | flags u16 | stream_id u32 | seq u64 | length u32 | payload

Parsing is strict and pure: :class:`FrameDecoder` turns any byte string into frames
or raises :class:`~pqcnet.qstp.errors.FrameError` (never another exception), and it never
buffers more than one incomplete frame (``max_frame_payload`` + header), so a peer
cannot make us hold unbounded memory. Payload layouts per type:

========  =========  ==================================================================
type      stream id  payload
========  =========  ==================================================================
DATA      >= 1       application bytes; flag END_STREAM; ``seq`` counts per stream from 0
ACK       any        credit increment u32 (stream 0 = connection window); ``seq`` = last
                     DATA seq seen on that stream
FLOW      any        op u8 (PAUSE=1, RESUME=2), reason u16, retry_after_ms u32
PING      0          8 opaque bytes, echoed in PONG
PONG      0          the 8 bytes of the PING
REKEY     0          empty: "I scheduled a TLS KeyUpdate; what follows uses new keys"
GOAWAY    0          last_stream_id u32, last_seq u64 (DATA frames processed from the
                     peer), code u16, reason utf-8
ERROR     any        code u16, reason utf-8 (stream 0: fatal for the connection)
========  =========  ==================================================================
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

from pqcnet.qstp.errors import FrameError

VERSION = 1

#: version u8, type u8, flags u16, stream id u32, seq u64, length u32 — 20 bytes.
HEADER = struct.Struct(">BBHIQI")
HEADER_SIZE = HEADER.size

#: Default (and protocol-recommended) largest payload of one frame. Bounds the memory
#: one incomplete frame can pin in the decoder; 64 KiB of data plus room for headers.
MAX_FRAME_PAYLOAD = 64 * 1024 + 1024
#: Senders split DATA into frames of at most this many bytes so any peer using the
#: default ``MAX_FRAME_PAYLOAD`` accepts them.
MAX_DATA_CHUNK = 64 * 1024
#: Longest reason string carried by ERROR/GOAWAY; longer ones are truncated on send and
#: refused on receipt (a reason is for humans, not for bulk data).
MAX_REASON = 512

_U32 = struct.Struct(">I")
_CODE = struct.Struct(">H")
_GOAWAY = struct.Struct(">IQH")
_FLOW = struct.Struct(">BHI")
_MAX_U32 = 0xFFFFFFFF
#: Largest sequence number; a stream that would exceed it must be closed and reopened.
MAX_SEQ = 0xFFFFFFFFFFFFFFFF


class FrameType(enum.IntEnum):
    """Frame types on the wire."""

    DATA = 0
    ACK = 1
    FLOW = 2
    PING = 3
    PONG = 4
    REKEY = 5
    GOAWAY = 6
    ERROR = 7


class Flags(enum.IntFlag):
    """Header flags; only END_STREAM (on DATA) is defined."""

    NONE = 0
    END_STREAM = 0x1


class FlowOp(enum.IntEnum):
    """FLOW frame operation."""

    PAUSE = 1
    RESUME = 2


class ErrorCode(enum.IntEnum):
    """Wire error codes carried by ERROR and GOAWAY (and by ProtocolError.code)."""

    NO_ERROR = 0
    PROTOCOL_ERROR = 1
    FRAME_ERROR = 2
    FLOW_CONTROL_ERROR = 3
    STREAM_ERROR = 4
    SEQUENCE_ERROR = 5
    STREAM_LIMIT = 6
    HANDSHAKE_FAILED = 7
    HANDSHAKE_TIMEOUT = 8
    IDLE_TIMEOUT = 9
    TLS_ERROR = 10
    INTERNAL_ERROR = 11
    CANCELLED = 12


#: Which frame types may only travel on stream 0 (connection-level control).
_CONNECTION_ONLY = frozenset({FrameType.PING, FrameType.PONG, FrameType.REKEY, FrameType.GOAWAY})
_TYPES = {int(t): t for t in FrameType}
_ALLOWED_FLAGS = {t: (int(Flags.END_STREAM) if t is FrameType.DATA else 0) for t in FrameType}


class Frame(NamedTuple):
    """One decoded frame. ``payload`` is raw; use the ``parse_*`` helpers for its fields.

    A NamedTuple rather than a frozen dataclass: one is built per frame on the hot
    path, and tuple construction is several times cheaper.
    """

    type: FrameType
    stream_id: int
    seq: int
    payload: bytes = b""
    flags: int = 0


# --------------------------------------------------------------------------- encoding


def encode(
    ftype: FrameType, stream_id: int, seq: int, payload: bytes = b"", flags: int = 0
) -> bytes:
    """Header + payload as one ``bytes`` (the codec's reference encoder)."""
    return HEADER.pack(VERSION, ftype, flags, stream_id, seq, len(payload)) + payload


def encode_frame(frame: Frame) -> bytes:
    """Encode a :class:`Frame`."""
    return encode(frame.type, frame.stream_id, frame.seq, frame.payload, frame.flags)


def _reason_bytes(reason: str) -> bytes:
    raw = reason.encode("utf-8", "replace")[:MAX_REASON]
    return raw.decode("utf-8", "ignore").encode()  # never cut a code point in half


def ack_payload(credit: int) -> bytes:
    """ACK payload: credit increment (u32)."""
    return _U32.pack(credit)


def flow_payload(op: FlowOp, reason: int, retry_after_ms: int) -> bytes:
    """FLOW payload: op, reason code, retry-after in milliseconds."""
    return _FLOW.pack(op, reason, retry_after_ms)


def error_payload(code: int, reason: str) -> bytes:
    """ERROR payload: code + utf-8 reason (truncated to :data:`MAX_REASON`)."""
    return _CODE.pack(code) + _reason_bytes(reason)


def goaway_payload(last_stream_id: int, last_seq: int, code: int, reason: str) -> bytes:
    """GOAWAY payload: last accepted peer stream, DATA frames processed, code, reason."""
    return _GOAWAY.pack(last_stream_id, last_seq, code) + _reason_bytes(reason)


# --------------------------------------------------------------------------- payload parsing


def parse_ack(frame: Frame) -> int:
    """The credit increment of an ACK frame."""
    if len(frame.payload) != _U32.size:
        raise FrameError(f"ACK payload must be 4 bytes, got {len(frame.payload)}")
    credit: int = _U32.unpack(frame.payload)[0]
    return credit


def parse_flow(frame: Frame) -> tuple[FlowOp, int, int]:
    """``(op, reason, retry_after_ms)`` of a FLOW frame."""
    if len(frame.payload) != _FLOW.size:
        raise FrameError(f"FLOW payload must be {_FLOW.size} bytes, got {len(frame.payload)}")
    op, reason, retry = _FLOW.unpack(frame.payload)
    try:
        return FlowOp(op), reason, retry
    except ValueError:
        raise FrameError(f"unknown FLOW op {op}") from None


def _reason(raw: bytes) -> str:
    if len(raw) > MAX_REASON:
        raise FrameError(f"reason is {len(raw)} bytes; limit is {MAX_REASON}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError("reason is not valid UTF-8") from None


def parse_error(frame: Frame) -> tuple[int, str]:
    """``(code, reason)`` of an ERROR frame."""
    if len(frame.payload) < _CODE.size:
        raise FrameError("ERROR payload shorter than its 2-byte code")
    return _CODE.unpack_from(frame.payload)[0], _reason(frame.payload[_CODE.size :])


def parse_goaway(frame: Frame) -> tuple[int, int, int, str]:
    """``(last_stream_id, last_seq, code, reason)`` of a GOAWAY frame."""
    if len(frame.payload) < _GOAWAY.size:
        raise FrameError(f"GOAWAY payload shorter than {_GOAWAY.size} bytes")
    last, last_seq, code = _GOAWAY.unpack_from(frame.payload)
    return last, last_seq, code, _reason(frame.payload[_GOAWAY.size :])


def _check_structure(ftype: FrameType, flags: int, stream_id: int, length: int) -> None:
    if flags & ~_ALLOWED_FLAGS[ftype] & 0xFFFF:
        raise FrameError(f"{ftype.name} frame with undefined flags 0x{flags:04x}")
    if ftype in _CONNECTION_ONLY and stream_id != 0:
        raise FrameError(f"{ftype.name} frame on stream {stream_id}; it belongs on stream 0")
    if ftype is FrameType.DATA and stream_id == 0:
        raise FrameError("DATA frame on stream 0")
    if ftype in (FrameType.PING, FrameType.PONG) and length != 8:
        raise FrameError(f"{ftype.name} payload must be 8 bytes, got {length}")
    if ftype is FrameType.REKEY and length != 0:
        raise FrameError("REKEY frame carries no payload")


# --------------------------------------------------------------------------- decoding


class FrameDecoder:
    """Incremental, bounded decoder: ``feed(bytes) -> list[Frame]`` or :class:`FrameError`.

    After an error the decoder is poisoned (the stream position is lost); the
    connection closes. It holds at most one incomplete frame (header +
    ``max_frame_payload`` bytes); complete frames are sliced straight out of the
    caller's bytes, so each payload byte is copied once. A ``memoryview`` input is
    never kept: every payload and the partial tail are copied out of it, so the
    caller may reuse its buffer once ``feed`` returns.
    """

    __slots__ = ("_buf", "_failed", "max_frame_payload")

    def __init__(self, max_frame_payload: int = MAX_FRAME_PAYLOAD) -> None:
        if not 0 < max_frame_payload <= _MAX_U32:
            raise ValueError("max_frame_payload out of range")
        self.max_frame_payload = max_frame_payload
        self._buf = bytearray()
        self._failed = False

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame."""
        return len(self._buf)

    def _header(self, buf: bytes | bytearray | memoryview,
                pos: int) -> tuple[FrameType, int, int, int, int]:
        """Validate the header at ``pos``: ``(type, flags, stream_id, seq, length)``."""
        version, ftype, flags, stream_id, seq, length = HEADER.unpack_from(buf, pos)
        if version != VERSION:
            raise FrameError(f"unsupported frame version {version}")
        if length > self.max_frame_payload:
            raise FrameError(
                f"frame payload of {length} bytes exceeds limit {self.max_frame_payload}")
        kind = _TYPES.get(ftype)
        if kind is None:
            raise FrameError(f"unknown frame type {ftype}")
        if flags or kind is not FrameType.DATA:
            _check_structure(kind, flags, stream_id, length)
        elif stream_id == 0:
            raise FrameError("DATA frame on stream 0")
        return kind, flags, stream_id, seq, length

    def _complete_pending(self, data: bytes | memoryview, frames: list[Frame]) -> int:
        """Top up the buffered partial frame from ``data``; bytes of ``data`` used."""
        buf = self._buf
        used = 0
        if len(buf) < HEADER_SIZE:
            used = min(HEADER_SIZE - len(buf), len(data))
            buf += data[:used]
            if len(buf) < HEADER_SIZE:
                return used
        kind, flags, stream_id, seq, length = self._header(buf, 0)
        take = min(HEADER_SIZE + length - len(buf), len(data) - used)
        buf += data[used : used + take]
        used += take
        if len(buf) == HEADER_SIZE + length:
            frames.append(Frame(kind, stream_id, seq, bytes(buf[HEADER_SIZE:]), flags))
            self._buf = bytearray()
        return used

    def feed(self, data: bytes | memoryview) -> list[Frame]:
        """Consume ``data``; return every complete frame now available."""
        if self._failed:
            raise FrameError("decoder already failed on earlier input")
        view = type(data) is memoryview
        if not view:
            data = bytes(data)  # a no-op for bytes; slices below must be immutable bytes
        frames: list[Frame] = []
        pos = 0
        end = len(data)
        try:
            if self._buf:
                pos = self._complete_pending(data, frames)
                if self._buf:
                    return frames
            header = self._header
            append = frames.append
            while end - pos >= HEADER_SIZE:
                kind, flags, stream_id, seq, length = header(data, pos)
                stop = pos + HEADER_SIZE + length
                if stop > end:
                    break
                payload = data[pos + HEADER_SIZE : stop]  # bytes, or copied to bytes next
                append(Frame(kind, stream_id, seq, bytes(payload) if view else payload,  # type: ignore[arg-type]
                             flags))
                pos = stop
        except FrameError:
            self._failed = True
            self._buf = bytearray()
            raise
        if pos < end:
            self._buf = bytearray(data[pos:])  # less than one frame
        return frames


def decode_all(data: bytes, max_frame_payload: int = MAX_FRAME_PAYLOAD) -> list[Frame]:
    """Decode a complete byte string; trailing partial frames are a :class:`FrameError`."""
    dec = FrameDecoder(max_frame_payload)
    frames = dec.feed(data)
    if dec.buffered:
        raise FrameError(f"{dec.buffered} trailing bytes do not form a complete frame")
    return frames


__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "MAX_DATA_CHUNK",
    "MAX_FRAME_PAYLOAD",
    "MAX_REASON",
    "MAX_SEQ",
    "VERSION",
    "ErrorCode",
    "Flags",
    "FlowOp",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "ack_payload",
    "decode_all",
    "encode",
    "encode_frame",
    "error_payload",
    "flow_payload",
    "goaway_payload",
    "parse_ack",
    "parse_error",
    "parse_flow",
    "parse_goaway",
]
