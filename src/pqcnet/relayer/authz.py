"""Data-plane authorization and per-customer quotas at the relayer.

**Who may publish and subscribe.** Every frame carries a customer and a channel; the
tunnel it arrived on carries an authenticated SPIFFE identity (its certificate). The
relayer asks the shared principal policy (:mod:`pqcnet.identity.policy`) whether that
identity may ``publish`` to, or ``subscribe`` from, that customer's channel. The
default is the one the guarantees issue asks for: *a tenant is its own customer and
nothing else* — ``spiffe://td/acme/publisher/p1`` may publish and subscribe customer
``acme``; any other customer needs an explicit grant in the config::

    relayer:
      authz:
        own_tenant: [publish, subscribe]     # the default; [] switches the default off
        customers:
          acme:                              # rules about customer acme, first match
            - action: allow
              from: [spiffe://pqcnet.test/partner/publisher/*]
              methods: [publish]
              channels: [orders]

A refused frame gets its own :class:`~pqcnet.relayer.errors.NotAuthorized` result (the
rest of the request goes on); a refused subscription gets an ``ErrorReply`` with the
same code. Refusals are counted (``pqcnet_relayer_authz_refusals_total``). Because a
frame of customer ``X`` only enters the bus when its publisher may publish as ``X``,
metering (which counts what subscribers of ``X`` acknowledged) bills only the
authenticated customer.

**Quotas.** Per customer, two token buckets — frames/s and bytes/s — checked at
ingress before anything is published; a frame over quota gets a retriable
:class:`~pqcnet.relayer.errors.QuotaExceeded` result with the wait in its reason. 0
means unlimited. Governance rate-limit directives set a customer's frames/s (scope =
customer, ``*`` = the default) through :meth:`Quotas.apply_rate_limit`.

Both are hot-reloadable: :meth:`pqcnet.relayer.node.RelayerNode.reload` builds new
objects from a validated config and swaps them in; existing buckets keep their level.
Time is passed in (``now``); nothing here reads a clock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from pqcnet._util.schema import Schema
from pqcnet._util.shmlimits import SharedLimitState, fingerprint
from pqcnet.identity.policy import PrincipalPolicy, RuleSpec
from pqcnet.identity.spiffe import SpiffeId
from pqcnet.relayer.errors import NotAuthorized, QuotaExceeded

Op = Literal["publish", "subscribe"]
#: what a tenant may do for its own customer by default
OWN_TENANT_DEFAULT: tuple[Op, ...] = ("publish", "subscribe")
#: customers whose quota buckets are remembered (least recently used forgotten; they
#: come back full) — bounds memory against a flood of customer ids
MAX_QUOTA_CUSTOMERS = 65_536


class AuthzSpec(Schema):
    """Who may publish to and subscribe from which customer's channels."""

    own_tenant: list[Op] = Field(default_factory=lambda: list(OWN_TENANT_DEFAULT))
    """What a peer may do for the customer named like its own tenant, unless a rule
    says otherwise ([] : nothing without a rule)."""
    customers: dict[str, list[RuleSpec]] = Field(default_factory=dict)
    """Rules per customer (``*``: every customer), first match wins; methods are
    ``publish`` / ``subscribe``."""


class QuotaSpec(Schema):
    """One customer's quota at this relayer (0: unlimited)."""

    frames_per_s: float = Field(default=0.0, ge=0)
    """Sustained frames per second accepted from all publishers of the customer."""
    frames_burst: float = Field(default=0.0, ge=0)
    """Frames accepted at once after idling (0: one second's worth)."""
    bytes_per_s: float = Field(default=0.0, ge=0)
    """Sustained payload bytes per second."""
    bytes_burst: float = Field(default=0.0, ge=0)
    """Payload bytes accepted at once after idling (0: one second's worth)."""


class QuotasSpec(Schema):
    """Per-customer quotas: a default and overrides."""

    default: QuotaSpec = Field(default_factory=QuotaSpec)
    """Quota of every customer without its own entry."""
    customers: dict[str, QuotaSpec] = Field(default_factory=dict)
    """Quota per customer."""


def authz_policy(spec: AuthzSpec) -> PrincipalPolicy:
    """The compiled policy of an :class:`AuthzSpec`."""
    return PrincipalPolicy.from_specs(spec.customers, own_tenant=spec.own_tenant)


class Authorizer:
    """Answers "may this peer do ``op`` on this customer's channel?" and counts refusals."""

    def __init__(self, policy: PrincipalPolicy) -> None:
        self.policy = policy
        #: refusals by operation
        self.refusals: dict[str, int] = {"publish": 0, "subscribe": 0}

    def check(self, peer: SpiffeId, op: Op, customer: str, channel: str) -> None:
        """Raise :class:`NotAuthorized` (and count it) unless allowed."""
        decision = self.policy.decide(customer, peer, op, channel)
        if not decision.allowed:
            self.refusals[op] += 1
            what = f"channel {channel!r}" if channel else "all channels"
            raise NotAuthorized(f"{peer} is not authorized to {op} {what} of customer "
                                f"{customer!r} ({decision.reason})")

    def check_subscribe(self, peer: SpiffeId, customer: str, channels: Iterable[str]) -> None:
        """Every named channel must be allowed; no channels means all of them, which
        needs a grant on ``**`` (the own-tenant default covers it)."""
        names = sorted(channels)
        for ch in names or ["**"]:
            self.check(peer, "subscribe", customer, ch if names else "")

    def may_publish(self, peer: SpiffeId, customer: str, channel: str) -> bool:
        """:meth:`check` for ``publish`` as an answer: nothing raised, nothing counted."""
        return self.policy.allows(customer, peer, "publish", channel)

    def may_receive(self, peer: SpiffeId, customer: str, channel: str) -> bool:
        """Delivery-time check (a grant withdrawn by a reload stops delivery)."""
        return self.policy.allows(customer, peer, "subscribe", channel)


@dataclass(slots=True)
class _Bucket:
    rate: float
    burst: float
    tokens: float
    last: float

    def take(self, n: float, now: float) -> float:
        """0.0 when ``n`` tokens were taken, else the seconds until they would be."""
        if now > self.last:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now
        if self.tokens >= n:
            self.tokens -= n
            return 0.0
        return (n - self.tokens) / self.rate

    def give(self, n: float) -> None:
        self.tokens = min(self.burst, self.tokens + n)

    def set(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = min(self.tokens, burst)


class Quotas:
    """Per-customer frames/s and bytes/s token buckets (of this host; over a cluster:
    :class:`~pqcnet.relayer.cluster_quotas.ClusterQuotas`)."""

    #: :meth:`prepare` has work to do (the ingress skips awaiting it otherwise)
    needs_prepare = False

    def __init__(self, spec: QuotasSpec | None = None, *,
                 max_customers: int = MAX_QUOTA_CUSTOMERS) -> None:
        self.spec = spec or QuotasSpec()
        self.max_customers = max_customers
        #: no customer has a quota: the ingress skips :meth:`take` (kept by :meth:`reload`)
        self.unlimited = _unlimited(self.spec)
        self._buckets: OrderedDict[str, tuple[_Bucket | None, _Bucket | None]] = OrderedDict()
        #: frames refused for quota
        self.refused = 0

    def quota(self, customer: str) -> QuotaSpec:
        """The quota applying to ``customer``."""
        return self.spec.customers.get(customer, self.spec.default)

    @staticmethod
    def _pair(q: QuotaSpec, now: float) -> tuple[_Bucket | None, _Bucket | None]:
        def one(rate: float, burst: float) -> _Bucket | None:
            return _Bucket(rate, burst, burst, now) if rate > 0 else None
        (fr, fb), (br, bb) = rates(q)
        return one(fr, fb), one(br, bb)

    def take(self, customer: str, frames: int, nbytes: int, now: float) -> None:
        """Take ``frames`` and ``nbytes`` from the customer's buckets, or raise
        :class:`QuotaExceeded` (taking nothing)."""
        pair = self._buckets.get(customer)
        if pair is None:
            q = self.quota(customer)
            if q.frames_per_s <= 0 and q.bytes_per_s <= 0:
                return  # unlimited: nothing to remember
            pair = self._buckets[customer] = self._pair(q, now)
            while len(self._buckets) > self.max_customers:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(customer)
        fb, bb = pair
        wait = fb.take(frames, now) if fb is not None else 0.0
        if wait > 0:
            self.refused += frames
            raise QuotaExceeded(f"customer {customer!r} is over its quota of "
                                f"{fb.rate:g} frames/s (retry in {wait:.3g}s)",  # type: ignore[union-attr]
                                retry_after=wait)
        wait = bb.take(nbytes, now) if bb is not None else 0.0
        if wait > 0:
            if fb is not None:
                fb.give(frames)
            self.refused += frames
            raise QuotaExceeded(f"customer {customer!r} is over its quota of "
                                f"{bb.rate:g} bytes/s (retry in {wait:.3g}s)",  # type: ignore[union-attr]
                                retry_after=wait)

    async def prepare(self, demand: dict[str, list[int]]) -> None:
        """Before a request's :meth:`take` calls (``demand``: customer -> [frames,
        payload bytes]): nothing to do for buckets of this host."""

    def reload(self, spec: QuotasSpec, now: float) -> None:
        """Hot reload: new rates apply to existing buckets, which keep their level."""
        self.spec = spec
        self.unlimited = _unlimited(spec)
        for customer in list(self._buckets):
            q = self.quota(customer)
            fb, bb = self._buckets[customer]
            new_fb, new_bb = self._pair(q, now)
            self._buckets[customer] = (_keep(fb, new_fb), _keep(bb, new_bb))

    def apply_rate_limit(self, scope: str, rate: float, burst: float, now: float) -> QuotasSpec:
        """A governance rate-limit directive: frames/s of one customer (``*``: the
        default and every customer with its own quota). Returns the spec in force."""
        def upd(q: QuotaSpec) -> QuotaSpec:
            return q.model_copy(update={"frames_per_s": float(rate),
                                        "frames_burst": float(burst)})
        s = self.spec
        if scope == "*":
            spec = QuotasSpec(default=upd(s.default),
                              customers={c: upd(q) for c, q in s.customers.items()})
        else:
            spec = QuotasSpec(default=s.default,
                              customers={**s.customers, scope: upd(self.quota(scope))})
        self.reload(spec, now)
        return spec


@dataclass(frozen=True, slots=True)
class _QuotaRow:
    """One shared bucket of a customer: its slot fingerprint, what it counts, and its
    rate and burst (the row is the bucket's :class:`~pqcnet._util.shmlimits.Rate`)."""

    fp: int
    unit: Literal["frames", "bytes"]
    rate: float
    burst: float


class SharedQuotas(Quotas):
    """:class:`Quotas` whose buckets live in shared memory: one frames bucket and one
    bytes bucket per customer over all worker processes of ``relayer run --workers N``
    (:mod:`pqcnet._util.shmlimits`), so a customer whose tunnels land on several workers
    still gets its quota once per host, not once per worker. Hot reload and governance
    rate limits change :attr:`spec`; a bucket takes a new rate (clamped to a new burst)
    at its next take. ``refused`` stays this worker's count."""

    def __init__(self, state: SharedLimitState, spec: QuotasSpec | None = None) -> None:
        super().__init__(spec)
        self.state = state
        #: customer -> its buckets' rows, built once per spec (hashing per frame was
        #: most of a take's cost); bounded (LRU)
        self._rows: OrderedDict[str, list[_QuotaRow]] = OrderedDict()

    def _customer_rows(self, customer: str) -> list[_QuotaRow]:
        got = self._rows.get(customer)
        if got is not None:
            self._rows.move_to_end(customer)
            return got
        q = self.quota(customer)
        rows: list[_QuotaRow] = []
        if q.frames_per_s > 0:
            rows.append(_QuotaRow(fingerprint("relayer-quota-frames", customer), "frames",
                                  q.frames_per_s, q.frames_burst or q.frames_per_s))
        if q.bytes_per_s > 0:
            rows.append(_QuotaRow(fingerprint("relayer-quota-bytes", customer), "bytes",
                                  q.bytes_per_s, q.bytes_burst or q.bytes_per_s))
        self._rows[customer] = rows
        while len(self._rows) > self.max_customers:
            self._rows.popitem(last=False)
        return rows

    def take(self, customer: str, frames: int, nbytes: int, now: float) -> None:
        rows = self._customer_rows(customer)
        if not rows:
            return
        wait, short = self.state.take_counts(
            [(r.fp, r, nbytes if r.unit == "bytes" else frames) for r in rows], now)
        if wait > 0:
            self.refused += frames
            row = rows[short]
            raise QuotaExceeded(f"customer {customer!r} is over its quota of "
                                f"{row.rate:g} {row.unit}/s (retry in {wait:.3g}s)",
                                retry_after=wait)

    def reload(self, spec: QuotasSpec, now: float) -> None:
        super().reload(spec, now)
        self._rows.clear()  # rates come from the new spec at the next take


def rates(q: QuotaSpec) -> tuple[tuple[float, float], tuple[float, float]]:
    """(rate, burst) of a quota's frames and of its bytes (rate 0: unlimited; burst 0:
    one second's worth)."""
    return ((q.frames_per_s, q.frames_burst or q.frames_per_s),
            (q.bytes_per_s, q.bytes_burst or q.bytes_per_s))


def request_demand(frames: Iterable[tuple[str, int]]) -> dict[str, list[int]]:
    """customer -> [frames, payload bytes] of one request's (customer, payload size)."""
    out: dict[str, list[int]] = {}
    for customer, size in frames:
        d = out.get(customer)
        if d is None:
            out[customer] = [1, size]
        else:
            d[0] += 1
            d[1] += size
    return out


def _unlimited(spec: QuotasSpec) -> bool:
    return all(q.frames_per_s <= 0 and q.bytes_per_s <= 0
               for q in (spec.default, *spec.customers.values()))


def _keep(old: _Bucket | None, new: _Bucket | None) -> _Bucket | None:
    if old is None or new is None:
        return new
    old.set(new.rate, new.burst)
    return old


__all__ = ["MAX_QUOTA_CUSTOMERS", "Authorizer", "AuthzSpec", "Op", "QuotaSpec", "Quotas",
           "QuotasSpec", "SharedQuotas", "authz_policy", "rates", "request_demand"]
