"""``WriteWatch``: a response write that waits too long for its client resets the stream.

The sentry writes a backend's response to the client through QSTP flow control; a
client that stops reading makes the write wait — while the request holds a slot of the
concurrency gate (``max_in_flight``, shared by every tenant) and a pooled backend
connection. A few such clients used to shut everyone out for good.

Why a sweep and not ``asyncio.timeout`` around each write: a timeout arms and cancels
a timer per write, about 4.5 µs on uvloop — some 6 % of the sentry's CPU per RPC — for
writes that almost never wait. Here a write costs two dict operations; one task per
sentry looks every ``limit / 4`` seconds and resets the streams whose current write
began ``limit`` seconds ago or more. A write that waited is therefore cut between
``limit`` and ``1.25 * limit``. The deadline is per write, not per response: a slow
client that keeps reading gets everything. Responses, streaming gRPC messages and TCP
pipe bytes towards the client all go through :meth:`WriteWatch.send`.

:func:`until_quiet` is the other bound of a long-lived stream: nothing moving on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from pqcnet._util.tasks import cancel_and_wait
from pqcnet.errors import PqcnetError
from pqcnet.qstp.frames import ErrorCode
from pqcnet.sentry.errors import ClientTooSlow

log = logging.getLogger("pqcnet.sentry")


async def until_quiet(last_moved: Callable[[], float], idle: float) -> None:
    """Return once nothing moved for ``idle`` seconds; ``last_moved()`` is the loop
    time of the last byte or message either way. A deadline pushed forward as data
    flows, not a timer re-armed per chunk: one wake-up per quiet period. Used by TCP
    pipes (``tcp_idle_timeout``) and streaming gRPC calls
    (``grpc_stream_idle_timeout``), which hold a gate slot for their life."""
    loop = asyncio.get_running_loop()
    quiet = 0.0
    while quiet < idle:
        await asyncio.sleep(idle - quiet)
        quiet = loop.time() - last_moved()


class WriteWatch:
    """Streams whose response write is in progress, and when each write began."""

    def __init__(self, limit: float) -> None:
        if limit <= 0:
            raise ValueError("limit must be > 0")
        self.limit = limit
        #: stream -> loop time its current write began
        self._writing: dict[Any, float] = {}
        #: streams reset for a write that waited ``limit`` (the writer reports them)
        self.cut: set[Any] = set()
        self._task: asyncio.Task[None] | None = None

    def watching(self) -> int:
        """Writes in progress (bounded by the RPCs in flight)."""
        return len(self._writing) + len(self.cut)

    async def send(self, stream: Any, data: bytes, end: bool = False) -> None:
        """``stream.send`` under the watch; :class:`ClientTooSlow` if the watch cut it
        (the stream is reset then: nothing more can go out on it)."""
        self.begin(stream)
        try:
            await stream.send(data, end=end)
        except PqcnetError:
            if self.end(stream):
                raise ClientTooSlow(f"client read nothing for {self.limit:g}s") from None
            raise
        finally:  # also when cancelled (the tunnel went away): nothing left watched
            self.end(stream)

    def begin(self, stream: Any) -> None:
        """A write on ``stream`` starts."""
        loop = asyncio.get_running_loop()
        self._writing[stream] = loop.time()
        if self._task is None:
            self._task = loop.create_task(self._sweep(), name="sentry-write-watch")

    def end(self, stream: Any) -> bool:
        """The write on ``stream`` returned, failed or was cancelled; True if the watch
        cut it (the first call after the cut; calling it again is harmless)."""
        self._writing.pop(stream, None)
        if stream in self.cut:
            self.cut.discard(stream)
            return True
        return False

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.limit / 4)
            now = loop.time()
            for stream, began in list(self._writing.items()):
                if now - began >= self.limit and stream not in self.cut:
                    self.cut.add(stream)
                    with contextlib.suppress(PqcnetError):
                        stream.reset(ErrorCode.CANCELLED,
                                     f"client read nothing for {self.limit:g}s")

    async def aclose(self) -> None:
        """Stop the sweep."""
        await cancel_and_wait(self._task)
        self._task = None
