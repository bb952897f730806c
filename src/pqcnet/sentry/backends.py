"""Proxy backends: the one seam between the sentry core and the services behind it.

:class:`Backend.forward` takes a sanitized :class:`ForwardRequest` and returns a
:class:`ForwardResponse` whose body is an async iterator, so a large backend answer
streams back over the tunnel chunk by chunk instead of being buffered. Failures to
reach or hear from a backend become :class:`~pqcnet.sentry.errors.BackendError`; a gRPC
backend's *own* status (NOT_FOUND, INVALID_ARGUMENT, …) is relayed as it is.

* :class:`HttpBackend` — HTTP/1.1 (JSON-RPC, REST) through one keep-alive pool per
  backend (:class:`pqcnet.sentry.upstream.Upstream`: ``max_connections``, per-request
  timeout). A small response arrives whole (``ForwardResponse.inline``) so the
  sentry answers with one tunnel write; larger ones stream. ``upgrade`` switches a
  connection of its own to WebSocket (the sidecar's ``ws`` requests).
* :class:`GrpcBackend` — gRPC by method path over one ``grpc.aio`` channel (HTTP/2
  multiplexes, so one channel is the pool); payloads stay opaque bytes. ``forward``
  makes a unary call; ``open_stream`` a streaming one (any cardinality, see
  :mod:`pqcnet.sentry.grpc_stream`).
* :class:`TcpBackend` — a raw TCP connection per stream (the sidecar's TCP mode).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import grpc
import grpc.aio

from pqcnet._util.schema import split_hostport
from pqcnet.sentry.config import BackendConfig
from pqcnet.sentry.errors import BackendError, SentryConfigError
from pqcnet.sentry.memo import Memo, headers_size
from pqcnet.sentry.upstream import Upgraded, Upstream, backend_tls_context

#: Hop-by-hop headers (RFC 9110 §7.6.1) never forwarded, plus ones we recompute.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
    "upgrade", "proxy-authenticate", "proxy-authorization", "host", "content-length",
})
#: gRPC metadata keys the gRPC library owns; forwarding them would be refused.
GRPC_RESERVED = frozenset({"content-type", "te", "user-agent", "grpc-timeout",
                           "grpc-encoding", "grpc-accept-encoding", "grpc-status",
                           "grpc-message", "host", "authority"})
#: Chunk size read from a TCP backend per send on the tunnel.
TCP_READ_CHUNK = 64 * 1024
#: Largest gRPC message accepted from / sent to a backend.
MAX_GRPC_MESSAGE = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ForwardRequest:
    """What the core hands a backend (already authenticated and sanitized)."""

    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    timeout: float


async def _no_body() -> AsyncIterator[bytes]:
    return
    yield b""  # pragma: no cover


async def _nothing() -> None:
    return None


@dataclass(slots=True)
class ForwardResponse:
    """A backend's answer; iterate ``body`` then always call ``aclose``."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: AsyncIterator[bytes] = field(default_factory=_no_body)
    grpc_code: int = 0
    reason: str = ""
    aclose: Callable[[], Awaitable[None]] = _nothing
    #: the whole body when the backend's answer was small and already read (then
    #: ``body`` is not used): lets the sentry send head, body and end in one write
    inline: bytes | None = None


class Backend(Protocol):
    """The seam: forward one request, close the pool."""

    name: str

    async def forward(self, req: ForwardRequest) -> ForwardResponse: ...

    async def aclose(self) -> None: ...


#: Backend response header sets already filtered (bounded, see sentry.memo).
_filtered: Memo[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]] = Memo()


def _end_to_end(headers: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """A backend's response headers without hop-by-hop ones (Content-Length stays)."""
    got = _filtered.get(headers)
    if got is None:
        got = tuple((k, v) for k, v in headers
                    if k.lower() not in HOP_BY_HOP or k.lower() == "content-length")
        if headers_size(headers) <= _filtered.max_item:
            _filtered.put(headers, got)
    return got


class HttpBackend:
    """HTTP/1.1 with keep-alive connection pooling; large response bodies stream."""

    def __init__(self, cfg: BackendConfig) -> None:
        self.name = cfg.name
        self.timeout = cfg.timeout
        tls = backend_tls_context(cfg.name, cfg.target, ca=cfg.tls_ca, cert=cfg.tls_cert,
                                  key=cfg.tls_key)
        self._pool = Upstream(cfg.target, max_connections=cfg.max_connections,
                              timeout=cfg.timeout, name=cfg.name, tls=tls)

    async def forward(self, req: ForwardRequest) -> ForwardResponse:
        headers = [(k, v) for k, v in req.headers if k.lower() not in HOP_BY_HOP]
        timeout = min(req.timeout, self.timeout) if req.timeout > 0 else self.timeout
        resp = await self._pool.request(req.method, req.path, headers, req.body, timeout)
        out_headers = _end_to_end(resp.headers)
        if resp.inline is not None or resp.stream is None:
            return ForwardResponse(resp.status, out_headers, inline=resp.inline or b"")
        return ForwardResponse(resp.status, out_headers, resp.stream, aclose=resp.aclose)

    async def upgrade(self, req: ForwardRequest, protocol: str = "websocket") -> Upgraded:
        """Ask the backend to switch to ``protocol`` (see :meth:`Upstream.upgrade`);
        response headers come back end to end only (no hop-by-hop, and no framing
        headers when the answer is not a 101: its body travels whole)."""
        headers = [(k, v) for k, v in req.headers if k.lower() not in HOP_BY_HOP]
        timeout = min(req.timeout, self.timeout) if req.timeout > 0 else self.timeout
        got = await self._pool.upgrade(req.path, headers, protocol, timeout)
        out = _end_to_end(got.headers)
        if got.status != 101:
            out = tuple((k, v) for k, v in out if k.lower() != "content-length")
        got.headers = out
        return got

    async def aclose(self) -> None:
        await self._pool.aclose()


class GrpcBackend:
    """Unary gRPC calls by method path with opaque request/response bytes."""

    def __init__(self, cfg: BackendConfig) -> None:
        self.name = cfg.name
        self.timeout = cfg.timeout
        self._channel = grpc.aio.insecure_channel(
            cfg.target,
            options=[("grpc.max_receive_message_length", MAX_GRPC_MESSAGE),
                     ("grpc.max_send_message_length", MAX_GRPC_MESSAGE)],
        )

    async def forward(self, req: ForwardRequest) -> ForwardResponse:
        metadata = _metadata(req.headers)
        timeout = min(req.timeout, self.timeout) if req.timeout > 0 else self.timeout
        call = self._channel.unary_unary(req.path, None, None)
        try:
            result = call(req.body, metadata=metadata, timeout=timeout)
            reply: bytes = await result
            trailing = await result.trailing_metadata()
        except grpc.aio.AioRpcError as err:
            code = err.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise BackendError(
                    f"backend {self.name}: {code.name} {err.details() or ''}".strip()
                ) from None
            return ForwardResponse(200, (), grpc_code=code.value[0],
                                   reason=err.details() or code.name)
        return ForwardResponse(200, metadata_to_wire(trailing or ()), inline=reply)

    def open_stream(self, req: ForwardRequest) -> grpc.aio.StreamStreamCall[bytes, bytes]:
        """Start a streaming call (works for every cardinality on the wire). Its life is
        bounded by the client's deadline only: a stream may rightly outlive the
        backend's per-request ``timeout``, and it holds a concurrency slot meanwhile."""
        call = self._channel.stream_stream(req.path, None, None)
        return call(None, metadata=_metadata(req.headers),
                    timeout=req.timeout if req.timeout > 0 else None)

    async def aclose(self) -> None:
        await self._channel.close(None)


class TcpBackend:
    """Raw TCP: each tunnel stream gets its own connection."""

    def __init__(self, cfg: BackendConfig) -> None:
        self.name = cfg.name
        self.timeout = cfg.timeout
        self.host, self.port = split_hostport(cfg.target)  # validated by the config

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open a connection or raise :class:`BackendError`."""
        try:
            return await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), self.timeout
            )
        except (OSError, TimeoutError) as exc:
            raise BackendError(f"backend {self.name} unreachable: {exc!r}") from None

    async def forward(self, req: ForwardRequest) -> ForwardResponse:
        raise BackendError(f"backend {self.name} is raw TCP; it takes streams, not requests")

    async def aclose(self) -> None:
        return None


def _metadata(headers: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str | bytes], ...]:
    """Wire headers as backend call metadata (``-bin`` values decoded, keys gRPC owns
    left out)."""
    return tuple((k.lower(), _bin_value(v) if k.lower().endswith("-bin") else v)
                 for k, v in headers
                 if k.lower() not in GRPC_RESERVED and not k.startswith(":"))


def metadata_to_wire(metadata: Iterable[tuple[str, str | bytes]]
                     ) -> tuple[tuple[str, str], ...]:
    """gRPC metadata as wire headers: binary (``-bin``) values travel base64-encoded."""
    return tuple((str(k), base64.b64encode(v).decode("ascii") if isinstance(v, bytes)
                  else str(v)) for k, v in metadata)


def _bin_value(value: str) -> bytes:
    """A ``-bin`` metadata value from the wire (base64) back to bytes; a value the
    sanitizer replaced (no longer base64) is forwarded as its UTF-8 bytes."""
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return value.encode("utf-8")


def build_backend(cfg: BackendConfig) -> HttpBackend | GrpcBackend | TcpBackend:
    """Instantiate the backend class for ``cfg.kind``."""
    if cfg.kind == "http":
        return HttpBackend(cfg)
    if cfg.kind == "grpc":
        return GrpcBackend(cfg)
    if cfg.kind == "tcp":
        return TcpBackend(cfg)
    raise SentryConfigError(f"unknown backend kind {cfg.kind!r}")


async def close_quietly(writer: asyncio.StreamWriter) -> None:
    """Close a stream writer, ignoring a peer that already went away."""
    writer.close()
    with contextlib.suppress(OSError, ConnectionError):
        await writer.wait_closed()
