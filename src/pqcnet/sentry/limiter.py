"""The dual-layer limiter: per-client token buckets plus a global concurrency gate.

Layer 1 (:class:`RateLimiter`) is fairness: each authenticated client (tenant,
subject) gets a token bucket sized by its tenant's plan (rate per second + burst).
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

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from pqcnet.sentry.errors import ConcurrencyLimited, RateLimited, SentryConfigError

#: Bound on remembered client buckets; least-recently-used are forgotten (and come
#: back full). Clients are authenticated subjects, so this bounds honest churn.
DEFAULT_MAX_CLIENTS = 100_000
#: retry-after suggested when the concurrency gate is full, seconds.
GATE_RETRY_AFTER = 0.05
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

    #: sustained requests per second
    rate: float
    #: bucket capacity (requests that may arrive at once after idling)
    burst: float

    def __post_init__(self) -> None:
        if not (self.rate > 0 and self.burst >= 1):
            raise SentryConfigError(f"plan needs rate > 0 and burst >= 1, got {self}")


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


class RateLimiter:
    """Per-(tenant, client) token buckets with per-tenant plans."""

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
        self.max_clients = max_clients

    def plan_for(self, tenant: str) -> Plan:
        """The plan applying to ``tenant``."""
        return self._plans.get(tenant, self._default)

    def check(self, tenant: str, client: str, now: float) -> float:
        """Take one token for this client (returns the tokens left) or raise
        :class:`RateLimited`."""
        key = (tenant, client)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.plan_for(tenant), now)
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        wait = bucket.take(now)
        if wait > 0:
            raise RateLimited(
                f"rate limit for tenant {tenant!r} ({bucket.plan.rate:g}/s, burst "
                f"{bucket.plan.burst:g}) exceeded",
                retry_after=wait,
            )
        return bucket.tokens

    def set_plans(self, plans: Mapping[str, Plan], default: Plan, now: float) -> None:
        """Hot reload: new plans apply to existing buckets immediately."""
        self._plans = dict(plans)
        self._default = default
        for (tenant, _client), bucket in self._buckets.items():
            bucket.set_plan(self.plan_for(tenant), now)

    def level(self, tenant: str, client: str, now: float) -> float:
        """Tokens left for one client (a full bucket if it was never seen)."""
        bucket = self._buckets.get((tenant, client))
        return bucket.level(now) if bucket is not None else self.plan_for(tenant).burst

    def levels(self, now: float) -> Iterator[tuple[str, str, float]]:
        """(tenant, client, tokens) for every remembered bucket."""
        for (tenant, client), bucket in self._buckets.items():
            yield tenant, client, bucket.level(now)


class ConcurrencyGate:
    """At most ``limit`` holders at once; never waits. ``peak`` records the maximum seen."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise SentryConfigError(f"max_in_flight must be >= 1, got {limit}")
        self.limit = limit
        self.in_flight = 0
        self.peak = 0

    def acquire(self) -> None:
        """Enter or raise :class:`RateLimited`."""
        if self.in_flight >= self.limit:
            raise ConcurrencyLimited(
                f"sentry is at its concurrency limit ({self.limit} in flight)",
                retry_after=GATE_RETRY_AFTER,
            )
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)

    def release(self) -> None:
        """Leave (exactly once per successful :meth:`acquire`)."""
        if self.in_flight <= 0:
            raise RuntimeError("ConcurrencyGate.release without acquire")
        self.in_flight -= 1

    def set_limit(self, limit: int) -> None:
        """Hot reload; holders above a lowered limit finish, new ones are refused."""
        if limit < 1:
            raise SentryConfigError(f"max_in_flight must be >= 1, got {limit}")
        self.limit = limit


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
