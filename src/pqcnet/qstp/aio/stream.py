"""One QSTP stream as an asyncio byte stream: ``send`` waits for credit, PAUSE and
transport drain; ``recv`` hands back buffered data and returns credit as it is read.

A :class:`Stream` holds no protocol state of its own beyond its receive buffer: the
window, sequence numbers and state live in the sans-IO
:class:`~pqcnet.qstp.connection.Connection`, which the owning
:class:`~pqcnet.qstp.aio.tunnel.Tunnel` drives. The tunnel creates streams and feeds
them (``_on_data`` / ``_fail``).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from pqcnet.errors import PqcnetError
from pqcnet.qstp.connection import StreamState
from pqcnet.qstp.errors import ProtocolError, TunnelClosed
from pqcnet.qstp.frames import ErrorCode

if TYPE_CHECKING:
    from pqcnet.qstp.aio.tunnel import Tunnel

#: Plaintext handed to the core per step of a large ``send()`` and the amount queued
#: before it is encrypted and written at once. Small slices keep asyncio's transport
#: buffer (a bytearray that is memmoved on every partial send) short.
SEND_SLICE = 128 * 1024
#: Largest piece ``recv()`` assembles from several buffered DATA frames.
RECV_COALESCE = 64 * 1024


class Stream:
    """One bidirectional byte stream inside a :class:`Tunnel`."""

    def __init__(self, tunnel: Tunnel, stream_id: int) -> None:
        self._tunnel = tunnel
        self.id = stream_id
        self._chunks: collections.deque[bytes] = collections.deque()
        self._eof = False
        self._error: PqcnetError | None = None
        #: why the stream failed, kept even after the peer's END (``recv`` then reports
        #: a clean end, but a long-lived sender/watcher must still learn of a reset)
        self._failure: PqcnetError | None = None
        self._failure_waiter: asyncio.Future[PqcnetError] | None = None
        self._readable = asyncio.Event()
        self._send_lock = asyncio.Lock()
        #: sends in the slow path, holding or queued for ``_send_lock``
        self._queued_sends = 0
        self._sent_end = False

    def __repr__(self) -> str:
        return f"<qstp.Stream {self.id}>"

    @property
    def tunnel(self) -> Tunnel:
        """The tunnel this stream belongs to."""
        return self._tunnel

    async def send(self, data: bytes | bytearray | memoryview, end: bool = False) -> None:
        """Send ``data`` (any size); waits for credit, PAUSE and transport drain.
        Concurrent sends leave in the order they were made. (The fast path once asked
        only whether the lock was held: in the instant between a slow send releasing it
        and the next queued send running, a new send jumped the queue.)"""
        t = self._tunnel
        conn = t._conn
        if (isinstance(data, bytes) and not end and len(data) <= SEND_SLICE
                and not self._queued_sends and self._error is None
                and not self._sent_end and not t._write_paused and not conn.closed
                and not conn.any_peer_pause and conn.send_window(self.id) >= len(data)):
            # fast path: credit is there and nothing to wait for
            try:
                conn.send_data(self.id, data)
            except TunnelClosed:
                t._process()  # the core closed (keys overdue): flush and report it
                raise
            if conn.pending_send >= SEND_SLICE:
                t._process()
            else:
                t._schedule_flush()
            return
        self._queued_sends += 1
        try:
            async with self._send_lock:
                await self._send(memoryview(data).cast("B"), end)
        finally:
            self._queued_sends -= 1

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
            n = min(window, len(view), SEND_SLICE)
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
            if conn.pending_send >= SEND_SLICE:
                t._process()  # encrypt and write now: keeps the transport buffer small
            else:
                t._schedule_flush()  # small writes in one loop turn share a flush
            view = view[n:]
            while t._write_paused and not conn.closed:  # the transport is full
                if self._error is not None:  # reset meanwhile: stop waiting for it
                    raise self._error
                await t._writable.wait()
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
                if chunks and len(data) < RECV_COALESCE:
                    # a byte stream: hand over what is buffered in one piece (bounded)
                    parts = [data]
                    size = len(data)
                    while chunks and size + len(chunks[0]) <= RECV_COALESCE:
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

    async def wait_failed(self) -> PqcnetError:
        """Wait until the stream fails — reset by either side, or its tunnel ended —
        also after the peer ended its side (when ``recv()`` only returns ``b""``);
        returns the error. Cancel the wait when no longer interested."""
        if self._failure is not None:
            return self._failure
        if self._failure_waiter is None:
            self._failure_waiter = asyncio.get_running_loop().create_future()
        return await asyncio.shield(self._failure_waiter)

    def reset(self, code: int = ErrorCode.CANCELLED, reason: str = "") -> None:
        """Abort the stream in both directions (ERROR frame on this stream)."""
        if self._tunnel.closed:
            return
        self._tunnel._conn.reset_stream(self.id, code, reason)
        self._tunnel._release(self.id)  # the core dropped it: so does the tunnel
        self._fail(TunnelClosed(f"stream {self.id} reset locally"))
        # a send() on this stream waiting for credit, for a peer's RESUME or for a full
        # transport must wake to see the reset (as for a reset by the peer); before, it
        # waited on until the tunnel's next credit or drain, which a peer that stopped
        # reading never brings
        self._tunnel._credit.fire()
        self._tunnel._flow.fire()
        self._tunnel._writable.fire()  # ... or for the transport to drain
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
        if self._failure is None:
            self._failure = error
            if self._failure_waiter is not None and not self._failure_waiter.done():
                self._failure_waiter.set_result(error)
        self._readable.set()


__all__ = ["RECV_COALESCE", "SEND_SLICE", "Stream"]
