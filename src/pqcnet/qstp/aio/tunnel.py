"""The asyncio side of one QSTP connection: an ``asyncio.Protocol`` around the sans-IO core.

Bytes from the socket go to :meth:`Connection.receive_data`, the core's events are
dispatched to :class:`~pqcnet.qstp.aio.stream.Stream` objects and futures, and what the
core wants to send is written back, with the core's timer armed on the loop. This is
the only module that knows both the event loop and the protocol state (aioquic's
``asyncio/protocol.py`` plays the same part). Every pending future fails with
:class:`~pqcnet.qstp.errors.TunnelClosed` when the tunnel ends.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

from OpenSSL import SSL

from pqcnet.qstp import _ossl
from pqcnet.qstp import events as ev
from pqcnet.qstp.aio.stream import Stream
from pqcnet.qstp.config import QstpConfiguration
from pqcnet.qstp.connection import Connection
from pqcnet.qstp.errors import HandshakeError, TunnelClosed
from pqcnet.qstp.frames import ErrorCode
from pqcnet.qstp.tls import PeerInfo, channel_binding, export_keying_material, resumable_session

log = logging.getLogger(__name__)

#: Default seconds :meth:`Tunnel.close` waits for unsent bytes to drain before
#: aborting (per tunnel: ``QstpConfiguration.close_timeout``).
CLOSE_TIMEOUT = QstpConfiguration().close_timeout

FlowEvent = ev.FlowPaused | ev.FlowResumed


async def openssl_checked() -> None:
    """Run this process's OpenSSL self-check (a child process, once) off the loop, so
    building the first TLS context does not block it (see :mod:`pqcnet.qstp._ossl`)."""
    if not _ossl.capabilities_known():
        await asyncio.to_thread(_ossl.capabilities)


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


class Tunnel(asyncio.Protocol):
    """A QSTP connection on a TCP transport (the API is in :mod:`pqcnet.qstp.aio`).

    ``on_lost`` is called once when the socket is gone (a server forgets the tunnel).
    """

    def __init__(self, conn: Connection, *,
                 on_lost: Callable[[Tunnel], None] | None = None) -> None:
        self._conn = conn
        self._on_lost = on_lost
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
        if self._on_lost is not None:
            self._on_lost(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._writable.fire()

    def send_goaway(self, reason: str, code: int = ErrorCode.NO_ERROR) -> None:
        """Graceful shutdown: tell the peer to open no new streams (``reason`` says why);
        streams already open finish normally. :meth:`close` ends the tunnel later."""
        if not self._conn.closed:
            self._conn.goaway(code, reason)
            self._process()

    # ------------------------------------------------------------------ internals

    def _end_now(self, code: int, reason: str) -> None:
        """GOAWAY + close_notify right away (a server ending its tunnels); the socket
        closes once the bytes are written. :meth:`close` awaits the same, bounded."""
        if not self._conn.closed:
            self._conn.close(code, reason)
            self._process()

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
        # a flush only when an ACK was queued: most reads of small frames return less
        # than half a window, and an empty flush is a whole _process round
        if not self._conn.closed and self._conn.consumed(stream_id, n):
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
                    if event.end_stream and stream._sent_end:
                        # both ends done. (Not before we ended too: when the core has
                        # already dropped the stream, a reset by the peer follows in this
                        # batch, and the stream must still be here to learn of it.)
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
                # a send() waiting for credit on it must wake to see the stream is gone
                # (a stream whose peer had half-closed keeps no error for its reader)
                self._credit.fire()
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


__all__ = ["CLOSE_TIMEOUT", "FlowEvent", "Tunnel", "openssl_checked"]
