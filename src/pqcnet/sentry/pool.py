"""A sidecar's pool of sentries: health-checked, least-outstanding-requests, failover.

:class:`SentryPool` puts several :class:`~pqcnet.sentry.sidecar.Sidecar` objects (one
tunnel and assertion per sentry) behind the same small surface the local faces use
(``open`` / ``response`` / ``call``), so the HTTP, gRPC and TCP faces work unchanged
over one sentry or many.

* **Balancing**: each request goes to the healthy sentry with the fewest requests
  outstanding (opened and still waiting for their response head); ties rotate.
* **Health**: a sentry is marked down when a dial, a send or a response fails, and
  taken out of rotation; a background check (every ``interval`` s) re-dials down
  sentries after an exponential backoff (``backoff`` doubling up to ``max_backoff``)
  and pings the tunnels of healthy ones (a QSTP PING that gets no PONG within
  ``timeout`` marks the sentry down). If every sentry is down, requests still try
  them (soonest retry first) rather than failing without an attempt.
* **Failover**: a request that could not be *sent* (dial or send failed) is tried on
  the next sentry whatever it is — the sentry forwards nothing before a request's end
  of stream. A request that was sent but whose sentry failed before the response head
  arrived is replayed on another sentry only when the caller says it is
  **idempotent** (the HTTP face: GET/HEAD/OPTIONS/PUT/DELETE/TRACE or an
  ``Idempotency-Key`` header); otherwise the app gets the failure (502 / UNAVAILABLE),
  because the first sentry may already have forwarded it. A request whose body was
  streamed (``open(..., end=False)``) is never replayed: the pool does not keep a copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pqcnet._util.tasks import cancel_and_wait
from pqcnet.errors import PqcnetError
from pqcnet.sentry.errors import BackendError
from pqcnet.sentry.sidecar import Sidecar
from pqcnet.sentry.wire import RequestHead, ResponseHead

log = logging.getLogger("pqcnet.sidecar")

#: Seconds between health checks.
HEALTH_INTERVAL = 1.0
#: Seconds a dial or PING may take before the sentry counts as down.
HEALTH_TIMEOUT = 2.0
#: First / longest wait before re-dialling a down sentry, seconds.
BACKOFF = 0.5
MAX_BACKOFF = 10.0


@dataclass(slots=True)
class Member:
    """One sentry of the pool and what the pool knows about it."""

    #: "host:port", for logs and status
    name: str
    #: the tunnel + assertion to this sentry
    sidecar: Sidecar
    #: requests opened whose response head has not arrived yet
    outstanding: int = 0
    #: in rotation
    healthy: bool = True
    #: clock time before which a down member is not re-dialled by the health check
    retry_at: float = 0.0
    #: current backoff, seconds
    backoff: float = BACKOFF
    #: requests that completed with a response head through this member
    served: int = 0
    #: times this member was marked down
    failures: int = 0
    #: called with each answered request's round trip in seconds (metrics), if set
    observe: Callable[[float], None] | None = None


class _Tracked:
    """A stream opened through the pool: remembers its member and releases the
    member's outstanding slot exactly once (response head, reset or close)."""

    __slots__ = ("_done", "member", "started", "stream")

    def __init__(self, stream: Any, member: Member, started: float) -> None:
        self.stream = stream
        self.member = member
        #: perf_counter() when the request was handed to the pool (round-trip metric)
        self.started = started
        self._done = False
        member.outstanding += 1

    def release(self) -> None:
        if not self._done:
            self._done = True
            self.member.outstanding -= 1

    async def send(self, data: bytes, end: bool = False) -> None:
        await self.stream.send(data, end=end)

    async def recv(self) -> bytes:
        data: bytes = await self.stream.recv()
        return data

    def reset(self, *args: Any, **kw: Any) -> None:
        self.release()
        self.stream.reset(*args, **kw)

    async def close(self) -> None:
        self.release()
        await self.stream.close()


class SentryPool:
    """Several sentries behind one sidecar surface (see the module docstring)."""

    def __init__(self, members: Sequence[tuple[str, Sidecar]], *,
                 interval: float = HEALTH_INTERVAL, timeout: float = HEALTH_TIMEOUT,
                 backoff: float = BACKOFF, max_backoff: float = MAX_BACKOFF,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not members:
            raise ValueError("a sentry pool needs at least one sentry")
        self.members = [Member(name, sc, backoff=backoff) for name, sc in members]
        self.interval, self.timeout = interval, timeout
        self.backoff, self.max_backoff = backoff, max_backoff
        self._clock = clock
        self._turn = 0
        self._health: asyncio.Task[None] | None = None
        #: requests replayed on another sentry after the first one failed
        self.failovers = 0

    # ------------------------------------------------------------------ choice

    def pick(self, exclude: Sequence[Member] = ()) -> Member | None:
        """The healthy member with the fewest outstanding requests (ties rotate); if
        none is healthy, the down member to retry soonest; None when all excluded."""
        n = len(self.members)
        self._turn = (self._turn + 1) % n
        best: Member | None = None
        for i in range(n):
            m = self.members[(self._turn + i) % n]
            if m.healthy and m not in exclude and (
                    best is None or m.outstanding < best.outstanding):
                best = m
        if best is None:
            rest = [m for m in self.members if m not in exclude]
            best = min(rest, key=lambda m: m.retry_at) if rest else None
        return best

    def _down(self, m: Member, why: object) -> None:
        if m.healthy:
            m.failures += 1
            log.warning("sentry marked down", extra={"sentry": m.name, "error": str(why)})
        else:
            m.backoff = min(m.backoff * 2, self.max_backoff)
        m.healthy = False
        m.retry_at = self._clock() + m.backoff

    def _up(self, m: Member) -> None:
        if not m.healthy:
            log.info("sentry back in rotation", extra={"sentry": m.name})
        m.healthy = True
        m.backoff = self.backoff

    # ------------------------------------------------------------------ requests

    async def _open_on(self, m: Member, head: RequestHead, body: bytes, end: bool,
                       started: float) -> _Tracked:
        try:
            stream = await m.sidecar.open(head, body, end=end)
        except BackendError as exc:
            self._down(m, exc)
            raise
        except (PqcnetError, OSError) as exc:  # the dial itself failed
            self._down(m, exc)
            raise BackendError(f"sentry {m.name} unreachable: {exc}") from None
        return _Tracked(stream, m, started)

    async def open(self, head: RequestHead, body: bytes = b"", *, end: bool = True
                   ) -> _Tracked:
        """Open a stream on the best sentry and send head + body; a sentry that cannot
        be reached is marked down and the next one tried."""
        tried: list[Member] = []
        last: BackendError | None = None
        started = time.perf_counter()
        while (m := self.pick(tried)) is not None:
            tried.append(m)
            try:
                return await self._open_on(m, head, body, end, started)
            except BackendError as exc:
                last = exc.with_traceback(None)  # no tb: no cycle via its frame
        raise BackendError(f"no sentry reachable ({len(tried)} tried): {last}")

    async def response(self, stream: Any) -> tuple[ResponseHead, Any, bytes]:
        """The response head of a stream from :meth:`open`; a failure marks its sentry
        down (the request is not replayed: see :meth:`call`)."""
        m: Member = stream.member
        try:
            got = await m.sidecar.response(stream)
        except BackendError as exc:
            self._down(m, exc)
            raise
        finally:
            stream.release()
        m.served += 1
        if m.observe is not None:
            m.observe(time.perf_counter() - stream.started)
        self._up(m)
        return got

    async def call(self, head: RequestHead, body: bytes, *, idempotent: bool = False
                   ) -> tuple[ResponseHead, Any, bytes]:
        """Send one RPC. A sentry that fails after the request went out makes the call
        fail unless ``idempotent``, in which case the next sentry gets it."""
        tried: list[Member] = []
        last: BackendError | None = None
        started = time.perf_counter()  # a failover's round trip counts the failed try
        while (m := self.pick(tried)) is not None:
            tried.append(m)
            try:
                stream = await self._open_on(m, head, body, True, started)
            except BackendError as exc:
                last = exc.with_traceback(None)  # no tb: no cycle via its frame
                continue  # nothing reached that sentry's backend: any request may move
            try:
                return await self.response(stream)
            except BackendError as exc:
                if not idempotent:
                    raise
                last = exc.with_traceback(None)  # no tb: no cycle via its frame
                self.failovers += 1
                log.info("idempotent request replayed on another sentry",
                         extra={"failed": m.name, "error": str(exc)})
        raise BackendError(f"no sentry answered ({len(tried)} tried): {last}")

    # ------------------------------------------------------------------ health

    async def check(self) -> None:
        """One health pass over every member (the background task calls this)."""
        await asyncio.gather(*(self._check(m) for m in self.members))

    async def _check(self, m: Member) -> None:
        if not m.healthy and self._clock() < m.retry_at:
            return
        try:
            async with asyncio.timeout(self.timeout):
                s = await m.sidecar.session()  # dials when there is no live tunnel
                await s.tunnel.ping()
        except (PqcnetError, OSError, TimeoutError) as exc:
            self._down(m, exc or "health check timed out")
            with contextlib.suppress(Exception):
                await m.sidecar.aclose()
            return
        self._up(m)

    def start(self) -> None:
        """Start the background health check (dials every sentry once up front)."""
        if self._health is None:
            self._health = asyncio.get_running_loop().create_task(self._loop(),
                                                                  name="sentry-pool-health")

    async def _loop(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self.interval)

    def status(self) -> list[dict[str, Any]]:
        """Per-sentry state (for logs, tests and an operator's status line)."""
        return [{"sentry": m.name, "healthy": m.healthy, "outstanding": m.outstanding,
                 "served": m.served, "failures": m.failures} for m in self.members]

    async def aclose(self) -> None:
        """Stop the health check and close every tunnel."""
        try:
            await cancel_and_wait(self._health)
        finally:  # the tunnels close even when this close is cancelled
            self._health = None
            for m in self.members:
                await m.sidecar.aclose()


__all__ = ["Member", "SentryPool"]
