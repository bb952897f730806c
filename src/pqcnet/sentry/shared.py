"""Limiter state shared by the worker processes of one sentry (``--workers N``).

With N workers on one port (SO_REUSEPORT), a tenant's token bucket and the global
concurrency gate must stay *one* bucket and *one* gate, or a client spreading its
tunnels over the workers would get N times its plan. The state lives in **shared
memory** (a file in ``/dev/shm`` mapped by every worker) guarded by one process-shared
lock — not in Redis: a take is a lock, a few struct reads/writes and an unlock (≈ 2 µs),
where a Redis round trip per RPC would cost more than the whole proxied call's CPU
budget and add a network dependency to the edge. Workers are processes on one host;
pools of sentries on several hosts remain independent (each host its own limits).

Layout (little-endian)::

    header   magic u64 ‖ slots u32 ‖ workers u32
    gate     workers x i64   in-flight per worker (a dead worker's count is zeroed by
                             the supervisor, so a crash cannot leak gate capacity)
    table    slots x (fingerprint u64 ‖ tokens f64 ‖ last f64 ‖ spare u64)

A bucket is found by an 8-byte BLAKE2b fingerprint of ``(tenant, client)`` (Python's
``hash`` differs per process) in an open-addressed table probed :data:`PROBE` slots
deep; a full window evicts its least recently used bucket, which comes back full —
the same forgetting as the single-process limiter's LRU bound.

:class:`SharedRateLimiter` and :class:`SharedConcurrencyGate` subclass the
single-process ones (:mod:`pqcnet.sentry.limiter`) and keep their interface, so the
core, hot reload and governance directives are unchanged; :func:`install` swaps them
into a :class:`~pqcnet.sentry.core.Sentry`.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import struct
import tempfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

from pqcnet.sentry.errors import ConcurrencyLimited, RateLimited, SentryConfigError
from pqcnet.sentry.limiter import (
    DEFAULT_MAX_CLIENTS,
    GATE_RETRY_AFTER,
    ConcurrencyGate,
    Plan,
    RateLimiter,
)

MAGIC = 0x70716353_4C494D31  # "pqcSLIM1"
#: Slots probed per lookup before the least recently used one is evicted.
PROBE = 16
#: Most worker processes one sentry may run.
MAX_WORKERS = 64
_HEAD = struct.Struct("<QII")
_I64 = struct.Struct("<q")
_SLOT = struct.Struct("<QddQ")


def fingerprint(tenant: str, client: str) -> int:
    """Stable 64-bit bucket key (never 0: 0 marks an empty slot)."""
    d = hashlib.blake2b(f"{tenant}\x00{client}".encode(), digest_size=8).digest()
    return int.from_bytes(d, "little") or 1


class SharedLimitState:
    """The shared segment (a file in ``/dev/shm``, mapped by every process) plus its
    lock. The supervisor :meth:`create` s it; each worker :meth:`attach` es by path with
    the lock it was handed."""

    def __init__(self, path: str, lock: Any, *, owner: bool) -> None:
        self.path = path
        self.lock = lock
        self.owner = owner
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), 0)
        self.buf = memoryview(self._map)
        magic, self.slots, self.workers = _HEAD.unpack_from(self.buf, 0)
        if magic != MAGIC:
            self.close()
            raise SentryConfigError(f"shared limiter segment {path!r} is not ours")
        self._gate_at = _HEAD.size
        self._table_at = self._gate_at + _I64.size * self.workers

    @classmethod
    def create(cls, lock: Any, *, workers: int, slots: int = 2 * DEFAULT_MAX_CLIENTS
               ) -> SharedLimitState:
        """A zeroed segment for ``workers`` processes and ``slots`` buckets."""
        if not 1 <= workers <= MAX_WORKERS:
            raise SentryConfigError(f"workers must be 1..{MAX_WORKERS}, got {workers}")
        size = _HEAD.size + _I64.size * workers + _SLOT.size * slots
        # mkstemp: a fresh 0600 file with a random name (RAM-backed where /dev/shm exists)
        shm_dir = "/dev/shm"  # noqa: S108
        where = shm_dir if os.path.isdir(shm_dir) else None
        fd, path = tempfile.mkstemp(prefix="pqcnet-sentry-limits-", dir=where)
        try:
            os.ftruncate(fd, size)  # zero-filled
            os.pwrite(fd, _HEAD.pack(MAGIC, slots, workers), 0)
        finally:
            os.close(fd)
        return cls(path, lock, owner=True)

    @classmethod
    def attach(cls, path: str, lock: Any) -> SharedLimitState:
        """Map the supervisor's segment (in a worker)."""
        return cls(path, lock, owner=False)

    # -- gate (caller holds the lock)

    def gate_total(self) -> int:
        buf, at = self.buf, self._gate_at
        return sum(int(_I64.unpack_from(buf, at + 8 * w)[0]) for w in range(self.workers))

    def gate_add(self, worker: int, n: int) -> None:
        at = self._gate_at + 8 * worker
        _I64.pack_into(self.buf, at, _I64.unpack_from(self.buf, at)[0] + n)

    def reset_worker(self, worker: int) -> None:
        """Forget a dead worker's in-flight count (supervisor)."""
        with self.lock:
            _I64.pack_into(self.buf, self._gate_at + 8 * worker, 0)

    # -- buckets (caller holds the lock)

    def _slot(self, fp: int, now: float, plan: Plan) -> int:
        """Offset of ``fp``'s slot, claiming (full bucket) or evicting as needed."""
        buf = self.buf
        base = fp % self.slots
        victim, oldest = -1, float("inf")
        for i in range(PROBE):
            at: int = self._table_at + _SLOT.size * ((base + i) % self.slots)
            key, _tokens, last, _spare = _SLOT.unpack_from(buf, at)
            if key == fp:
                return at
            if key == 0:
                victim = at
                break
            if last < oldest:
                victim, oldest = at, last
        _SLOT.pack_into(buf, victim, fp, plan.burst, now, 0)
        return victim

    def take(self, fp: int, plan: Plan, now: float, n: float = 1.0) -> tuple[float, float]:
        """Refill + take ``n`` atomically: (wait seconds, 0.0 = taken; tokens left)."""
        with self.lock:
            at = self._slot(fp, now, plan)
            _key, tokens, last, _spare = _SLOT.unpack_from(self.buf, at)
            if now > last:
                tokens = min(plan.burst, tokens + (now - last) * plan.rate)
                last = now
            tokens = min(tokens, plan.burst)  # a lowered plan clamps at once
            wait = 0.0
            if tokens >= n:
                tokens -= n
            else:
                wait = (n - tokens) / plan.rate
            _SLOT.pack_into(self.buf, at, fp, tokens, last, 0)
            return wait, tokens

    def take_all(self, buckets: list[tuple[int, Plan]], now: float) -> tuple[float, float]:
        """One token from every bucket or from none, atomically (the subject bucket and
        the tenant-wide / per-tunnel buckets above it): (wait seconds, 0.0 = taken;
        tokens left in the first bucket)."""
        with self.lock:
            rows = []
            wait = 0.0
            for fp, plan in buckets:
                at = self._slot(fp, now, plan)
                _key, tokens, last, _spare = _SLOT.unpack_from(self.buf, at)
                if now > last:
                    tokens = min(plan.burst, tokens + (now - last) * plan.rate)
                    last = now
                tokens = min(tokens, plan.burst)
                if tokens < 1.0:
                    wait = max(wait, (1.0 - tokens) / plan.rate)
                rows.append((at, fp, tokens, last))
            for at, fp, tokens, last in rows:
                _SLOT.pack_into(self.buf, at, fp, tokens - (0.0 if wait else 1.0), last, 0)
            first = rows[0][2] - (0.0 if wait else 1.0)
            return wait, first

    def level(self, fp: int, plan: Plan, now: float) -> float:
        """Tokens available (a full bucket if it is not in the table)."""
        with self.lock:
            base = fp % self.slots
            for i in range(PROBE):
                at = self._table_at + _SLOT.size * ((base + i) % self.slots)
                key, tokens, last, _spare = _SLOT.unpack_from(self.buf, at)
                if key == fp:
                    return float(min(plan.burst, tokens + max(0.0, now - last) * plan.rate))
                if key == 0:
                    break
        return plan.burst

    def close(self) -> None:
        """Unmap; the owner also removes the segment."""
        self.buf.release()
        self._map.close()
        if self.owner:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


class SharedRateLimiter(RateLimiter):
    """:class:`RateLimiter` whose buckets live in a :class:`SharedLimitState`."""

    def __init__(self, state: SharedLimitState, plans: Mapping[str, Plan], default: Plan,
                 *, max_clients: int = DEFAULT_MAX_CLIENTS) -> None:
        super().__init__(plans, default, max_clients=max_clients)
        self.state = state
        #: clients this worker has seen (for levels()); bounded like the local limiter
        self._seen: OrderedDict[tuple[str, str], int] = OrderedDict()

    def _fp(self, tenant: str, client: str) -> int:
        key = (tenant, client)
        fp = self._seen.get(key)
        if fp is None:
            fp = self._seen[key] = fingerprint(tenant, client)
            while len(self._seen) > self.max_clients:
                self._seen.popitem(last=False)
        return fp

    def check(self, tenant: str, client: str, now: float, tunnel: str = "") -> float:
        """As :meth:`Limiter.check`, over every worker: the subject's bucket, the
        tenant-wide bucket and (``tunnel``) the tunnel identity's bucket, all or none."""
        plan = self.plan_for(tenant)
        buckets = [(self._fp(tenant, client), plan),
                   (fingerprint("\x01tenant", tenant), plan.tenant)]
        if tunnel:
            buckets.append((fingerprint("\x02tunnel\x00" + tenant, tunnel), plan.tunnel))
        wait, tokens = self.state.take_all(buckets, now)
        if wait > 0:
            raise RateLimited(
                f"rate limit for tenant {tenant!r} ({plan.rate:g}/s, burst "
                f"{plan.burst:g}; tenant-wide {plan.tenant.rate:g}/s) exceeded",
                retry_after=wait,
            )
        return tokens

    def set_plans(self, plans: Mapping[str, Plan], default: Plan, now: float) -> None:
        # buckets are clamped to the new burst at their next take (see take())
        self._plans = dict(plans)
        self._default = default

    def level(self, tenant: str, client: str, now: float) -> float:
        return self.state.level(fingerprint(tenant, client), self.plan_for(tenant), now)

    def levels(self, now: float) -> Iterator[tuple[str, str, float]]:
        for (tenant, client), fp in list(self._seen.items()):
            yield tenant, client, self.state.level(fp, self.plan_for(tenant), now)


class SharedConcurrencyGate(ConcurrencyGate):
    """:class:`ConcurrencyGate` counting every worker's holders against one limit.
    ``in_flight`` / ``peak`` stay this worker's own (its metrics); the decision uses
    the sum over all workers."""

    def __init__(self, state: SharedLimitState, worker: int, limit: int) -> None:
        super().__init__(limit)
        if not 0 <= worker < state.workers:
            raise SentryConfigError(f"worker {worker} outside 0..{state.workers - 1}")
        self.state = state
        self.worker = worker

    def acquire(self) -> None:
        with self.state.lock:
            if self.state.gate_total() >= self.limit:
                raise ConcurrencyLimited(
                    f"sentry is at its concurrency limit ({self.limit} in flight)",
                    retry_after=GATE_RETRY_AFTER,
                )
            self.state.gate_add(self.worker, 1)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)

    def release(self) -> None:
        if self.in_flight <= 0:
            raise RuntimeError("ConcurrencyGate.release without acquire")
        with self.state.lock:
            self.state.gate_add(self.worker, -1)
        self.in_flight -= 1

    def global_in_flight(self) -> int:
        """Holders across all workers."""
        with self.state.lock:
            return self.state.gate_total()


def install(sentry: Any, state: SharedLimitState, worker: int) -> None:
    """Give a :class:`~pqcnet.sentry.core.Sentry` the shared limiter and gate (before it
    serves anything; its policy's plans and limit carry over)."""
    p = sentry.config.policy
    sentry.limiter = SharedRateLimiter(state, p.plans, p.default_plan)
    sentry.gate = SharedConcurrencyGate(state, worker, p.max_in_flight)


__all__ = ["MAX_WORKERS", "PROBE", "SharedConcurrencyGate", "SharedLimitState",
           "SharedRateLimiter", "fingerprint", "install"]
