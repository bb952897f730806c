"""How an RPC travels over a QSTP stream between sidecar (or SDK) and sentry.

One QSTP stream per RPC, opened by the client side::

    client → sentry:  u32 BE length ‖ RpcRequestHead (protobuf)  ‖ request body … END
    sentry → client:  u32 BE length ‖ RpcResponseHead (protobuf) ‖ response body … END

* ``RpcRequestHead`` carries ``kind`` (``http`` | ``grpc`` | ``tcp`` | ``ws``), the
  HTTP method and target (or gRPC method path, or TCP backend name), headers / gRPC
  metadata, the serialized session assertion, and the client's timeout.
* The request body is every byte after the head until the stream's end; for ``tcp``
  both directions stay open and carry raw bytes until either side ends. ``ws`` is an
  HTTP ``GET`` asking to become a WebSocket: the sentry asks the backend, and after a
  101 response head both directions carry the WebSocket's bytes as ``tcp`` does.
* ``RpcResponseHead`` carries the status (HTTP status; 200 for a good gRPC call), the
  backend's headers, and — when the sentry refused or failed — ``error`` (the outcome
  label of a :class:`~pqcnet.sentry.errors.SentryError`), a one-line ``reason``, ``retry_after``
  and the gRPC code. The response body then streams back chunk by chunk as the backend
  produces it.

This module is sans-IO: :class:`HeadDecoder` is fed bytes and yields a head plus the
leftover bytes; :func:`read_head` drives it from any ``recv`` coroutine. Heads are
bounded (:data:`MAX_HEAD_BYTES`, :data:`MAX_HEADERS`) and a malformed one is a
:class:`~pqcnet.sentry.errors.WireError`, never an exception from protobuf.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from pqcnet.proto import sentry_pb2
from pqcnet.sentry.errors import RequestTooLarge, WireError
from pqcnet.sentry.memo import Memo, memoized

#: Bound on one head block; bounds what a peer can make us buffer before a body.
MAX_HEAD_BYTES = 64 * 1024
#: Bound on header / metadata entries in a head.
MAX_HEADERS = 100
KINDS = ("http", "grpc", "tcp", "ws")
_LEN = struct.Struct(">I")

# Heads repeat byte for byte (same client, same backend answer): encoding and decoding
# are pure, so each direction is memoised (bounded, see sentry.memo). Only successful
# results are remembered; a malformed head is re-checked (and refused) every time.
_enc_req: Memo[RequestHead, bytes] = Memo()
_enc_resp: Memo[ResponseHead, bytes] = Memo()
_dec_req: Memo[bytes, RequestHead] = Memo()
_dec_resp: Memo[bytes, ResponseHead] = Memo()


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A decoded ``RpcRequestHead``."""

    #: "http", "grpc", "tcp" or "ws"
    kind: str
    #: HTTP method ("" otherwise)
    method: str
    #: HTTP target, gRPC method path, or TCP backend name
    path: str
    #: headers / metadata in order
    headers: tuple[tuple[str, str], ...] = ()
    #: serialized SessionAssertion (empty when absent)
    assertion: bytes = b""
    #: client deadline seconds, 0 = sentry default
    timeout: float = 0.0


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """A decoded ``RpcResponseHead``."""

    #: HTTP status (200 for a successful gRPC call)
    status: int
    #: backend headers / trailing metadata
    headers: tuple[tuple[str, str], ...] = ()
    #: outcome label when the sentry refused or failed, else ""
    error: str = ""
    #: one human-readable line
    reason: str = ""
    #: seconds, for rate-limited refusals
    retry_after: float = 0.0
    #: gRPC status code (0 = OK)
    grpc_code: int = 0


def _out_size(_key: object, out: bytes) -> int:
    return len(out)


def _in_size(payload: bytes, _head: object) -> int:
    return len(payload)


def _frame(payload: bytes) -> bytes:
    if len(payload) > MAX_HEAD_BYTES:
        raise RequestTooLarge(f"head block of {len(payload)} bytes exceeds {MAX_HEAD_BYTES}")
    return _LEN.pack(len(payload)) + payload


def _encode_request(head: RequestHead) -> bytes:
    if head.kind not in KINDS:
        raise WireError(f"unknown request kind {head.kind!r}")
    if len(head.headers) > MAX_HEADERS:
        raise RequestTooLarge(f"more than {MAX_HEADERS} headers")
    msg = sentry_pb2.RpcRequestHead(
        kind=head.kind,
        method=head.method,
        path=head.path,
        headers=[sentry_pb2.Header(name=n, value=v) for n, v in head.headers],
        assertion=head.assertion,
        timeout=head.timeout,
    )
    return _frame(msg.SerializeToString())


encode_request: Callable[[RequestHead], bytes] = memoized(_enc_req, _encode_request, _out_size)
"""Length-prefixed ``RpcRequestHead``."""


def _encode_response(head: ResponseHead) -> bytes:
    msg = sentry_pb2.RpcResponseHead(
        status=head.status,
        headers=[sentry_pb2.Header(name=n, value=v) for n, v in head.headers],
        error=head.error,
        reason=head.reason,
        retry_after=head.retry_after,
        grpc_code=head.grpc_code,
    )
    return _frame(msg.SerializeToString())


encode_response: Callable[[ResponseHead], bytes] = memoized(_enc_resp, _encode_response,
                                                             _out_size)
"""Length-prefixed ``RpcResponseHead``."""


def _decode_request(payload: bytes) -> RequestHead:
    try:
        msg = sentry_pb2.RpcRequestHead.FromString(payload)
    except DecodeError:
        raise WireError("request head is not a valid RpcRequestHead") from None
    if msg.kind not in KINDS:
        raise WireError(f"unknown request kind {msg.kind!r}")
    if not msg.path:
        raise WireError("request head has no path")
    if len(msg.headers) > MAX_HEADERS:
        raise RequestTooLarge(f"more than {MAX_HEADERS} headers")
    if not (0.0 <= msg.timeout <= 3600.0):
        raise WireError(f"timeout {msg.timeout} out of range")
    return RequestHead(
        kind=msg.kind,
        method=msg.method,
        path=msg.path,
        headers=tuple((h.name, h.value) for h in msg.headers),
        assertion=msg.assertion,
        timeout=msg.timeout,
    )


decode_request: Callable[[bytes], RequestHead] = memoized(_dec_req, _decode_request, _in_size)
"""Parse an ``RpcRequestHead`` payload (without the length prefix)."""


def _decode_response(payload: bytes) -> ResponseHead:
    try:
        msg = sentry_pb2.RpcResponseHead.FromString(payload)
    except DecodeError:
        raise WireError("response head is not a valid RpcResponseHead") from None
    return ResponseHead(
        status=msg.status,
        headers=tuple((h.name, h.value) for h in msg.headers),
        error=msg.error,
        reason=msg.reason,
        retry_after=msg.retry_after,
        grpc_code=msg.grpc_code,
    )


decode_response: Callable[[bytes], ResponseHead] = memoized(_dec_resp, _decode_response, _in_size)
"""Parse an ``RpcResponseHead`` payload (without the length prefix)."""


class HeadDecoder:
    """Accumulates bytes until one length-prefixed head block is complete."""

    def __init__(self, max_head: int = MAX_HEAD_BYTES) -> None:
        self._buf = bytearray()
        self._max = max_head

    def feed(self, data: bytes) -> tuple[bytes, bytes] | None:
        """Add bytes; returns (head payload, leftover) once complete, else None."""
        self._buf += data
        if len(self._buf) < _LEN.size:
            return None
        (n,) = _LEN.unpack_from(self._buf)
        if n > self._max:
            raise RequestTooLarge(f"head block of {n} bytes exceeds {self._max}")
        if len(self._buf) < _LEN.size + n:
            return None
        payload = bytes(self._buf[_LEN.size : _LEN.size + n])
        rest = bytes(self._buf[_LEN.size + n :])
        self._buf.clear()
        return payload, rest


async def read_head(
    recv: Callable[[], Awaitable[bytes]], max_head: int = MAX_HEAD_BYTES
) -> tuple[bytes, bytes]:
    """Read one head block from a stream: (payload, body bytes already received)."""
    dec = HeadDecoder(max_head)
    while True:
        chunk = await recv()
        if not chunk:
            raise WireError("stream ended before a complete head block")
        got = dec.feed(chunk)
        if got is not None:
            return got
