"""The sentry's limiter state shared by its worker processes (``--workers N``).

A tenant's token bucket, the global concurrency gate and a tenant's cap on that gate
(``limits.tenant_share`` / a plan's ``max_in_flight``) must stay *one* bucket, *one*
gate and *one* cap over the workers, or a client spreading its tunnels over them would
get N times its plan (or, with the cap counted per worker, take every slot of the gate
from the other tenants): all live in a :class:`~pqcnet._util.shmlimits.SharedLimitState`
(shared memory, one process-shared lock; why not Redis: see that module).

:class:`SharedRateLimiter` and :class:`SharedConcurrencyGate` subclass the
single-process ones (:mod:`pqcnet.sentry.limiter`) and keep their interface, so the
core, hot reload and governance directives are unchanged; :func:`install` swaps them
into a :class:`~pqcnet.sentry.core.Sentry`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from functools import lru_cache
from typing import Any

from pqcnet._util.shmlimits import MAX_WORKERS, PROBE, SharedLimitState, fingerprint
from pqcnet.sentry.errors import ConcurrencyLimited, RateLimited, SentryConfigError
from pqcnet.sentry.limiter import (
    DEFAULT_MAX_CLIENTS,
    GATE_RETRY_AFTER,
    ConcurrencyGate,
    Plan,
    RateLimiter,
)


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

    def take_bytes(self, tenant: str, n: float, now: float) -> float:
        """As :meth:`RateLimiter.take_bytes`, over every worker: one bucket per tenant."""
        plan = self.plan_for(tenant).pipe
        if plan is None:
            return 0.0
        return self.state.take(fingerprint("\x03pipe", tenant), plan, now, n)[0]

    def set_plans(self, plans: Mapping[str, Plan], default: Plan, now: float) -> None:
        # buckets are clamped to the new burst at their next take (see take())
        self._plans = dict(plans)
        self._default = default

    def level(self, tenant: str, client: str, now: float) -> float:
        return self.state.level(fingerprint(tenant, client), self.plan_for(tenant), now)

    def levels(self, now: float) -> Iterator[tuple[str, str, float]]:
        for (tenant, client), fp in list(self._seen.items()):
            yield tenant, client, self.state.level(fp, self.plan_for(tenant), now)


@lru_cache(maxsize=4096)
def _held_key(tenant: str) -> int:
    """The shared in-flight row of ``tenant`` (cached: one BLAKE2b per tenant)."""
    return fingerprint("\x03held", tenant)


class SharedConcurrencyGate(ConcurrencyGate):
    """:class:`ConcurrencyGate` counting every worker's holders against one limit and
    each tenant's holders, over every worker, against its cap. ``in_flight`` / ``peak``
    / ``by_tenant`` stay this worker's own (its metrics); the decisions use the sums."""

    def __init__(self, state: SharedLimitState, worker: int, limit: int, share: float = 1.0,
                 caps: Mapping[str, int] | None = None) -> None:
        super().__init__(limit, share, caps)
        if not 0 <= worker < state.workers:
            raise SentryConfigError(f"worker {worker} outside 0..{state.workers - 1}")
        self.state = state
        self.worker = worker

    def acquire(self, tenant: str = "") -> None:
        key, state = _held_key(tenant), self.state
        with state.lock:
            if state.gate_total() >= self.limit:
                raise ConcurrencyLimited(
                    f"sentry is at its concurrency limit ({self.limit} in flight)",
                    retry_after=GATE_RETRY_AFTER,
                )
            cap = self.cap(tenant)
            held = state.held_take(key, self.worker, cap)
            if held < 0:
                raise ConcurrencyLimited(  # more tenants in flight than rows: as full
                    "sentry cannot count one more tenant in flight (shared table full)",
                    retry_after=GATE_RETRY_AFTER)
            if held >= cap:
                raise self.tenant_full(tenant, held)
            state.gate_add(self.worker, 1)
        self.by_tenant[tenant] = self.by_tenant.get(tenant, 0) + 1
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)

    def release(self, tenant: str = "") -> None:
        if self.in_flight <= 0:
            raise RuntimeError("ConcurrencyGate.release without acquire")
        with self.state.lock:
            self.state.gate_add(self.worker, -1)
            self.state.held_give(_held_key(tenant), self.worker)
        self._give_tenant(tenant)
        self.in_flight -= 1

    def tenant_in_flight(self, tenant: str) -> int:
        """What ``tenant`` holds across all workers."""
        with self.state.lock:
            return self.state.held_total(_held_key(tenant))

    def global_in_flight(self) -> int:
        """Holders across all workers."""
        with self.state.lock:
            return self.state.gate_total()


def install(sentry: Any, state: SharedLimitState, worker: int) -> None:
    """Give a :class:`~pqcnet.sentry.core.Sentry` the shared limiter and gate (before it
    serves anything; its policy's plans and limit carry over)."""
    p = sentry.config.policy
    sentry.limiter = SharedRateLimiter(state, p.plans, p.default_plan)
    sentry.gate = SharedConcurrencyGate(state, worker, p.max_in_flight, p.tenant_share,
                                        p.tenant_caps)


__all__ = ["MAX_WORKERS", "PROBE", "SharedConcurrencyGate", "SharedLimitState",
           "SharedRateLimiter", "fingerprint", "install"]
