"""The sentry's tunnel-facing loop: one task per QSTP stream, one RPC per stream.

:func:`handle_stream` is the whole per-RPC life: read the head, :meth:`Sentry.admit`
it and read the bounded body (a streaming gRPC call has no body to wait for: its
messages are relayed as they come, see :mod:`pqcnet.sentry.grpc_stream`), all within
``request_read_timeout`` (a slowloris client holds nothing but its own stream),
sanitize, forward, and stream the
backend's answer back. Every refusal becomes a response head with the typed error's
outcome, one-line reason and retry-after; no exception reaches the peer and the
backend never sees a refused request. It only needs the small :class:`RpcStream`
surface, so it runs the same over :mod:`pqcnet.qstp.aio` streams and in tests.

Two transport-level signals complete the picture:

* a client that keeps hammering after rate-limit refusals (``HAMMER_REFUSALS`` within
  ``HAMMER_WINDOW`` on one tunnel, see :mod:`pqcnet.sentry.limiter`) also gets a tunnel-wide
  QSTP FLOW PAUSE carrying the bucket's retry-after, so its sidecar waits instead of
  sending requests that would only be refused;
* a backend that fails after the response head went out resets the stream with an
  ERROR frame (``INTERNAL_ERROR``, reason "backend failed mid-response"), so the
  client sees a failed stream, never a clean but truncated end.

Small responses (``ForwardResponse.inline``) leave as one tunnel write: head, body
and end of stream together. A raw TCP stream, and a WebSocket once its backend
answered 101, is a byte pipe (:func:`_pipe`) bounded by the idle and write timeouts.

:func:`serve_tunnel` feeds each stream of an accepted tunnel to :func:`handle_stream`;
:func:`watch_config` polls the config file for hot reload. :class:`SentryServer`
terminates QSTP (``pqcnet.qstp.aio.serve``) with both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from pqcnet._util.tasks import cancel_and_wait
from pqcnet.errors import PqcnetError
from pqcnet.qstp.errors import TunnelClosed
from pqcnet.qstp.frames import ErrorCode
from pqcnet.sentry.backends import TCP_READ_CHUNK, GrpcBackend, HttpBackend, close_quietly
from pqcnet.sentry.core import Admission, Sentry, TunnelView
from pqcnet.sentry.errors import (
    ClientTooSlow,
    ConcurrencyLimited,
    Denied,
    PipeIdle,
    RateLimited,
    RequestTooLarge,
    SentryError,
    WireError,
)
from pqcnet.sentry.grpc_stream import STREAM, proxy_stream
from pqcnet.sentry.usage import Usage
from pqcnet.sentry.wire import RequestHead, ResponseHead, decode_request, encode_response, read_head
from pqcnet.sentry.writewatch import until_quiet

log = logging.getLogger("pqcnet.sentry")

#: FLOW reason code the sentry puts on a PAUSE caused by rate limiting.
FLOW_REASON_RATE_LIMITED = 429
#: Shortest / longest rate-limit PAUSE, seconds (retry-after travels in whole ms, and a
#: PAUSE of 0 ms would mean "until RESUME").
MIN_PAUSE = 0.01
MAX_PAUSE = 5.0


class RpcStream(Protocol):
    """What the sentry needs from one QSTP stream."""

    async def send(self, data: bytes, end: bool = False) -> None: ...

    async def recv(self) -> bytes: ...

    async def close(self) -> None: ...

    def reset(self, code: int = ..., reason: str = "") -> None: ...


def error_head(exc: SentryError) -> ResponseHead:
    """The response head describing a refusal."""
    retry = float(getattr(exc, "retry_after", 0.0))
    headers = (("retry-after", str(max(1, round(retry + 0.499)))),) if retry else ()
    return ResponseHead(
        status=exc.http_status, headers=headers, error=exc.outcome,
        reason=str(exc).splitlines()[0][:500] if str(exc) else exc.outcome,
        retry_after=retry, grpc_code=exc.grpc_code,
    )


async def _read_body(stream: RpcStream, first: bytes, limit: int) -> bytes:
    body = bytearray(first)
    while True:
        if len(body) > limit:
            raise RequestTooLarge(f"request body over {limit} bytes")
        chunk = await stream.recv()
        if not chunk:
            return bytes(body)
        body += chunk


async def handle_stream(sentry: Sentry, stream: RpcStream, tunnel: TunnelView) -> str:
    """Serve one RPC on ``stream``; returns the outcome label."""
    started = time.perf_counter()
    bounds = sentry.config.bounds
    kind = "unknown"
    outcome = "ok"
    try:
        # one deadline for the whole request (head, then body): one timer per RPC
        phase = "head"
        try:
            async with asyncio.timeout(bounds.request_read_timeout):
                payload, rest = await read_head(stream.recv)
                head = decode_request(payload)
                kind = head.kind
                adm = sentry.admit(head, tunnel)
                if kind == "grpc" and head.method == STREAM:
                    kind = "grpc-stream"  # messages flow both ways for the call's life
                elif kind not in ("tcp", "ws"):  # pipes: bytes flow after the answer
                    phase = "body"
                    try:
                        rest = await _read_body(stream, rest, bounds.max_request_body)
                    except BaseException:
                        sentry.release(adm)
                        raise
        except TimeoutError:
            raise WireError(
                f"request {phase} not received within {bounds.request_read_timeout:g}s"
            ) from None
        try:
            adm.usage.requests[kind] += 1  # admitted and its body read: it counts
            if kind == "tcp":
                await _pipe_tcp(sentry, stream, adm, rest)
            elif kind == "ws":
                await _pipe_ws(sentry, stream, head, adm, rest)
            elif kind == "grpc-stream":
                await _grpc_stream(sentry, stream, head, adm, rest)
            else:
                failed = await _proxy(sentry, stream, head, adm, rest)
                if failed is not None:
                    sentry.metrics.count(failed.outcome, type(failed).__name__)
                    return failed.outcome
        finally:
            sentry.release(adm)
    except SentryError as exc:
        outcome = exc.outcome
        sentry.metrics.count(outcome, type(exc).__name__)
        if isinstance(exc, RateLimited) and not isinstance(exc, ConcurrencyLimited):
            _maybe_pause(sentry, tunnel, exc.retry_after)
        log.info("sentry refused rpc", extra={"outcome": outcome, "reason": str(exc),
                                              "peer": str(tunnel.peer), "kind": kind})
        with contextlib.suppress(PqcnetError, OSError):
            await stream.send(encode_response(error_head(exc)), end=True)
        return outcome
    except (TunnelClosed, ConnectionError):
        outcome = "error"
        sentry.metrics.count(outcome, "TunnelClosed")
        return outcome
    except Exception:
        log.exception("sentry internal error", extra={"peer": str(tunnel.peer)})
        sentry.metrics.count("error", "internal")
        with contextlib.suppress(Exception):
            await stream.send(encode_response(ResponseHead(
                500, error="error", reason="internal sentry error", grpc_code=13)), end=True)
        return "error"
    sentry.metrics.count(outcome)
    sentry.metrics.observe_latency(kind, time.perf_counter() - started)
    return outcome


def _maybe_pause(sentry: Sentry, tunnel: TunnelView, retry_after: float) -> None:
    """PAUSE the tunnel once its client has ignored enough refusals in a window."""
    if tunnel.pause is None or not tunnel.hammer.refused(sentry.clock()):
        return
    with contextlib.suppress(PqcnetError):
        tunnel.pause(retry_after)
        sentry.metrics.flow_pauses.inc()
        log.info("tunnel paused: client keeps hammering after rate-limit refusals",
                 extra={"peer": str(tunnel.peer), "retry_after": retry_after})


async def _proxy(sentry: Sentry, stream: RpcStream, head: RequestHead, adm: Admission,
                 body: bytes) -> SentryError | None:
    """Forward one request; returns the error if the backend failed mid-response or
    the client stopped reading it (each write may wait ``response_write_timeout``:
    a waiting write holds a gate slot and a backend connection)."""
    req = sentry.prepare(head, body, adm)
    handed = time.perf_counter()
    resp = await sentry.backend(adm.backend.name).forward(req)
    sentry.metrics.observe_upstream(adm.backend.name, time.perf_counter() - handed)
    usage = adm.usage
    usage.up += len(req.body)  # charged once the backend answered (a failure is not)
    send = sentry.write_watch.send  # ClientTooSlow once a write waited too long
    try:
        head_bytes = encode_response(ResponseHead(
            status=resp.status, headers=resp.headers, grpc_code=resp.grpc_code,
            reason=resp.reason))
        try:
            if resp.inline is not None:
                await send(stream, head_bytes + resp.inline, end=True)
                usage.down += len(resp.inline)
                return None
            await send(stream, head_bytes)
            async for chunk in resp.body:
                await send(stream, chunk)
                usage.down += len(chunk)
            await send(stream, b"", end=True)
        except ClientTooSlow as exc:  # the stream was reset by the watch
            log.warning("client stopped reading the response; stream reset",
                        extra={"reason": str(exc), "backend": adm.backend.name})
            return exc
        except SentryError as exc:  # head already sent: the stream must fail, not end
            log.warning("backend failed mid-response", extra={"reason": str(exc)})
            stream.reset(ErrorCode.INTERNAL_ERROR,
                         f"backend failed mid-response: {exc}"[:200])
            return exc
        return None
    finally:
        await resp.aclose()


async def _grpc_stream(sentry: Sentry, stream: RpcStream, head: RequestHead, adm: Admission,
                       rest: bytes) -> None:
    """A streaming gRPC call (:mod:`pqcnet.sentry.grpc_stream`); the gate slot is held
    until the backend's status went out or either side went away."""
    backend = sentry.backend(adm.backend.name)
    if not isinstance(backend, GrpcBackend):
        raise Denied(f"backend {adm.backend.name!r} is not a gRPC backend")
    req = sentry.prepare(head, b"", adm)
    await proxy_stream(stream, backend.open_stream(req), rest, sentry.write_watch,
                       idle=sentry.config.bounds.grpc_stream_idle_timeout, usage=adm.usage)


async def _pipe_tcp(sentry: Sentry, stream: RpcStream, adm: Admission, rest: bytes) -> None:
    """A raw TCP stream: a backend connection of its own, then :func:`_pipe`."""
    reader, writer = await sentry.tcp_backend(adm.backend.name).connect()
    await _pipe(sentry, stream, reader, writer, rest, ResponseHead(status=200), "tcp pipe",
                adm)


async def _pipe_ws(sentry: Sentry, stream: RpcStream, head: RequestHead, adm: Admission,
                   rest: bytes) -> None:
    """A WebSocket: the backend is asked to upgrade (its own connection, outside the
    pool); after its 101 the pipe carries the WebSocket's bytes, frames untouched. Any
    other answer (404, 401, …) goes back as a plain response and the stream ends."""
    backend = sentry.backend(adm.backend.name)
    if not isinstance(backend, HttpBackend):
        raise Denied(f"backend {adm.backend.name!r} is not an HTTP backend")
    got = await backend.upgrade(sentry.prepare(head, b"", adm))
    if got.reader is None or got.writer is None:
        await sentry.write_watch.send(
            stream, encode_response(ResponseHead(got.status, got.headers)) + got.body, end=True)
        adm.usage.down += len(got.body)
        return
    await _pipe(sentry, stream, got.reader, got.writer, rest,
                ResponseHead(101, got.headers), "websocket", adm)


async def _pipe(sentry: Sentry, stream: RpcStream, reader: asyncio.StreamReader,
                writer: asyncio.StreamWriter, rest: bytes, head: ResponseHead,
                what: str, adm: Admission) -> None:
    """Send ``head``, then bytes both ways between the stream and a backend connection
    until both sides ended, either failed, a write to the client waited
    ``response_write_timeout`` (:class:`ClientTooSlow`) or nothing moved for
    ``tcp_idle_timeout`` (:class:`PipeIdle`): a pipe holds a gate slot for its life,
    so it must not outlive its use. Bytes either way are taken from the tenant's
    ``pipe_rate`` bucket before they are passed on (:func:`_throttle`). The connection
    is closed at the end."""
    watch, idle = sentry.write_watch, sentry.config.bounds.tcp_idle_timeout
    loop = asyncio.get_running_loop()
    moved = loop.time()  # when a byte last came in from either side
    open_sides = 2
    usage, tenant = adm.usage, adm.assertion.tenant

    def touch() -> None:
        nonlocal moved
        moved = loop.time()

    async def up() -> None:
        if rest:
            await _throttle(sentry, tenant, usage, len(rest), touch)
            writer.write(rest)
            usage.up += len(rest)
        while data := await stream.recv():
            touch()
            await _throttle(sentry, tenant, usage, len(data), touch)
            writer.write(data)
            usage.up += len(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    async def down() -> None:
        while chunk := await reader.read(TCP_READ_CHUNK):
            touch()
            await _throttle(sentry, tenant, usage, len(chunk), touch)
            await watch.send(stream, chunk)
            usage.down += len(chunk)
        await watch.send(stream, b"", end=True)

    async def side(run: Callable[[], Awaitable[None]]) -> None:
        nonlocal open_sides
        await run()
        open_sides -= 1
        if not open_sides:
            dog.cancel()  # both directions ended: the pipe is done

    async def watchdog() -> None:
        await until_quiet(lambda: moved, idle)
        stream.reset(ErrorCode.CANCELLED, f"{what} idle for {idle:g}s")
        raise PipeIdle(f"{what} moved nothing for {idle:g}s")

    try:
        await stream.send(encode_response(head))
        async with asyncio.TaskGroup() as tg:
            dog = tg.create_task(watchdog())
            tg.create_task(side(up))
            tg.create_task(side(down))
    except ExceptionGroup as group:
        _, cut = group.split((OSError, ConnectionError, TunnelClosed))
        if cut is not None:  # a bound ended the pipe (or a bug): said, not swallowed
            first = cut.exceptions[0]
            raise first if isinstance(first, SentryError) else cut from None
    finally:
        await close_quietly(writer)


#: Bytes a pipe takes from its tenant's ``pipe_rate`` bucket at a time: small next to
#: the bucket (>= 64 KiB), so the tenant's pipes take turns instead of a small reader
#: always getting the tokens a large one waits to add up.
THROTTLE_PIECE = 16_384
#: Longest single sleep of a throttled pipe: it counts as moving in between (the idle
#: watchdog), and a reload that lifts the limit is seen that soon.
THROTTLE_SLICE_S = 0.5


async def _throttle(sentry: Sentry, tenant: str, usage: Usage, n: int,
                    touch: Callable[[], None]) -> None:
    """Wait until ``tenant``'s pipe-bytes bucket (its plan's ``pipe_rate``, one over
    the workers) gave ``n`` bytes. The pipe reads nothing meanwhile, so TCP and QSTP
    flow control slow its sender: a pipe over its tenant's rate is slowed, never cut
    (``touch`` marks it as moving for the idle watchdog). No ``pipe_rate``: no wait.
    Waits add up in ``usage.pipe_throttled``."""
    limiter, loop = sentry.limiter, asyncio.get_running_loop()
    while n > 0:
        if limiter.plan_for(tenant).pipe is None:  # per piece: a reload may lift it
            return
        piece = min(n, THROTTLE_PIECE)
        wait = limiter.take_bytes(tenant, piece, sentry.clock())
        if wait > 0:
            t0 = loop.time()
            await asyncio.sleep(min(wait, THROTTLE_SLICE_S))
            usage.pipe_throttled += loop.time() - t0
            touch()
            continue
        n -= piece


def tunnel_view(tunnel: Any) -> TunnelView:
    """Adapt a :mod:`pqcnet.qstp.aio` tunnel to what the core needs."""
    return TunnelView(
        peer=tunnel.peer.spiffe_id,
        channel_binding=tunnel.channel_binding(),
        export=lambda label, n: bytes(tunnel.export_keying_material(label, n)),
        pause=_Pauser(tunnel),
    )


class _Pauser:
    """Tunnel-wide PAUSE with retry-after, lifted by a RESUME when it elapses.

    The QSTP peer keeps honouring a PAUSE (waiting its retry-after before each send)
    until it sees RESUME, so every PAUSE is paired with a scheduled RESUME; while one
    is in force no second PAUSE is sent.
    """

    __slots__ = ("_handle", "_tunnel")

    def __init__(self, tunnel: Any) -> None:
        self._tunnel = tunnel
        self._handle: asyncio.TimerHandle | None = None

    def __call__(self, retry_after: float) -> None:
        if self._handle is not None:
            return
        delay = min(max(retry_after, MIN_PAUSE), MAX_PAUSE)
        self._tunnel.pause(None, FLOW_REASON_RATE_LIMITED, delay)
        self._handle = asyncio.get_running_loop().call_later(delay, self._resume)

    def _resume(self) -> None:
        self._handle = None
        if not self._tunnel.closed:
            with contextlib.suppress(PqcnetError):
                self._tunnel.resume(None, FLOW_REASON_RATE_LIMITED)


async def serve_tunnel(sentry: Sentry, tunnel: Any) -> None:
    """Serve every stream of one QSTP tunnel through ``sentry`` until the tunnel ends —
    the one per-tunnel loop, whoever owns the listener (:class:`SentryServer`, or the
    node runtime's QSTP endpoint)."""
    view = tunnel_view(tunnel)
    sentry.metrics.tunnels.inc()
    try:
        async with asyncio.TaskGroup() as tg:
            async for stream in tunnel:
                tg.create_task(handle_stream(sentry, stream, view))
    finally:
        sentry.metrics.tunnels.dec()


def watch_config(sentry: Sentry, path: Path, interval: float = 1.0,
                 on_reload: Callable[[], None] | None = None) -> asyncio.Task[None]:
    """Poll ``path`` every ``interval`` s; on a change, validate it and hot-reload the
    policy part (a file that does not validate is logged and the old policy stays).
    Returns the polling task (cancel it to stop)."""
    from pqcnet.sentry.config import file_fingerprint, load_config

    async def loop() -> None:
        seen = file_fingerprint(path)
        while True:
            await asyncio.sleep(interval)
            now = file_fingerprint(path)
            if now == seen:
                continue
            seen = now
            try:
                sentry.reload_file(load_config(path))
            except PqcnetError as exc:
                log.warning("config reload refused; old policy stays",
                            extra={"error": str(exc)})
                continue
            if on_reload is not None:
                on_reload()

    return asyncio.get_running_loop().create_task(loop(), name="sentry-config-watch")


class SentryServer:
    """Terminates QSTP tunnels and serves their streams; hot-reloads the config file.

    The embeddable server (tests, benchmarks, applications); the ``pqcnet`` commands
    run :class:`pqcnet.runtime.sentry.SentryService`, built on the same
    :func:`serve_tunnel` and :func:`watch_config`.
    """

    def __init__(self, sentry: Sentry, identity: Any, tls_policy: Any = None, *,
                 qstp_config: Any = None) -> None:
        self.sentry = sentry
        self.identity = identity
        self.tls_policy = (tls_policy if tls_policy is not None
                           else sentry.config.tls_policy())
        self.qstp_config = (qstp_config if qstp_config is not None
                            else sentry.config.qstp_config())
        sentry.metrics.bind_budget(self.qstp_config.receive_budget)
        self._server: Any = None
        sentry.metrics.bind_server(lambda: self._server)
        self._watch: asyncio.Task[None] | None = None
        self.tunnels_served = 0
        self.reloads = 0

    @property
    def server(self) -> Any:
        """The QSTP server while listening (identity reload binds to it)."""
        return self._server

    async def start(self, host: str | None = None, port: int | None = None) -> int:
        """Listen (127.0.0.1 by default); returns the bound port."""
        from pqcnet.qstp import aio

        cfg = self.sentry.config
        self._server = await aio.serve(
            self._on_tunnel, host or cfg.listen_host,
            cfg.listen_port if port is None else port,
            self.identity, self.tls_policy, config=self.qstp_config,
            max_tunnels=cfg.bounds.max_tunnels)
        port_: int = self._server.port
        return port_

    async def _on_tunnel(self, tunnel: Any) -> None:
        self.tunnels_served += 1
        await serve_tunnel(self.sentry, tunnel)

    def watch_config(self, path: Any, interval: float = 1.0) -> None:
        """Poll ``path``; on a change, validate and hot-reload the policy part."""

        def counted() -> None:
            self.reloads += 1

        self._watch = watch_config(self.sentry, Path(path), interval, counted)

    async def aclose(self) -> None:
        """Stop listening, end tunnels, close backend pools."""
        try:
            await cancel_and_wait(self._watch)
        finally:  # the listener and backends close even when this close is cancelled
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()
            await self.sentry.aclose()
