"""Signing and sealing off the event loop, in a small bounded pool of threads.

An ML-DSA-65 signature costs ~1 ms of CPU and a seal (X25519 + ML-KEM-768 + AES-GCM)
a few hundred µs; done inline they stop the event loop that also runs the Waku HTTP
exchanges, polls and receive-side checks. ``cryptography`` releases the GIL while
OpenSSL signs, so on a machine with two cores a worker thread signs while the loop
keeps doing I/O.

What must not move: the envelope counter. :meth:`EnvelopeSigner.reserve
<pqcnet.mesh.envelope.EnvelopeSigner.reserve>` takes it on the loop, at the moment
of the publish call, so counters increase strictly in publish order whatever order
the threads finish in. Messages may then reach the wire slightly out of order (as
concurrent HTTP publishes always could); receivers' sliding replay window
(:attr:`VerifierConfig.replay_window <pqcnet.mesh.envelope.VerifierConfig>`, 1024)
accepts that, and :data:`MAX_PENDING_LIMIT` keeps the pool's share of the reordering
far inside it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from pqcnet.mesh.errors import ConfigError, TransportClosed

T = TypeVar("T")

#: Worker threads by default: one per core of a small host; more only adds switching.
DEFAULT_THREADS = 2
#: Jobs submitted to the threads at once (running + queued); further callers wait on
#: the loop. Bounds the executor's otherwise unbounded queue and the memory of
#: envelopes waiting to be signed.
DEFAULT_MAX_CRYPTO_JOBS = 32
#: Hard cap on ``max_pending``: reordering from the pool stays well under the
#: receivers' default replay window (1024 counters).
MAX_PENDING_LIMIT = 256


class CryptoPool:
    """A bounded thread pool for CPU-heavy envelope work (see module)."""

    def __init__(self, threads: int = DEFAULT_THREADS,
                 max_pending: int = DEFAULT_MAX_CRYPTO_JOBS) -> None:
        if threads < 1 or not 1 <= max_pending <= MAX_PENDING_LIMIT:
            raise ConfigError(f"crypto pool needs threads >= 1 and 1 <= max_pending <= "
                              f"{MAX_PENDING_LIMIT}")
        self.threads = threads
        self.max_pending = max_pending
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="pqcnet-crypto")
        self._slots = asyncio.Semaphore(max_pending)
        self._closed = False
        #: jobs submitted and not finished (never above ``max_pending``)
        self.in_flight = 0
        #: jobs that ended (result, exception or cancelled)
        self.completed = 0

    async def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` on a worker thread; waits for a slot first when ``max_pending`` run."""
        if self._closed:
            raise TransportClosed("crypto pool is closed")
        async with self._slots:
            if self._closed:
                raise TransportClosed("crypto pool is closed")
            self.in_flight += 1
            try:
                return await asyncio.get_running_loop().run_in_executor(self._executor, fn)
            finally:
                self.in_flight -= 1
                self.completed += 1

    def close(self) -> None:
        """Refuse new jobs, drop queued ones; running ones finish in their thread."""
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)
