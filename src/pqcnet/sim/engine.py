"""The discrete-event clock: a heap of ``(time, sequence, callback, args)``.

Why this and not SimPy/asyncio: see ``docs/decisions/0017-simulation-engine.md`` (the
spike measured ~13x more events/s than either at 1000 nodes). Determinism comes from
two rules: ties in time break by insertion sequence, and every random draw comes from a
named :class:`Streams` stream seeded from ``(seed, name)`` — so adding a stream for a new
feature never shifts the draws of an existing one.

Time is float seconds since the start of the run; :meth:`Engine.now_ms` maps it onto a
fixed virtual epoch for the real code, which wants wall-clock milliseconds.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from typing import Any

from pqcnet.sim.errors import SimStateError

#: Virtual wall clock at t = 0 (2027-01-15T08:00:00Z): real code sees plausible timestamps.
EPOCH_MS = 1_800_000_000_000

Callback = Callable[..., None]


class Engine:
    """Run callbacks in virtual-time order."""

    __slots__ = ("_heap", "_seq", "events", "now")

    def __init__(self) -> None:
        self.now = 0.0
        self.events = 0
        self._seq = 0
        self._heap: list[tuple[float, int, Callback, tuple[Any, ...]]] = []

    def at(self, t: float, fn: Callback, *args: Any) -> None:
        """Run ``fn(*args)`` at virtual time ``t`` (never earlier than now)."""
        if t < self.now:
            raise SimStateError(f"event scheduled at {t:.6f} s, before now {self.now:.6f} s")
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, fn, args))

    def push(self, t: float, fn: Callback, args: tuple[Any, ...]) -> None:
        """:meth:`at` without the check, for callers that add a delay to ``now``
        themselves (the network's hot path)."""
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, fn, args))

    def after(self, delay: float, fn: Callback, *args: Any) -> None:
        """Run ``fn(*args)`` ``delay`` seconds from now."""
        self.at(self.now + max(0.0, delay), fn, *args)

    def now_ms(self) -> int:
        """Virtual wall clock in milliseconds (what the real code's ``clock`` returns)."""
        return EPOCH_MS + int(self.now * 1000)

    def now_s(self) -> float:
        """Virtual wall clock in seconds since the epoch (the ledger's clock)."""
        return EPOCH_MS / 1000 + self.now

    def pending(self) -> int:
        return len(self._heap)

    def run(self, until: float, *, tick: Callable[[float], None] | None = None,
            tick_every: float = 1.0) -> None:
        """Process events up to and including ``until``; ``tick(now)`` is called about
        every ``tick_every`` virtual seconds (progress bars, samplers)."""
        heap = self._heap
        pop = heapq.heappop
        next_tick = self.now + tick_every if tick is not None else float("inf")
        while heap and heap[0][0] <= until:
            t, _, fn, args = pop(heap)
            if t >= next_tick and tick is not None:
                self.now = next_tick
                tick(next_tick)
                next_tick += tick_every
            self.now = t
            fn(*args)
            self.events += 1
        self.now = until
        if tick is not None:
            tick(until)


class Streams:
    """Independent, reproducible random streams: ``streams["latency"]`` etc."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._streams: dict[str, random.Random] = {}

    def __getitem__(self, name: str) -> random.Random:
        rng = self._streams.get(name)
        if rng is None:
            # str seeds go through SHA-512 in CPython: stable across runs and versions
            rng = self._streams[name] = random.Random(f"pqcnet-sim/{self.seed}/{name}")
        return rng

    def derive(self, name: str) -> int:
        """A 64-bit integer derived from the seed (for per-link or per-node values)."""
        return random.Random(f"pqcnet-sim/{self.seed}/derive/{name}").getrandbits(64)
