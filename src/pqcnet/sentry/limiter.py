"""The dual-layer limiter: per-client token buckets plus a global concurrency gate.

Layer 1 (:class:`RateLimiter`) is fairness: each authenticated client (tenant,
subject) gets a token bucket sized by its tenant's plan (rate per second + burst).
Above the per-subject buckets sit a **tenant-wide** bucket (the tenant's total,
default: the plan's own rate and burst) and a **per-tunnel-identity** bucket (what one
sidecar, by its SPIFFE ID, may send for the tenant; default: the tenant's), so minting
more subjects no longer multiplies a tenant's rate: a request needs a token from all
three, and a refusal takes none.
Layer 2 (:class:`ConcurrencyGate`) protects the sentry and its backends: at most
``max_in_flight`` requests are being proxied at once, whoever sends them.

Neither layer ever queues: a request that does not fit is refused at once with
:class:`~pqcnet.sentry.errors.RateLimited` carrying ``retry_after``, so memory use is bounded
by the gate, not by the offered load. Both are hot-reloadable (:meth:`set_plans`,
:meth:`ConcurrencyGate.set_limit`) without touching tunnels: existing buckets keep
their level, clamped to the new burst. Time is passed in (``now``); nothing here
reads a clock, so tests drive it deterministically.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from pqcnet.sentry.errors import (
    ConcurrencyLimited,
    RateLimited,
    SentryConfigError,
    TenantConcurrencyLimited,
)

#: Bound on remembered client buckets; least-recently-used are forgotten (and come
#: back full). Clients are authenticated subjects, so this bounds honest churn.
DEFAULT_MAX_CLIENTS = 100_000
#: retry-after suggested when the concurrency gate is full, seconds.
GATE_RETRY_AFTER = 0.05
#: The least a tenant's pipe-bytes bucket holds: one read of a pipe (64 KiB) fits.
PIPE_MIN_BURST = 65_536

#: Bucket refusals on one tunnel within :data:`HAMMER_WINDOW` seconds after which the
#: sentry also sends a QSTP FLOW PAUSE (with the bucket's retry-after) on that tunnel,
#: so a client that ignores 429s is slowed at the transport instead of costing a
#: decode + refusal per request.
HAMMER_REFUSALS = 20
#: Sliding window, seconds, for :data:`HAMMER_REFUSALS`.
HAMMER_WINDOW = 1.0


@dataclass(frozen=True, slots=True)
class Plan:
    """A tenant's rate plan."""

    #: sustained requests per second (per subject)
    rate: float
    #: bucket capacity (requests that may arrive at once after idling)
    burst: float
    #: the whole tenant's sustained rate (None: ``rate``)
    tenant_rate: float | None = None
    #: the whole tenant's burst (None: ``burst``)
    tenant_burst: float | None = None
    #: one tunnel identity's rate for the tenant (None: the tenant's)
    tunnel_rate: float | None = None
    #: one tunnel identity's burst (None: the tenant's)
    tunnel_burst: float | None = None
    #: RPCs the tenant may have in flight (None: the gate's ``share`` of its limit)
    max_in_flight: int | None = None
    #: bytes/s all the tenant's pipes (TCP, WebSocket) move together (None: no limit)
    pipe_rate: float | None = None
    #: bytes those pipes may move at once after a quiet spell (None: see :attr:`pipe`)
    pipe_burst: float | None = None

    def __post_init__(self) -> None:
        if not (self.rate > 0 and self.burst >= 1):
            raise SentryConfigError(f"plan needs rate > 0 and burst >= 1, got {self}")
        for r, b in ((self.tenant_rate, self.tenant_burst),
                     (self.tunnel_rate, self.tunnel_burst)):
            if (r is not None and not r > 0) or (b is not None and not b >= 1):
                raise SentryConfigError(f"plan needs tenant/tunnel rate > 0 and burst >= 1, "
                                        f"got {self}")
        if (self.pipe_rate is not None and not self.pipe_rate > 0) or (
                self.pipe_burst is not None and not self.pipe_burst >= PIPE_MIN_BURST):
            raise SentryConfigError(f"plan needs pipe_rate > 0 and pipe_burst >= "
                                    f"{PIPE_MIN_BURST}, got {self}")

    @property
    def tenant(self) -> Plan:
        """The tenant-wide bucket's plan."""
        return Plan(self.tenant_rate or self.rate, self.tenant_burst or self.burst)

    @property
    def tunnel(self) -> Plan:
        """The per-tunnel-identity bucket's plan."""
        t = self.tenant
        return Plan(self.tunnel_rate or t.rate, self.tunnel_burst or t.burst)

    @property
    def pipe(self) -> Plan | None:
        """The tenant's pipe-bytes bucket's plan (tokens are bytes), or None: no limit.
        The default burst is one second's worth, at least :data:`PIPE_MIN_BURST`."""
        if self.pipe_rate is None:
            return None
        return Plan(self.pipe_rate,
                    self.pipe_burst or max(self.pipe_rate, float(PIPE_MIN_BURST)))


class TokenBucket:
    """Classic token bucket; ``take`` returns 0.0 on success or the wait in seconds."""

    __slots__ = ("last", "plan", "tokens")

    def __init__(self, plan: Plan, now: float) -> None:
        self.plan = plan
        self.tokens = plan.burst
        self.last = now

    def _refill(self, now: float) -> None:
        if now > self.last:
            self.tokens = min(self.plan.burst, self.tokens + (now - self.last) * self.plan.rate)
            self.last = now

    def level(self, now: float) -> float:
        """Tokens available at ``now``."""
        self._refill(now)
        return self.tokens

    def give(self, n: float = 1.0) -> None:
        """Return ``n`` tokens taken by a request another bucket then refused."""
        self.tokens = min(self.plan.burst, self.tokens + n)

    def take(self, now: float, n: float = 1.0) -> float:
        """Consume ``n`` tokens if available; else return seconds until they will be."""
        self._refill(now)
        if self.tokens >= n:
            self.tokens -= n
            return 0.0
        return (n - self.tokens) / self.plan.rate

    def set_plan(self, plan: Plan, now: float) -> None:
        """Switch plans keeping the current level (clamped to the new burst)."""
        self._refill(now)
        self.plan = plan
        self.tokens = min(self.tokens, plan.burst)


#: bucket kinds: a subject's, the whole tenant's, one tunnel identity's for the tenant,
#: the tenant's pipe bytes
_SUBJECT, _TENANT, _TUNNEL, _PIPE = "subject", "tenant", "tunnel", "pipe"


def _upper_plan(kind: str, plan: Plan) -> Plan | None:
    return plan.tenant if kind == _TENANT else plan.pipe if kind == _PIPE else plan.tunnel


class RateLimiter:
    """Per-(tenant, client) token buckets under per-tenant and per-tunnel-identity
    buckets, with per-tenant plans."""

    def __init__(
        self,
        plans: Mapping[str, Plan],
        default: Plan,
        *,
        max_clients: int = DEFAULT_MAX_CLIENTS,
    ) -> None:
        self._plans = dict(plans)
        self._default = default
        self._buckets: OrderedDict[tuple[str, str], TokenBucket] = OrderedDict()
        #: tenant-wide and per-tunnel buckets: (kind, tenant, tunnel identity or "")
        self._upper: OrderedDict[tuple[str, str, str], TokenBucket] = OrderedDict()
        self.max_clients = max_clients

    def plan_for(self, tenant: str) -> Plan:
        """The plan applying to ``tenant``."""
        return self._plans.get(tenant, self._default)

    def _upper_bucket(self, kind: str, tenant: str, tunnel: str, now: float) -> TokenBucket:
        key = (kind, tenant, tunnel)
        bucket = self._upper.get(key)
        if bucket is None:
            plan = _upper_plan(kind, self.plan_for(tenant))
            assert plan is not None
            bucket = self._upper[key] = TokenBucket(plan, now)
            while len(self._upper) > self.max_clients:
                self._upper.popitem(last=False)
        else:
            self._upper.move_to_end(key)
        return bucket

    def check(self, tenant: str, client: str, now: float, tunnel: str = "") -> float:
        """Take one token for this client — from its subject bucket, the tenant's bucket
        and (``tunnel``: the tunnel peer's SPIFFE ID) that tunnel's bucket — and return
        the subject's tokens left, or raise :class:`RateLimited` taking none."""
        key = (tenant, client)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.plan_for(tenant), now)
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        chain = [(_SUBJECT, bucket), (_TENANT, self._upper_bucket(_TENANT, tenant, "", now))]
        if tunnel:
            chain.append((_TUNNEL, self._upper_bucket(_TUNNEL, tenant, tunnel, now)))
        taken: list[TokenBucket] = []
        for kind, b in chain:
            wait = b.take(now)
            if wait > 0:
                for t in taken:
                    t.give()
                what = {_SUBJECT: "per-client", _TENANT: "tenant-wide",
                        _TUNNEL: "per-tunnel"}[kind]
                raise RateLimited(
                    f"{what} rate limit for tenant {tenant!r} ({b.plan.rate:g}/s, burst "
                    f"{b.plan.burst:g}) exceeded",
                    retry_after=wait,
                )
            taken.append(b)
        return bucket.tokens

    def take_bytes(self, tenant: str, n: float, now: float) -> float:
        """Take ``n`` bytes (at most the bucket's burst) from ``tenant``'s pipe-bytes
        bucket: 0.0 when taken (or the plan has no ``pipe_rate``), else the seconds
        until they will be there, taking none."""
        if self.plan_for(tenant).pipe is None:
            return 0.0
        return self._upper_bucket(_PIPE, tenant, "", now).take(now, n)

    def set_plans(self, plans: Mapping[str, Plan], default: Plan, now: float) -> None:
        """Hot reload: new plans apply to existing buckets immediately."""
        self._plans = dict(plans)
        self._default = default
        for (tenant, _client), bucket in self._buckets.items():
            bucket.set_plan(self.plan_for(tenant), now)
        for key, bucket in list(self._upper.items()):
            plan = _upper_plan(key[0], self.plan_for(key[1]))
            if plan is None:  # pipes unlimited now
                del self._upper[key]
            else:
                bucket.set_plan(plan, now)

    def level(self, tenant: str, client: str, now: float) -> float:
        """Tokens left for one client (a full bucket if it was never seen)."""
        bucket = self._buckets.get((tenant, client))
        return bucket.level(now) if bucket is not None else self.plan_for(tenant).burst

    def levels(self, now: float) -> Iterator[tuple[str, str, float]]:
        """(tenant, client, tokens) for every remembered bucket."""
        for (tenant, client), bucket in self._buckets.items():
            yield tenant, client, bucket.level(now)


class ConcurrencyGate:
    """At most ``limit`` holders at once, and at most its cap per tenant; never waits.
    ``peak`` records the maximum seen.

    A tenant's cap is ``caps[tenant]`` or ``share`` of ``limit`` (rounded up): without
    it one tenant's long-lived streams could hold every slot and refuse the others.
    ``by_tenant`` holds only tenants with something in flight (bounded by ``limit``).
    """

    def __init__(self, limit: int, share: float = 1.0,
                 caps: Mapping[str, int] | None = None) -> None:
        if limit < 1:
            raise SentryConfigError(f"max_in_flight must be >= 1, got {limit}")
        self.limit = limit
        self.in_flight = 0
        self.peak = 0
        self.by_tenant: dict[str, int] = {}
        self.share = 1.0
        self.caps: dict[str, int] = {}
        self.set_caps(share, caps or {})

    def cap(self, tenant: str) -> int:
        """Slots ``tenant`` may hold at once: its own cap, else the default one (key
        ``""``), else ``share`` of the gate."""
        return (self.caps.get(tenant) or self.caps.get("")
                or max(1, math.ceil(self.share * self.limit)))

    def tenant_full(self, tenant: str, held: int) -> TenantConcurrencyLimited:
        """The refusal of a tenant holding ``held`` slots, its cap."""
        return TenantConcurrencyLimited(
            f"tenant {tenant!r} has {held} requests in flight, its share of the "
            f"sentry's {self.limit}", retry_after=GATE_RETRY_AFTER)

    def _take_tenant(self, tenant: str) -> None:
        held = self.by_tenant.get(tenant, 0)
        if held >= self.cap(tenant):
            raise self.tenant_full(tenant, held)
        self.by_tenant[tenant] = held + 1

    def _give_tenant(self, tenant: str) -> None:
        held = self.by_tenant.get(tenant, 0) - 1
        if held > 0:
            self.by_tenant[tenant] = held
        else:
            self.by_tenant.pop(tenant, None)

    def acquire(self, tenant: str = "") -> None:
        """Enter or raise :class:`RateLimited` (the gate or the tenant's cap is full)."""
        if self.in_flight >= self.limit:
            raise ConcurrencyLimited(
                f"sentry is at its concurrency limit ({self.limit} in flight)",
                retry_after=GATE_RETRY_AFTER,
            )
        self._take_tenant(tenant)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)

    def release(self, tenant: str = "") -> None:
        """Leave (exactly once per successful :meth:`acquire`, with its tenant)."""
        if self.in_flight <= 0:
            raise RuntimeError("ConcurrencyGate.release without acquire")
        self._give_tenant(tenant)
        self.in_flight -= 1

    def set_limit(self, limit: int) -> None:
        """Hot reload; holders above a lowered limit finish, new ones are refused."""
        if limit < 1:
            raise SentryConfigError(f"max_in_flight must be >= 1, got {limit}")
        self.limit = limit

    def set_caps(self, share: float, caps: Mapping[str, int]) -> None:
        """Hot reload of the per-tenant caps (holders above a lowered cap finish)."""
        if not 0 < share <= 1:
            raise SentryConfigError(f"tenant_share must be in (0, 1], got {share}")
        if any(c < 1 for c in caps.values()):
            raise SentryConfigError("a tenant's max_in_flight must be >= 1")
        self.share, self.caps = share, dict(caps)


class HammerDetector:
    """Counts one tunnel's rate-limit refusals; says when to PAUSE it.

    A fixed window starting at the first refusal: :meth:`refused` returns True once
    ``threshold`` refusals fell within ``window`` seconds, then starts counting anew
    (so a client that keeps hammering is paused again, once per window at most).
    """

    __slots__ = ("count", "start", "threshold", "window")

    def __init__(self, threshold: int = HAMMER_REFUSALS, window: float = HAMMER_WINDOW) -> None:
        if threshold < 1 or window <= 0:
            raise SentryConfigError("hammer threshold must be >= 1 and window > 0")
        self.threshold = threshold
        self.window = window
        self.count = 0
        self.start = 0.0

    def refused(self, now: float) -> bool:
        """Record one refusal at ``now``; True when the tunnel should be paused."""
        if self.count == 0 or now - self.start > self.window:
            self.start, self.count = now, 0
        self.count += 1
        if self.count >= self.threshold:
            self.count = 0
            return True
        return False
