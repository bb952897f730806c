"""The client sidecar: an unmodified local app talks plaintext to localhost, the
sidecar carries it over QSTP to a sentry with a session assertion attached.

:class:`Sidecar` owns one QSTP tunnel (dialled lazily, re-dialled after a failure)
and mints a session assertion *for that tunnel* — bound to its TLS exporter channel
binding and renewed before it expires — with the tenant issuer key it was given
(the delegated issuer of the node's tenant). Each RPC is one QSTP stream in the
:mod:`pqcnet.sentry.wire` format. Three local faces, all bound to 127.0.0.1:

* :func:`serve_http` — the strict, bounded HTTP/1.x listener of
  :mod:`pqcnet.sentry.local_http` (llhttp via httptools; chunked and streamed request
  bodies, ``Expect: 100-continue``, HTTP/1.0, keep-alive, pipelining); sentry
  refusals come back as 401/403/429 (+ ``Retry-After``) with a one-line JSON body
  ``{"error": outcome, "reason": ...}``.
* :func:`serve_grpc` — a ``grpc.aio`` server with a generic handler accepting any
  method of any cardinality (unary, server-streaming, client-streaming, bidi), so an
  unmodified gRPC client (generated stubs) works; messages flow with end-to-end flow
  control and cancellation (:mod:`pqcnet.sentry.grpc_stream`); refusals are gRPC
  status codes (UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED). Binary
  metadata (keys ending ``-bin``) crosses the tunnel base64-encoded and reaches the
  backend as the original bytes; the backend's initial and trailing metadata and its
  status come back to the client the same way.
* :func:`serve_tcp` — raw bytes of each local connection piped over one stream to a
  named TCP backend.

WebSockets need no face of their own: the HTTP face upgrades them
(:mod:`pqcnet.sentry.local_http`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import grpc
import grpc.aio

from pqcnet._util.tasks import cancel_and_wait
from pqcnet.crypto.pqc import SigningKey
from pqcnet.errors import PqcnetError
from pqcnet.identity import NodeIdentity
from pqcnet.identity.errors import IdentityError
from pqcnet.identity.spiffe import validate_pattern
from pqcnet.qstp.aio import Tunnel, connect
from pqcnet.qstp.errors import HandshakeError
from pqcnet.qstp.frames import ErrorCode
from pqcnet.qstp.tls import TlsPolicy
from pqcnet.sentry import assertion as sa
from pqcnet.sentry import local_http
from pqcnet.sentry.backends import GRPC_RESERVED, close_quietly, metadata_to_wire
from pqcnet.sentry.errors import BackendError, PeerMismatch, SentryConfigError, SentryError
from pqcnet.sentry.grpc_stream import (
    MESSAGE,
    STREAM,
    FrameDecoder,
    decode_trailers,
    message_frame,
)
from pqcnet.sentry.http1 import HttpLimits
from pqcnet.sentry.local_http import Upstream, body_chunks, pipe
from pqcnet.sentry.wire import RequestHead, ResponseHead, decode_response, encode_request, read_head

log = logging.getLogger("pqcnet.sidecar")

#: Renew the assertion when less than this fraction of its lifetime is left.
RENEW_FRACTION = 0.2
#: What gRPC accepts as a metadata key.
_METADATA_KEY = re.compile(r"^[0-9a-z_.\-]+$")


#: HandshakeRefused code of a peer whose SPIFFE ID our policy does not allow
_NOT_ALLOWED = "spiffe-not-allowed"


def default_expect_peer(identity: NodeIdentity) -> str:
    """The pin when none is given: any sentry of our trust domain
    (``spiffe://<td>/*/sentry/*``) — never a relayer or another client."""
    return f"spiffe://{identity.spiffe_id.trust_domain}/*/sentry/*"


def pinned_dial(host: str, port: int, identity: NodeIdentity, expect: Sequence[str] = (),
                policy: TlsPolicy | None = None) -> Callable[[], Awaitable[Tunnel]]:
    """A ``dial`` for :class:`Sidecar` that accepts only a peer matching ``expect``
    (SPIFFE IDs or per-segment globs; default :func:`default_expect_peer`). A peer
    with another identity fails the handshake and raises :class:`PeerMismatch`
    naming what it presented and what was expected."""
    patterns = tuple(expect) or (default_expect_peer(identity),)
    try:
        for p in patterns:
            validate_pattern(p)
    except IdentityError as exc:
        raise SentryConfigError(f"--expect-peer: {exc}") from None
    pinned = TlsPolicy(allowed_peers=patterns) if policy is None else replace(
        policy, allowed_peers=patterns)

    async def dial() -> Tunnel:
        try:
            return await connect(host, port, identity, pinned)
        except HandshakeError as exc:
            # the tunnel reports the refusal as a HandshakeError carrying its code
            if (getattr(exc, "reason", "") != _NOT_ALLOWED
                    and not str(exc).endswith(f"[{_NOT_ALLOWED}]")):
                raise
            raise PeerMismatch(
                f"{host}:{port} is not the expected sentry: {exc} (expected "
                f"{', '.join(patterns)}; --expect-peer pins another identity)") from None

    return dial


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

    async def call(self, head: RequestHead, body: bytes, *, idempotent: bool = False
                   ) -> tuple[ResponseHead, Any, bytes]:
        """Send one RPC; returns (response head, stream to read the body from, first bytes).

        ``idempotent`` matters to a :class:`~pqcnet.sentry.pool.SentryPool` (which may
        replay the request on another sentry); one sidecar resends only a request the
        sentry's GOAWAY says it never processed (identity rotation)."""
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

    async def response(self, stream: Any) -> tuple[ResponseHead, Any, bytes]:
        """Read the response head of a stream opened with :meth:`open`."""
        try:
            payload, rest = await read_head(stream.recv)
        except (PqcnetError, OSError) as exc:
            raise BackendError(f"sentry connection failed: {exc}") from None
        return decode_response(payload), stream, rest

    async def aclose(self) -> None:
        """Close the tunnel."""
        s = self._session
        if s is not None:
            await self._drop(s)


_body = body_chunks


# ---------------------------------------------------------------------------- HTTP


async def serve_http(sidecar: Upstream, host: str = "127.0.0.1", port: int = 0,
                     limits: HttpLimits | None = None) -> asyncio.Server:
    """Start the local HTTP/1.x face (:mod:`pqcnet.sentry.local_http`) in front of a
    sidecar or a :class:`~pqcnet.sentry.pool.SentryPool`; ``server.sockets[0]
    .getsockname()[1]`` is the port."""
    return await local_http.serve(sidecar, host, port, limits)


# ---------------------------------------------------------------------------- gRPC


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


def _status(code: int) -> grpc.StatusCode:
    return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)


class _ForwardAll(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """Accept every method, of any cardinality, and forward it through the sidecar.

    The local server cannot know whether the app's stub is unary or streaming (on
    HTTP/2 every gRPC call is a stream of messages ended by trailers), so every call
    is served as a bidirectional stream and carried as framed messages
    (:mod:`pqcnet.sentry.grpc_stream`): a unary call is the one-message case."""

    def __init__(self, sidecar: Upstream) -> None:
        self._sidecar = sidecar

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[bytes, bytes]:
        method: str = details.method
        sidecar = self._sidecar

        async def handler(_requests: Any, context: grpc.aio.ServicerContext[bytes, bytes]
                          ) -> None:
            await _forward_stream(sidecar, method, context)

        return grpc.stream_stream_rpc_method_handler(handler)


async def _forward_stream(sidecar: Upstream, method: str,
                          context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
    """One local gRPC call: messages up as the app writes them, messages down as the
    app reads them (each hop waits for the next: flow control stays end to end), the
    backend's status and trailers last; a cancel or deadline resets the QSTP stream."""
    remaining = context.time_remaining()
    timeout = min(float(remaining), 3600.0) if remaining is not None else 0.0
    head = RequestHead("grpc", STREAM, method,
                       metadata_to_wire(context.invocation_metadata() or ()), timeout=timeout)
    try:
        stream = await sidecar.open(head, b"", end=False)
    except BackendError as exc:
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
    up = asyncio.create_task(_app_to_sentry(stream, context))
    finished = False
    try:
        try:
            resp, _stream, data = await sidecar.response(stream)
        except BackendError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        if resp.error or resp.grpc_code:
            await context.abort(_status(resp.grpc_code), resp.reason or resp.error)
        initial = metadata_from_wire(resp.headers)
        if initial:
            await context.send_initial_metadata(initial)
        dec = FrameDecoder()
        while True:
            try:
                frames = dec.feed(data)
            except SentryError as exc:
                await context.abort(grpc.StatusCode.INTERNAL, f"bad frame from sentry: {exc}")
            for flag, payload in frames:
                if flag == MESSAGE:
                    await context.write(payload)  # waits on the app's HTTP/2 window
                    continue
                status = decode_trailers(payload)
                finished = up.done()
                trailers = metadata_from_wire(status.headers)
                if status.grpc_code:
                    await context.abort(_status(status.grpc_code), status.reason, trailers)
                if trailers:
                    context.set_trailing_metadata(trailers)
                return
            try:
                data = await stream.recv()  # credit goes back only now
            except PqcnetError as exc:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"sentry stream failed: {exc}")
            if not data:
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    "sentry stream ended without a gRPC status")
    finally:
        try:
            await cancel_and_wait(up)
        finally:
            if not finished:  # cancelled, failed, or the app still sending: abort our half
                with contextlib.suppress(PqcnetError, OSError):
                    stream.reset(ErrorCode.CANCELLED, "grpc call ended by the client side")


async def _app_to_sentry(stream: Any, context: grpc.aio.ServicerContext[bytes, bytes]
                         ) -> None:
    try:
        while isinstance(message := await context.read(), bytes):  # EOF ends it
            await stream.send(message_frame(message))  # waits for the sentry's credit
        await stream.send(b"", end=True)
    except (PqcnetError, OSError) as exc:
        # the sentry ended or reset the stream: its status (if any) is read by the caller
        log.debug("grpc upload stopped", extra={"error": str(exc)})


async def serve_grpc(sidecar: Upstream, host: str = "127.0.0.1", port: int = 0
                     ) -> tuple[grpc.aio.Server, int]:
    """Start the local gRPC face; returns (server, bound port)."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_ForwardAll(sidecar),))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, bound


# ---------------------------------------------------------------------------- TCP


async def serve_tcp(sidecar: Upstream, backend: str, host: str = "127.0.0.1",
                    port: int = 0) -> asyncio.Server:
    """Start the raw TCP face: each local connection becomes one stream to ``backend``."""

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            stream = await sidecar.open(RequestHead("tcp", "", backend), end=False)
            resp, stream, rest = await sidecar.response(stream)
            if resp.error:
                log.info("sentry refused tcp stream", extra={"outcome": resp.error,
                                                             "reason": resp.reason})
                return
            await pipe(reader, writer, stream, first=rest)
        except* (OSError, ConnectionError, PqcnetError) as eg:
            log.info("tcp pipe ended", extra={"error": repr(eg.exceptions[0])})
        finally:
            await close_quietly(writer)

    return await asyncio.start_server(client, host, port)
