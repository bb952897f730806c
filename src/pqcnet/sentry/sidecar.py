"""The client sidecar: an unmodified local app talks plaintext to localhost, the
sidecar carries it over QSTP to a sentry with a session assertion attached.

:class:`Sidecar` owns one QSTP tunnel (dialled lazily, re-dialled after a failure)
and mints a session assertion *for that tunnel* — bound to its TLS exporter channel
binding and renewed before it expires — with the tenant issuer key it was given
(the delegated issuer of the node's tenant). Each RPC is one QSTP stream in the
:mod:`pqcnet.sentry.wire` format. Three local faces, all bound to 127.0.0.1:

* :func:`serve_http` — the strict, bounded HTTP/1.1 listener of :mod:`pqcnet.sentry.http1`;
  keep-alive; sentry refusals come back as 401/403/429 (+ ``Retry-After``) with a
  one-line JSON body ``{"error": outcome, "reason": ...}``.
* :func:`serve_grpc` — a ``grpc.aio`` server with a generic handler accepting any
  unary method, so an unmodified gRPC client (generated stubs) works; refusals are
  gRPC status codes (UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED).
  Binary metadata (keys ending ``-bin``) crosses the tunnel base64-encoded and
  reaches the backend as the original bytes; the backend's trailing metadata comes
  back to the client the same way.
* :func:`serve_tcp` — raw bytes of each local connection piped over one stream to a
  named TCP backend.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from pqcnet.crypto.pqc import SigningKey
from pqcnet.errors import PqcnetError
from pqcnet.sentry import assertion as sa
from pqcnet.sentry.backends import GRPC_RESERVED, TCP_READ_CHUNK, close_quietly
from pqcnet.sentry.errors import BackendError
from pqcnet.sentry.http1 import HttpError, HttpLimits, read_request, response_head
from pqcnet.sentry.memo import Memo
from pqcnet.sentry.wire import RequestHead, ResponseHead, decode_response, encode_request, read_head

log = logging.getLogger("pqcnet.sidecar")

#: Renew the assertion when less than this fraction of its lifetime is left.
RENEW_FRACTION = 0.2
#: What gRPC accepts as a metadata key.
_METADATA_KEY = re.compile(r"^[0-9a-z_.\-]+$")
#: HTTP heads built for decoded response heads (bounded, see sentry.memo).
_heads: Memo[tuple[ResponseHead, bool], tuple[str | None, bytes]] = Memo()
#: Hop-by-hop response headers the sidecar sets itself.
_RESPONSE_OWN = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length"})


@dataclass(slots=True)
class _Session:
    tunnel: Any
    assertion: bytes
    expires_at: float
    renew_at: float


def _ending(tunnel: Any) -> bool:
    """Closed, or the sentry sent GOAWAY (e.g. its certificate was renewed): dial anew
    for new requests; streams already open on the old tunnel finish there."""
    return bool(getattr(tunnel, "closed", False)) or getattr(tunnel, "goaway", None) is not None


def _not_processed(stream: Any) -> bool:
    """Whether the sentry announced (GOAWAY) that it accepted no stream this high: the
    request never reached a backend, so sending it again on a new tunnel is safe."""
    goaway = getattr(getattr(stream, "tunnel", None), "goaway", None)
    return goaway is not None and int(stream.id) > int(goaway.last_stream_id)


class Sidecar:
    """One tunnel to one sentry, plus the assertion bound to it."""

    def __init__(
        self,
        dial: Callable[[], Awaitable[Any]],
        issuer: SigningKey,
        *,
        subject: str,
        tenant: str,
        ttl: float = 300.0,
        scopes: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._dial = dial
        self._issuer = issuer
        self.subject = subject
        self.tenant = tenant
        self.ttl = ttl
        self.scopes = tuple(scopes)
        self._clock = clock
        self._session: _Session | None = None
        self._lock = asyncio.Lock()
        self.tunnels_opened = 0

    def _mint(self, tunnel: Any) -> _Session:
        now = self._clock()
        raw = sa.issue(self._issuer, subject=self.subject, tenant=self.tenant,
                       channel_binding=tunnel.channel_binding(), now=now, ttl=self.ttl,
                       scopes=self.scopes)
        return _Session(tunnel, raw, now + self.ttl, now + self.ttl * (1 - RENEW_FRACTION))

    async def session(self) -> _Session:
        """The live tunnel and a fresh-enough assertion (dial / renew as needed)."""
        s = self._session
        if s is not None and not _ending(s.tunnel) and self._clock() < s.renew_at:
            return s  # the common case needs no lock
        async with self._lock:
            s = self._session
            if s is None or _ending(s.tunnel):
                tunnel = await self._dial()
                self.tunnels_opened += 1
                s = self._session = self._mint(tunnel)
            elif self._clock() >= s.renew_at:
                s = self._session = self._mint(s.tunnel)
            return s

    async def _drop(self, s: _Session) -> None:
        async with self._lock:
            if self._session is s:
                self._session = None
        with contextlib.suppress(Exception):
            await s.tunnel.close()

    async def open(self, head: RequestHead, body: bytes = b"", *, end: bool = True) -> Any:
        """Open a stream and send the head (with assertion) and body; returns the stream."""
        for attempt in (1, 2):
            s = await self.session()
            try:
                data = encode_request(RequestHead(
                    head.kind, head.method, head.path, head.headers, s.assertion,
                    head.timeout)) + body
                # QSTP accepts streams first used out of id order, so concurrent
                # requests open and send independently; a PAUSE holds new requests.
                await s.tunnel.wait_resumed()
                stream = s.tunnel.open_stream()
                await stream.send(data, end=end)
                return stream
            except (PqcnetError, OSError) as exc:
                await self._drop(s)
                if attempt == 2:
                    raise BackendError(f"sentry unreachable: {exc}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def call(self, head: RequestHead, body: bytes) -> tuple[ResponseHead, Any, bytes]:
        """Send one RPC; returns (response head, stream to read the body from, first bytes)."""
        for attempt in (1, 2):
            stream = await self.open(head, body)
            try:
                payload, rest = await read_head(stream.recv)
            except (PqcnetError, OSError) as exc:
                if attempt == 1 and _not_processed(stream):
                    continue  # the sentry's GOAWAY says it never saw it: send it again
                raise BackendError(f"sentry connection failed: {exc}") from None
            return decode_response(payload), stream, rest
        raise AssertionError("unreachable")  # pragma: no cover

    async def aclose(self) -> None:
        """Close the tunnel."""
        s = self._session
        if s is not None:
            await self._drop(s)


async def _body(stream: Any, first: bytes) -> AsyncIterator[bytes]:
    if first:
        yield first
    while chunk := await stream.recv():
        yield chunk


def _error_json(outcome: str, reason: str) -> bytes:
    return json.dumps({"error": outcome, "reason": reason}).encode() + b"\n"


# ---------------------------------------------------------------------------- HTTP


async def _write_simple(writer: asyncio.StreamWriter, status: int, body: bytes,
                        extra: Iterable[tuple[str, str]] = (), *, close: bool) -> None:
    headers = [("content-type", "application/json"), ("content-length", str(len(body))),
               *extra, ("connection", "close" if close else "keep-alive")]
    writer.write(response_head(status, headers) + body)
    await writer.drain()


async def _http_exchange(sidecar: Sidecar, req_head: Any, body: bytes,
                         writer: asyncio.StreamWriter, keep: bool) -> bool:
    head = RequestHead("http", req_head.method, req_head.target, req_head.headers)
    try:
        resp, stream, first = await sidecar.call(head, body)
    except BackendError as exc:
        await _write_simple(writer, 502, _error_json(exc.outcome, str(exc)), close=not keep)
        return keep
    if resp.error:
        extra = [(n, v) for n, v in resp.headers if n.lower() == "retry-after"]
        extra.append(("x-pqcnet-error", resp.error))
        await _write_simple(writer, resp.status, _error_json(resp.error, resp.reason), extra,
                            close=not keep)
        return keep
    length, out = _response_head(resp, keep)
    # head and the body bytes that came with it leave in one write (one segment for
    # the small answers that dominate RPC traffic)
    async for chunk in _body(stream, first):
        out += chunk if length is not None else b"%x\r\n%s\r\n" % (len(chunk), chunk)
        writer.write(out)
        out = b""
        await writer.drain()
    if length is None:
        out += b"0\r\n\r\n"
    if out:
        writer.write(out)
    await writer.drain()
    return keep


def _response_head(resp: ResponseHead, keep: bool) -> tuple[str | None, bytes]:
    """(Content-Length or None for chunked, HTTP head) for a proxied answer; memoised,
    as the decoded ResponseHead itself is (same backend answer, same bytes)."""
    got = _heads.get((resp, keep))
    if got is not None:
        return got
    headers = [(n, v) for n, v in resp.headers if n.lower() not in _RESPONSE_OWN]
    length = next((v for n, v in resp.headers if n.lower() == "content-length"), None)
    headers.append(("content-length", length) if length is not None
                   else ("transfer-encoding", "chunked"))
    headers.append(("connection", "keep-alive" if keep else "close"))
    out = (length, response_head(resp.status, headers))
    return _heads.put((resp, keep), out) if len(out[1]) <= _heads.max_item else out


async def serve_http(sidecar: Sidecar, host: str = "127.0.0.1", port: int = 0,
                     limits: HttpLimits | None = None) -> asyncio.Server:
    """Start the local HTTP/1.1 face; ``server.sockets[0].getsockname()[1]`` is the port."""
    lim = limits or HttpLimits()

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = True
        try:
            while True:
                try:
                    got = await read_request(reader, lim, first=first)
                except HttpError as exc:
                    with contextlib.suppress(OSError):
                        await _write_simple(writer, exc.http_status,
                                            _error_json(exc.outcome, str(exc)), close=True)
                    return
                if got is None:
                    return
                first = False
                if not await _http_exchange(sidecar, got[0], got[1], writer, got[0].keep_alive):
                    return
        except (OSError, ConnectionError, PqcnetError) as exc:
            log.info("local http client dropped", extra={"error": repr(exc)})
        finally:
            await close_quietly(writer)

    return await asyncio.start_server(client, host, port, limit=lim.max_head_bytes)


# ---------------------------------------------------------------------------- gRPC


def metadata_to_wire(metadata: Iterable[tuple[str, str | bytes]]
                     ) -> tuple[tuple[str, str], ...]:
    """gRPC metadata as wire headers: binary (``-bin``) values travel base64-encoded."""
    out: list[tuple[str, str]] = []
    for key, value in metadata:
        if isinstance(value, bytes):
            out.append((str(key), base64.b64encode(value).decode("ascii")))
        else:
            out.append((str(key), str(value)))
    return tuple(out)


def metadata_from_wire(headers: Iterable[tuple[str, str]]
                       ) -> tuple[tuple[str, str | bytes], ...]:
    """The backend's trailing metadata for the local gRPC client (``-bin`` decoded);
    keys gRPC owns and values that cannot be valid metadata are left out."""
    out: list[tuple[str, str | bytes]] = []
    for key, value in headers:
        k = key.lower()
        if k in GRPC_RESERVED or k.startswith((":", "grpc-")) or not _METADATA_KEY.match(k):
            continue
        if k.endswith("-bin"):
            try:
                out.append((k, base64.b64decode(value, validate=True)))
            except (binascii.Error, ValueError):
                continue
        elif value.isascii() and value.isprintable():
            out.append((k, value))
    return tuple(out)


class _ForwardAll(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """Accept every unary method and forward its raw bytes through the sidecar."""

    def __init__(self, sidecar: Sidecar) -> None:
        self._sidecar = sidecar

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[bytes, bytes]:
        method: str = details.method
        sidecar = self._sidecar

        async def unary(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
                        ) -> bytes:
            metadata = metadata_to_wire(context.invocation_metadata() or ())
            remaining = context.time_remaining()
            timeout = float(remaining) if remaining is not None else 0.0
            head = RequestHead("grpc", "", method, metadata, timeout=min(timeout, 3600.0))
            try:
                resp, stream, first = await sidecar.call(head, request)
            except BackendError as exc:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            if resp.grpc_code != 0 or resp.error:
                code = next((c for c in grpc.StatusCode if c.value[0] == resp.grpc_code),
                            grpc.StatusCode.UNKNOWN)
                await context.abort(code, resp.reason or resp.error)
            try:
                reply = b"".join([c async for c in _body(stream, first)])
            except PqcnetError as exc:  # the sentry reset the stream mid-response
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            trailers = metadata_from_wire(resp.headers)
            if trailers:
                context.set_trailing_metadata(trailers)
            return reply

        return grpc.unary_unary_rpc_method_handler(unary)


async def serve_grpc(sidecar: Sidecar, host: str = "127.0.0.1", port: int = 0
                     ) -> tuple[grpc.aio.Server, int]:
    """Start the local gRPC face; returns (server, bound port)."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_ForwardAll(sidecar),))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, bound


# ---------------------------------------------------------------------------- TCP


async def serve_tcp(sidecar: Sidecar, backend: str, host: str = "127.0.0.1",
                    port: int = 0) -> asyncio.Server:
    """Start the raw TCP face: each local connection becomes one stream to ``backend``."""

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            stream = await sidecar.open(RequestHead("tcp", "", backend), end=False)
            payload, rest = await read_head(stream.recv)
            resp = decode_response(payload)
            if resp.error:
                log.info("sentry refused tcp stream", extra={"outcome": resp.error,
                                                             "reason": resp.reason})
                return
            if rest:
                writer.write(rest)

            async def up() -> None:
                while data := await reader.read(TCP_READ_CHUNK):
                    await stream.send(data)
                await stream.send(b"", end=True)

            async def down() -> None:
                while chunk := await stream.recv():
                    writer.write(chunk)
                    await writer.drain()
                if writer.can_write_eof():
                    writer.write_eof()

            async with asyncio.TaskGroup() as tg:
                tg.create_task(up())
                tg.create_task(down())
        except* (OSError, ConnectionError, PqcnetError) as eg:
            log.info("tcp pipe ended", extra={"error": repr(eg.exceptions[0])})
        finally:
            await close_quietly(writer)

    return await asyncio.start_server(client, host, port)
