"""asyncio adapter for QSTP: the only module that touches the event loop and sockets.

It drives a sans-IO :class:`pqcnet.qstp.connection.Connection` from an ``asyncio.Protocol``
(TCP_NODELAY on) and dispatches its events to :class:`Tunnel` and :class:`Stream`.
The whole API other packages use::

    tunnel = await qstp.connect(host, port, identity, policy)      # -> Tunnel
    server = await qstp.serve(handler, host, port, identity, policy)  # handler(tunnel)
    server.port; server.close(); await server.wait_closed()

    stream = tunnel.open_stream()          # sync; the peer sees it with the first send
    await stream.send(data, end=False)     # waits for credit (backpressure) and PAUSE
    data = await stream.recv()             # b"" at end of stream (a byte stream: chunks
                                           # need not match send() calls)
    async for chunk in stream: ...         # same, until end
    body = await stream.read_all(limit)    # everything until end (TunnelClosed if > limit)
    await stream.close()                   # half-close (END_STREAM)
    stream.reset(code, reason)             # abort this stream only (ERROR frame)

    async for stream in tunnel: ...        # streams the peer opens, until the tunnel ends
    await tunnel.accept_stream()           # the same, one at a time (None once ended)
    tunnel.peer                            # qstp.tls.PeerInfo (spiffe_id, group, resumed, ...)
    tunnel.resumed; tunnel.session         # TLS 1.3 ticket -> connect(..., session=...)
    tunnel.pause(stream_id=None, reason=0, retry_after=0.0); tunnel.resume(stream_id=None)
    tunnel.on_flow = callback              # FlowPaused / FlowResumed from the peer
    await tunnel.wait_resumed(stream_id=None)   # honour a peer's PAUSE explicitly
    tunnel.channel_binding(); tunnel.export_keying_material(label, n)
    await tunnel.ping() -> rtt; tunnel.rekey(); await tunnel.close(); await tunnel.wait_closed()
    tunnel.on_key_update; tunnel.key_updates; tunnel.close_reason; tunnel.goaway
    server.tunnels; server.handshake_failures

Backpressure: a receiver returns credit only when the application ``recv()``s, so
a slow reader makes its sender's ``send()`` wait; nothing buffers beyond the windows
in :class:`~pqcnet.qstp.config.QstpConfiguration`. ``send()`` also waits while the peer
has paused the stream or the whole tunnel (until RESUME, or ``retry_after`` if the
peer gave one). Every pending future fails with
:class:`~pqcnet.qstp.errors.TunnelClosed` when the tunnel ends; handshake failures raise
:class:`~pqcnet.qstp.errors.HandshakeError` from :func:`connect`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any, cast

from OpenSSL import SSL

from pqcnet.errors import PqcnetError
from pqcnet.identity import NodeIdentity
from pqcnet.qstp import _ossl
from pqcnet.qstp import events as ev
from pqcnet.qstp.config import QstpConfiguration
from pqcnet.qstp.connection import Connection, StreamState
from pqcnet.qstp.errors import HandshakeError, ProtocolError, TunnelClosed
from pqcnet.qstp.frames import ErrorCode
from pqcnet.qstp.tls import (
    PeerInfo,
    TlsPolicy,
    build_context,
    channel_binding,
    export_keying_material,
    new_connection,
    resumable_session,
    verify_peer,
)

log = logging.getLogger(__name__)

#: Tunnels one :func:`serve` keeps at once; beyond it new TCP connections are
#: closed immediately (bounds memory and handshake CPU a connection flood can take).
DEFAULT_MAX_TUNNELS = 1024
#: Plaintext handed to the core per step of a large ``send()`` and the amount queued
#: before it is encrypted and written at once. Small slices keep asyncio's transport
#: buffer (a bytearray that is memmoved on every partial send) short.
_SEND_SLICE = 128 * 1024
#: Largest piece ``recv()`` assembles from several buffered DATA frames.
_RECV_COALESCE = 64 * 1024
#: Default seconds :meth:`Tunnel.close` waits for unsent bytes to drain before
#: aborting (per tunnel: ``QstpConfiguration.close_timeout``).
CLOSE_TIMEOUT = QstpConfiguration().close_timeout
#: Client contexts kept for reuse (building one parses keys and certificates).
_CONTEXT_CACHE_SIZE = 16

Handler = Callable[["Tunnel"], Awaitable[None]]
FlowEvent = ev.FlowPaused | ev.FlowResumed


class _Pulse:
    """Wake every current waiter; later waiters wait for the next fire()."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, limit: float | None = None) -> None:
        """Wait for the next fire(), or at most ``limit`` seconds."""
        event = self._event
        if limit is None:
            await event.wait()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), limit)


class Stream:
    """One bidirectional byte stream inside a :class:`Tunnel`."""

    def __init__(self, tunnel: Tunnel, stream_id: int) -> None:
        self._tunnel = tunnel
        self.id = stream_id
        self._chunks: collections.deque[bytes] = collections.deque()
        self._eof = False
        self._error: PqcnetError | None = None
        self._readable = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._sent_end = False

    def __repr__(self) -> str:
        return f"<qstp.Stream {self.id}>"

    @property
    def tunnel(self) -> Tunnel:
        """The tunnel this stream belongs to."""
        return self._tunnel

    async def send(self, data: bytes | bytearray | memoryview, end: bool = False) -> None:
        """Send ``data`` (any size); waits for credit, PAUSE and transport drain."""
        t = self._tunnel
        conn = t._conn
        if (isinstance(data, bytes) and not end and len(data) <= _SEND_SLICE
                and not self._send_lock.locked() and self._error is None
                and not self._sent_end and not t._write_paused and not conn.closed
                and not conn.any_peer_pause and conn.send_window(self.id) >= len(data)):
            # fast path: credit is there and nothing to wait for
            try:
                conn.send_data(self.id, data)
            except TunnelClosed:
                t._process()  # the core closed (keys overdue): flush and report it
                raise
            if conn.pending_send >= _SEND_SLICE:
                t._process()
            else:
                t._schedule_flush()
            return
        async with self._send_lock:
            await self._send(memoryview(data).cast("B"), end)

    async def _send(self, view: memoryview, end: bool) -> None:
        t = self._tunnel
        conn = t._conn
        while True:
            t._check_open()
            if self._error is not None:
                raise self._error
            if self._sent_end:
                raise TunnelClosed(f"stream {self.id}: already ended")
            await t._honour_pause(self.id)
            window = conn.send_window(self.id)
            if window <= 0 and len(view):
                if conn.stream_state(self.id) not in (StreamState.OPEN,
                                                      StreamState.HALF_CLOSED_REMOTE):
                    raise TunnelClosed(f"stream {self.id} is closed")
                await t._credit.wait()
                continue
            n = min(window, len(view), _SEND_SLICE)
            last = n == len(view)
            try:
                conn.send_data(self.id, view[:n], end_stream=end and last)
            except TunnelClosed:
                t._process()  # the core closed (keys overdue): flush and report it
                raise
            except ProtocolError as exc:
                raise TunnelClosed(f"stream {self.id}: {exc}") from None
            if end and last:
                self._sent_end = True
                t._release(self.id)
            if conn.pending_send >= _SEND_SLICE:
                t._process()  # encrypt and write now: keeps the transport buffer small
            else:
                t._schedule_flush()  # small writes in one loop turn share a flush
            view = view[n:]
            if t._write_paused:
                await t._drain()
            if last:
                return

    async def recv(self) -> bytes:
        """Next chunk of data; ``b""`` once the peer ended the stream.

        A stream is a byte stream: chunk boundaries need not match the sender's
        ``send()`` calls (small buffered frames are joined, up to 64 KiB)."""
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks.popleft()
                if chunks and len(data) < _RECV_COALESCE:
                    # a byte stream: hand over what is buffered in one piece (bounded)
                    parts = [data]
                    size = len(data)
                    while chunks and size + len(chunks[0]) <= _RECV_COALESCE:
                        part = chunks.popleft()
                        parts.append(part)
                        size += len(part)
                    data = b"".join(parts)
                self._tunnel._consumed(self.id, len(data))
                return data
            if self._eof:
                return b""
            if self._error is not None:
                raise self._error
            self._readable.clear()
            await self._readable.wait()

    async def read_all(self, limit: int) -> bytes:
        """Everything until end of stream; :class:`TunnelClosed` if over ``limit``."""
        parts: list[bytes] = []
        total = 0
        while chunk := await self.recv():
            total += len(chunk)
            if total > limit:
                raise TunnelClosed(f"stream {self.id}: more than {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[bytes]:
        while chunk := await self.recv():
            yield chunk

    async def close(self) -> None:
        """Half-close: tell the peer we send nothing more (idempotent)."""
        if self._sent_end or self._tunnel.closed or self._error is not None:
            return
        await self.send(b"", end=True)

    def reset(self, code: int = ErrorCode.CANCELLED, reason: str = "") -> None:
        """Abort the stream in both directions (ERROR frame on this stream)."""
        if self._tunnel.closed:
            return
        self._tunnel._conn.reset_stream(self.id, code, reason)
        self._fail(TunnelClosed(f"stream {self.id} reset locally"))
        self._tunnel._schedule_flush()

    # -- called by the tunnel
    def _on_data(self, data: bytes, end: bool) -> None:
        if data:
            self._chunks.append(data)
        if end:
            self._eof = True
        self._readable.set()

    def _fail(self, error: PqcnetError) -> None:
        if self._error is None and not self._eof:
            self._error = error
        self._readable.set()


class Tunnel(asyncio.Protocol):
    """A QSTP connection on a TCP transport (see the module docstring for the API)."""

    def __init__(self, conn: Connection, *, server: Server | None = None) -> None:
        self._conn = conn
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._streams: dict[int, Stream] = {}
        self._incoming: asyncio.Queue[Stream | None] = asyncio.Queue()
        self._ready: asyncio.Future[PeerInfo] = self._loop.create_future()
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self._credit = _Pulse()
        self._flow = _Pulse()
        self._writable = _Pulse()
        self._write_paused = False
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._pings: collections.deque[asyncio.Future[float]] = collections.deque()
        self.on_flow: Callable[[FlowEvent], None] | None = None
        """Called for every FLOW frame the peer sends (FlowPaused / FlowResumed)."""
        self.on_key_update: Callable[[ev.KeyUpdated], None] | None = None
        """Called after each TLS KeyUpdate (ours or the peer's)."""
        self.close_reason: ev.ConnectionTerminated | None = None
        """How the tunnel ended (None while open)."""
        self.goaway: ev.GoAwayReceived | None = None
        """The peer's GOAWAY, once received."""

    # ------------------------------------------------------------------ public API

    @property
    def peer(self) -> PeerInfo:
        """Verified peer identity and negotiated TLS parameters."""
        if self._conn.peer is None:
            raise TunnelClosed("tunnel handshake has not completed")
        peer: PeerInfo = self._conn.peer
        return peer

    @property
    def resumed(self) -> bool:
        """Whether this tunnel resumed an earlier TLS session (no certificate signing)."""
        return bool(self.peer.resumed)

    @property
    def session(self) -> SSL.Session | None:
        """TLS session to pass as ``connect(..., session=...)`` (client; after the
        server's ticket arrived, which :func:`connect` waits for)."""
        if self._conn.closed and self._conn.peer is None:
            return None
        return resumable_session(self._conn.tls)

    @property
    def closed(self) -> bool:
        """True once the tunnel ended."""
        return self._conn.closed

    @property
    def key_updates(self) -> int:
        """TLS KeyUpdates so far (both directions)."""
        return self._conn.key_updates

    @property
    def connection(self) -> Connection:
        """The sans-IO core (for diagnostics and tests)."""
        return self._conn

    def channel_binding(self) -> bytes:
        """32 bytes unique to this TLS connection (RFC 9266-style exporter)."""
        return channel_binding(self._conn.tls)

    def export_keying_material(self, label: bytes, n: int = 32,
                               context: bytes | None = None) -> bytes:
        """TLS exporter output, equal on both ends."""
        return export_keying_material(self._conn.tls, label, n, context)

    def open_stream(self) -> Stream:
        """A new outgoing stream (synchronous; the peer learns of it on first send)."""
        self._check_open()
        sid = self._conn.open_stream()
        stream = Stream(self, sid)
        self._streams[sid] = stream
        return stream

    def __aiter__(self) -> AsyncIterator[Stream]:
        return self._iter_incoming()

    async def _iter_incoming(self) -> AsyncIterator[Stream]:
        while True:
            stream = await self.accept_stream()
            if stream is None:
                return
            yield stream

    async def accept_stream(self) -> Stream | None:
        """Next stream the peer opened, or None once the tunnel ended."""
        if self._incoming.empty() and self.closed:
            return None
        stream = await self._incoming.get()
        if stream is None:
            self._incoming.put_nowait(None)  # keep the end marker for other waiters
        return stream

    def pause(self, stream_id: int | None = None, reason: int = 0,
              retry_after: float = 0.0) -> None:
        """Ask the peer to stop sending on a stream (None: the whole tunnel)."""
        self._check_open()
        self._conn.pause(stream_id or 0, reason, retry_after)
        self._schedule_flush()

    def resume(self, stream_id: int | None = None, reason: int = 0) -> None:
        """Lift a :meth:`pause`."""
        self._check_open()
        self._conn.resume(stream_id or 0, reason)
        self._schedule_flush()

    def peer_paused(self, stream_id: int | None = None) -> ev.FlowPaused | None:
        """The peer's active PAUSE for a stream (None: tunnel-wide), if any."""
        return self._conn.peer_paused(stream_id or 0)

    async def wait_resumed(self, stream_id: int | None = None) -> None:
        """Return once the peer's PAUSE (tunnel-wide, and on ``stream_id``) is lifted
        or its retry-after elapsed; raises TunnelClosed if the tunnel ends."""
        await self._honour_pause(stream_id or 0)

    async def ping(self) -> float:
        """Round-trip time in seconds, measured with a PING/PONG."""
        self._check_open()
        self._conn.ping(self._loop.time())
        fut: asyncio.Future[float] = self._loop.create_future()
        self._pings.append(fut)
        self._flush()
        return await fut

    def rekey(self) -> None:
        """TLS 1.3 KeyUpdate now (the connection also does it by bytes and time)."""
        self._check_open()
        self._conn.rekey(self._loop.time())
        self._process()

    async def close(self, code: int = ErrorCode.NO_ERROR, reason: str = "closed") -> None:
        """GOAWAY + TLS close_notify, then close the socket; fails pending waits.

        A peer that stops reading cannot hold us: after ``config.close_timeout``
        seconds (:data:`CLOSE_TIMEOUT` by default) the socket is aborted with
        whatever is still unsent."""
        if not self._conn.closed:
            self._conn.close(code, reason)
            self._process()
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.close()
        try:
            async with asyncio.timeout(self._conn.config.close_timeout):
                await self.wait_closed()
        except TimeoutError:
            if self._transport is not None:
                self._transport.abort()
            await self.wait_closed()

    async def wait_closed(self) -> None:
        """Wait until the socket is gone."""
        if self._transport is None and not self._closed.done():
            self._closed.set_result(None)
        await asyncio.shield(self._closed)

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # any stream transport: uvloop's TCPTransport does not subclass
        # asyncio.Transport, and only write/close/abort/get_extra_info are used
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._conn.start(self._loop.time())
        self._process()

    def data_received(self, data: bytes) -> None:
        self._conn.receive_data(data, self._loop.time())
        self._process()

    def eof_received(self) -> bool | None:
        self._conn.receive_eof(self._loop.time())
        self._process()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._conn.closed:
            self._conn.receive_eof(self._loop.time())
            self._dispatch()
        self._transport = None
        if self._timer is not None:
            self._timer.cancel()
        self._fire_all()
        if not self._closed.done():
            self._closed.set_result(None)
        if self._server is not None:
            self._server._forget(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._writable.fire()

    # ------------------------------------------------------------------ internals

    def _check_open(self) -> None:
        if self._conn.closed:
            reason = self.close_reason.reason if self.close_reason else "closed"
            raise TunnelClosed(f"tunnel is closed: {reason}")

    async def _drain(self) -> None:
        while self._write_paused and not self._conn.closed:
            await self._writable.wait()

    async def _honour_pause(self, stream_id: int) -> None:
        conn = self._conn
        while True:
            self._check_open()
            paused = conn.peer_paused(0) or (conn.peer_paused(stream_id) if stream_id else None)
            if paused is None:
                return
            await self._flow.wait(paused.retry_after or None)
            if paused.retry_after and conn.peer_paused(paused.stream_id) is paused:
                return  # the peer said "retry after": we did wait that long

    def _release(self, stream_id: int) -> None:
        """Drop our reference once the core released the stream (both ends done)."""
        if self._conn.stream_state(stream_id) is None:
            self._streams.pop(stream_id, None)

    def _consumed(self, stream_id: int, n: int) -> None:
        if not self._conn.closed:
            self._conn.consumed(stream_id, n)
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self._process()

    def _process(self) -> None:
        self._dispatch()
        self._flush()
        self._arm_timer()

    def _flush(self) -> None:
        data = self._conn.data_to_send()
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if data:
            transport.write(data)
        if self._conn.closed:
            transport.close()

    def _arm_timer(self) -> None:
        at = self._conn.get_timer()
        if at == self._timer_at:
            return
        if at is not None and self._timer_at is not None and at > self._timer_at:
            return  # the earlier timer fires first; handle_timer() tolerates early calls
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = at
        if at is not None:
            self._timer = self._loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self._conn.handle_timer(self._loop.time())
        self._process()

    def _dispatch(self) -> None:
        conn = self._conn
        while (event := conn.next_event()) is not None:
            if isinstance(event, ev.DataReceived):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream._on_data(event.data, event.end_stream)
                    if event.end_stream:
                        self._release(event.stream_id)
                else:  # the stream object is gone: give the credit back
                    conn.consumed(event.stream_id, len(event.data))
            elif isinstance(event, ev.CreditAvailable):
                self._credit.fire()
            elif isinstance(event, ev.StreamOpened):
                if self._incoming.qsize() >= conn.config.max_streams:
                    # the application is not accepting: refuse rather than queue forever
                    conn.reset_stream(event.stream_id, ErrorCode.STREAM_LIMIT,
                                      "too many streams waiting to be accepted")
                    continue
                stream = Stream(self, event.stream_id)
                self._streams[event.stream_id] = stream
                self._incoming.put_nowait(stream)
            elif isinstance(event, ev.FlowPaused | ev.FlowResumed):
                self._flow.fire()
                if self.on_flow is not None:
                    self._callback(self.on_flow, event)
            elif isinstance(event, ev.HandshakeCompleted):
                if not self._ready.done():
                    self._ready.set_result(event.peer)
            elif isinstance(event, ev.PingAcknowledged):
                if self._pings:
                    fut = self._pings.popleft()
                    if not fut.done():
                        fut.set_result(event.rtt)
            elif isinstance(event, ev.KeyUpdated):
                if self.on_key_update is not None:
                    self._callback(self.on_key_update, event)
            elif isinstance(event, ev.StreamReset):
                stream = self._streams.pop(event.stream_id, None)
                if stream is not None:
                    stream._fail(TunnelClosed(
                        f"stream {event.stream_id} reset by peer: {event.reason or event.code}"))
            elif isinstance(event, ev.GoAwayReceived):
                self.goaway = event
            elif isinstance(event, ev.ConnectionTerminated):
                self._on_terminated(event)

    def _callback(self, fn: Callable[[Any], None], event: Any) -> None:
        try:
            fn(event)
        except Exception:
            log.exception("tunnel callback failed", extra={"event": type(event).__name__})

    def _on_terminated(self, event: ev.ConnectionTerminated) -> None:
        self.close_reason = event
        if not self._ready.done():
            self._ready.set_exception(HandshakeError(event.reason))
            self._ready.exception()  # retrieved: a server-side failure has no awaiter
        error = TunnelClosed(f"tunnel closed: {event.reason}")
        for stream in self._streams.values():
            stream._fail(error)
        while self._pings:
            fut = self._pings.popleft()
            if not fut.done():
                fut.set_exception(error)
        self._incoming.put_nowait(None)
        self._fire_all()
        # handshake refusals are the caller's error to report (connect raises; the
        # server counts them), so they log at INFO; a broken open tunnel warns
        quiet = event.error_code == 0 or event.during_handshake
        level = logging.INFO if quiet else logging.WARNING
        log.log(level, "tunnel closed", extra={
            "code": event.error_code, "reason": event.reason, "by_peer": event.by_peer,
            "during_handshake": event.during_handshake})

    def _fire_all(self) -> None:
        self._credit.fire()
        self._flow.fire()
        self._writable.fire()


# --------------------------------------------------------------------------- client


async def openssl_checked() -> None:
    """Run this process's OpenSSL self-check (a child process, once) off the loop, so
    building the first TLS context does not block it (see :mod:`pqcnet.qstp._ossl`)."""
    if not _ossl.capabilities_known():
        await asyncio.to_thread(_ossl.capabilities)


_contexts: collections.OrderedDict[tuple[int, TlsPolicy], tuple[NodeIdentity, SSL.Context]] = (
    collections.OrderedDict()
)


def client_context(identity: NodeIdentity, policy: TlsPolicy) -> SSL.Context:
    """A cached client context for (identity, policy): building one parses keys and
    certificates, and a resumed session must be offered on the context that made it."""
    key = (id(identity), policy)
    hit = _contexts.get(key)
    if hit is not None and hit[0] is identity:
        _contexts.move_to_end(key)
        return hit[1]
    ctx = build_context(identity, policy, server=False)
    _contexts[key] = (identity, ctx)  # a strong ref: the id cannot be reused meanwhile
    while len(_contexts) > _CONTEXT_CACHE_SIZE:
        _contexts.popitem(last=False)
    return ctx


async def connect(
    host: str,
    port: int,
    identity: NodeIdentity,
    policy: TlsPolicy | None = None,
    *,
    config: QstpConfiguration | None = None,
    session: SSL.Session | None = None,
    context: SSL.Context | None = None,
) -> Tunnel:
    """Open a QSTP tunnel; returns once the server accepted us (mutual auth done).

    Raises :class:`HandshakeError` (refused, timed out) or :class:`TunnelClosed`
    (TCP connect failed).
    """
    policy = policy or TlsPolicy()
    config = config or QstpConfiguration()
    await openssl_checked()
    ctx = context or client_context(identity, policy)
    tls = new_connection(ctx, server=False, session=session)
    conn = Connection(tls, client=True, config=config,
                      verify=partial(verify_peer, identity=identity, policy=policy))
    loop = asyncio.get_running_loop()
    tunnel = Tunnel(conn)
    try:
        async with asyncio.timeout(config.handshake_timeout):
            await loop.create_connection(lambda: tunnel, host, port)
    except TimeoutError:
        raise HandshakeError(f"TCP connect to {host}:{port} timed out") from None
    except OSError as exc:
        raise TunnelClosed(f"cannot connect to {host}:{port}: "
                           f"{exc.strerror or exc}") from None
    try:
        await tunnel._ready
    except asyncio.CancelledError:
        await tunnel.close(ErrorCode.CANCELLED, "connect cancelled")
        raise
    except HandshakeError:
        await tunnel.close(ErrorCode.HANDSHAKE_FAILED, "handshake failed")
        raise
    log.info("tunnel up", extra={"peer": str(tunnel.peer.spiffe_id),
                                 "group": tunnel.peer.group, "resumed": tunnel.resumed})
    return tunnel


# --------------------------------------------------------------------------- server


class Server:
    """A listening QSTP endpoint returned by :func:`serve`."""

    def __init__(self, handler: Handler, identity: NodeIdentity, policy: TlsPolicy,
                 config: QstpConfiguration, max_tunnels: int) -> None:
        self._handler = handler
        self._identity = identity
        self._policy = policy
        self._config = config
        self._max_tunnels = max_tunnels
        self._tls_context = build_context(identity, policy, server=True)
        self._verify = partial(verify_peer, identity=identity, policy=policy)
        self._tunnels: set[Tunnel] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.handshake_failures = 0
        """Handshakes refused or timed out since start."""

    @property
    def port(self) -> int:
        """The bound TCP port (useful with ``port=0``)."""
        assert self._server is not None and self._server.sockets
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def tunnels(self) -> int:
        """Tunnels currently connected (handshaking or open)."""
        return len(self._tunnels)

    def _new_tunnel(self) -> asyncio.Protocol:
        if len(self._tunnels) >= self._max_tunnels:
            log.warning("tunnel limit reached; refusing connection",
                        extra={"max_tunnels": self._max_tunnels})
            return _Refuse()
        tls = new_connection(self._tls_context, server=True)
        conn = Connection(tls, client=False, config=self._config, verify=self._verify)
        tunnel = Tunnel(conn, server=self)
        self._tunnels.add(tunnel)
        task = asyncio.get_running_loop().create_task(self._run(tunnel))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return tunnel

    def _forget(self, tunnel: Tunnel) -> None:
        self._tunnels.discard(tunnel)

    async def _run(self, tunnel: Tunnel) -> None:
        try:
            await tunnel._ready
        except HandshakeError as exc:
            self.handshake_failures += 1
            by_peer = tunnel.close_reason is not None and tunnel.close_reason.by_peer
            log.info("handshake refused", extra={"reason": str(exc), "by_peer": by_peer})
            await tunnel.close()
            return
        try:
            await self._handler(tunnel)
        except (TunnelClosed, HandshakeError) as exc:
            log.info("tunnel handler ended", extra={"reason": str(exc)})
        except asyncio.CancelledError:
            await tunnel.close(ErrorCode.CANCELLED, "server shutting down")
            raise
        except Exception as exc:
            log.exception("tunnel handler failed", extra={"peer": str(tunnel.peer.spiffe_id)})
            await tunnel.close(ErrorCode.INTERNAL_ERROR, f"handler failed: {type(exc).__name__}")
            return
        await tunnel.close()

    def close(self) -> None:
        """Stop listening, end every tunnel (GOAWAY) and cancel running handlers."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for tunnel in list(self._tunnels):
            if not tunnel.closed:
                tunnel._conn.close(ErrorCode.NO_ERROR, "server shutting down")
                tunnel._process()

    async def wait_closed(self) -> None:
        """Wait for handlers and sockets to finish after :meth:`close`."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        for tunnel in list(self._tunnels):
            await tunnel.close()  # bounded by config.close_timeout
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()


class _Refuse(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


async def serve(
    handler: Handler,
    host: str,
    port: int,
    identity: NodeIdentity,
    policy: TlsPolicy | None = None,
    *,
    config: QstpConfiguration | None = None,
    max_tunnels: int = DEFAULT_MAX_TUNNELS,
    backlog: int = 128,
) -> Server:
    """Listen for QSTP tunnels; ``await handler(tunnel)`` runs per verified tunnel,
    and the tunnel is closed when the handler returns."""
    await openssl_checked()
    server = Server(handler, identity, policy or TlsPolicy(), config or QstpConfiguration(),
                    max_tunnels)
    loop = asyncio.get_running_loop()
    server._server = await loop.create_server(server._new_tunnel, host, port, backlog=backlog)
    return server


__all__ = [
    "CLOSE_TIMEOUT",
    "DEFAULT_MAX_TUNNELS",
    "Server",
    "Stream",
    "Tunnel",
    "client_context",
    "connect",
    "serve",
]
