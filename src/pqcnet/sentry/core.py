"""The sentry's decisions, independent of the transport: admit, route, sanitize, reload.

For every RPC, in this order (cheapest refusal first, nothing reaches a backend
until all pass)::

    assertion (cached verify, tenant, channel binding)  → Unauthenticated
    ACL (peer SPIFFE ID, method key, tenant)             → Denied
    route + tenant namespace of the backend              → Denied
    token buckets: per client, tenant-wide, per tunnel   → RateLimited
    global concurrency gate (held until the response ends) → RateLimited
    identity sanitizer (headers, JSON body)              → WireError on non-JSON

The tunnel-facing loop lives in :mod:`pqcnet.sentry.server`; this module is what it calls.

Hot-reload API (what a config-file watcher and mesh governance call; tunnels and
in-flight RPCs are never dropped, existing token buckets keep their level clamped to
the new burst, and every change goes through the same validated path):

* :meth:`Sentry.reload_policy` (alias :meth:`Sentry.reload`) — swap the whole
  :class:`~pqcnet.sentry.config.Policy` (issuers, plans, gate, ACL, sanitizer); new sanitizer
  policy digests are anchored through the :class:`PolicyLedger` seam.
* :meth:`Sentry.apply_rate_limit` — one plan change: ``scope="*"`` replaces the
  default plan and every tenant's plan, any other scope names one tenant (created
  if new). Raises :class:`~pqcnet.sentry.errors.SentryConfigError` on a bad rate/burst and
  leaves the old policy in force.
* :meth:`Sentry.set_max_in_flight` — resize the global concurrency gate.
* :meth:`Sentry.set_acl` — replace the ACL (peer patterns, method allow-list).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol

from pqcnet._util.confdiff import changed_keys, plain
from pqcnet.identity.spiffe import SpiffeId
from pqcnet.sentry.acl import AclPolicy, method_key
from pqcnet.sentry.assertion import HEADER, AssertionVerifier, SessionAssertion, from_header
from pqcnet.sentry.backends import Backend, ForwardRequest, TcpBackend, build_backend
from pqcnet.sentry.config import BackendConfig, Policy, SentryConfig
from pqcnet.sentry.errors import Denied, RateLimited, SentryConfigError, Unauthenticated
from pqcnet.sentry.limiter import ConcurrencyGate, HammerDetector, Plan, RateLimiter
from pqcnet.sentry.memo import Memo, headers_size
from pqcnet.sentry.metrics import SentryMetrics
from pqcnet.sentry.sanitizer import IdentitySanitizer, SanitizerPolicy
from pqcnet.sentry.usage import TenantUsage, Usage
from pqcnet.sentry.wire import RequestHead
from pqcnet.sentry.writewatch import WriteWatch

log = logging.getLogger("pqcnet.sentry")

#: TLS exporter label for per-backend keys (RFC 5705 labels start with "EXPORTER").
BACKEND_KEY_LABEL = b"EXPORTER-pqcnet-sentry-backend-key"


class PolicyLedger(Protocol):
    """Where policy digests are anchored (the QS-DAG in production)."""

    def anchor_policy(self, tenant: str, digest: bytes, description: str) -> None: ...


@dataclass(frozen=True, slots=True)
class TunnelView:
    """What the core needs to know about the tunnel a request arrived on."""

    #: authenticated peer identity (from its certificate)
    peer: SpiffeId
    #: TLS exporter channel binding of this tunnel
    channel_binding: bytes
    #: ``export(label, length)`` from the tunnel's TLS exporter
    export: Callable[[bytes, int], bytes]
    #: ``pause(retry_after)`` sends a tunnel-wide QSTP FLOW PAUSE to the peer (None
    #: when the transport has no flow control, e.g. in unit tests)
    pause: Callable[[float], None] | None = None
    #: this tunnel's rate-limit refusal counter (decides when to PAUSE it)
    hammer: HammerDetector = field(default_factory=HammerDetector)


@dataclass(frozen=True, slots=True)
class Admission:
    """A request that passed every check; the gate is held until :meth:`Sentry.release`."""

    assertion: SessionAssertion
    backend: BackendConfig
    key: str
    #: the tenant's usage row (requests and bytes are counted into it)
    usage: Usage = field(default_factory=Usage)


class Sentry:
    """Policy state of one sentry and the per-request decision pipeline."""

    def __init__(
        self,
        config: SentryConfig,
        *,
        clock: Callable[[], float] = time.time,
        ledger: PolicyLedger | None = None,
        metrics: SentryMetrics | None = None,
        started: SentryConfig | None = None,
    ) -> None:
        self.config = config
        #: the config file's static part at start, what a re-read file is compared
        #: with: a ``--workers`` worker runs a copy with its own port, metrics port and
        #: ledger (``started`` is the file as read), which is no change to report
        self._started_static = _static(started or config)
        self.clock = clock
        self.ledger = ledger
        self.metrics = metrics or SentryMetrics()
        p = config.policy
        self.verifier = AssertionVerifier(p.issuers, cache_size=p.assertion_cache_size,
                                          clock_skew=p.clock_skew)
        self.limiter = RateLimiter(p.plans, p.default_plan)
        self.gate = ConcurrencyGate(p.max_in_flight, p.tenant_share, p.tenant_caps)
        #: resets a response write that waited ``bounds.response_write_timeout``
        self.write_watch = WriteWatch(config.bounds.response_write_timeout)
        self.acl: AclPolicy = p.acl
        self.sanitizer = IdentitySanitizer(p.sanitizer)
        self.backends: dict[str, Backend] = {
            name: build_backend(cfg) for name, cfg in config.backends.items()
        }
        #: request headers -> (sanitizer policy, headers the backend sees)
        self._forward_headers: Memo[tuple[tuple[str, str], ...],
                                    tuple[SanitizerPolicy | None,
                                          tuple[tuple[str, str], ...]]] = Memo()
        self.metrics.bind_gauges(lambda: self.gate.in_flight, self._hit_ratio)
        self.metrics.bind_tenants(self._tenant_holders)
        #: what each tenant used (admitted requests by kind, payload bytes each way)
        self.usage = TenantUsage()
        self.metrics.bind_usage(lambda: self.usage.collect(self.config.policy.issuers))
        self._anchor_policies()

    def _tenant_holders(self) -> dict[str, int]:
        """Gate slots per tenant (this process's; every configured tenant, 0 included,
        so a series does not vanish while its tenant holds nothing)."""
        held = dict.fromkeys(self.config.policy.issuers, 0)
        held.update(self.gate.by_tenant)
        return held

    def _hit_ratio(self) -> float:
        total = self.verifier.hits + self.verifier.misses
        return self.verifier.hits / total if total else 0.0

    # ------------------------------------------------------------------ pipeline

    def authenticate(self, head: RequestHead, tunnel: TunnelView, now: float) -> SessionAssertion:
        """Verify the request's assertion for this tunnel (cached by digest)."""
        raw = head.assertion
        if not raw:
            for name, value in head.headers:
                if name.lower() == HEADER:
                    raw = from_header(value)
                    break
        if not raw:
            raise Unauthenticated(f"no session assertion ({HEADER} header) on the request")
        hits = self.verifier.hits
        try:
            return self.verifier.verify(raw, tenant=tunnel.peer.tenant,
                                        channel_binding=tunnel.channel_binding, now=now)
        finally:
            if self.verifier.hits > hits:
                self.metrics.cache_hits.inc()
            else:
                self.metrics.cache_misses.inc()

    def route(self, head: RequestHead) -> BackendConfig:
        """The backend a request goes to, or :class:`Denied` if none matches."""
        if head.kind == "tcp":
            cfg = self.config.backends.get(head.path)
            if cfg is None or cfg.kind != "tcp":
                raise Denied(f"no TCP backend named {head.path!r}")
            return cfg
        kind = "http" if head.kind == "ws" else head.kind  # a WebSocket starts as HTTP
        for r in self.config.routes:
            if r.kind == kind and head.path.startswith(r.prefix):
                return self.config.backends[r.backend]
        raise Denied(f"no route for {head.kind} {head.path!r}")

    def admit(self, head: RequestHead, tunnel: TunnelView, now: float | None = None) -> Admission:
        """Run every check; on success the caller must :meth:`release` exactly once."""
        now = self.clock() if now is None else now
        assertion = self.authenticate(head, tunnel, now)
        key = method_key(head.kind, head.method, head.path)
        self.acl.check(tunnel.peer, key, assertion.tenant)
        backend = self.route(head)
        AclPolicy.check_tenant(assertion.tenant, backend.name, backend.tenants)
        try:
            level = self.limiter.check(assertion.tenant, assertion.subject, now,
                                       str(tunnel.peer))
        except RateLimited:
            self.metrics.set_bucket_level(assertion.tenant, 0.0)
            raise
        self.metrics.set_bucket_level(assertion.tenant, level)
        self.gate.acquire(assertion.tenant)
        return Admission(assertion, backend, key, self.usage.row(assertion.tenant))

    def release(self, adm: Admission) -> None:
        """Give back the concurrency slot taken by :meth:`admit`."""
        self.gate.release(adm.assertion.tenant)

    def prepare(self, head: RequestHead, body: bytes, adm: Admission) -> ForwardRequest:
        """Sanitize and build the request the backend sees (assertion header removed)."""
        policy = self.sanitizer.for_tenant(adm.assertion.tenant)
        # pure in (headers, policy) and repeated by every request of a client: memoised
        got = self._forward_headers.get(head.headers)
        if got is not None and got[0] is policy:
            headers = got[1]
        else:
            kept = [(n, v) for n, v in head.headers if n.lower() != HEADER]
            headers = tuple(kept if policy is None else policy.sanitize_headers(kept))
            if headers_size(head.headers) <= self._forward_headers.max_item:
                self._forward_headers.put(head.headers, (policy, headers))
        if policy is not None and head.kind == "http":
            body = policy.sanitize_body(body)
        return ForwardRequest(head.method, head.path, headers, body, head.timeout)

    def backend(self, name: str) -> Backend:
        """The live backend object by name."""
        return self.backends[name]

    def tcp_backend(self, name: str) -> TcpBackend:
        """A TCP backend by name (route() already checked the kind)."""
        be = self.backends[name]
        if not isinstance(be, TcpBackend):
            raise Denied(f"backend {name!r} is not a TCP backend")
        return be

    @staticmethod
    def backend_key(tunnel: TunnelView, backend: str, length: int = 32) -> bytes:
        """Per-backend key from the tunnel exporter (distinct per tunnel and backend)."""
        return tunnel.export(BACKEND_KEY_LABEL + b"/" + backend.encode(), length)

    # ------------------------------------------------------------------ policy

    def reload_policy(self, policy: Policy) -> None:
        """Swap the hot-reloadable policy; tunnels and in-flight RPCs are untouched."""
        self.reload(policy)

    def apply_rate_limit(self, scope: str, rate: float, burst: float) -> Policy:
        """Hot-reload one plan (``scope="*"``: default and every tenant); returns the
        policy now in force."""
        try:
            plan = Plan(float(rate), float(burst))
        except (TypeError, ValueError):
            raise SentryConfigError(f"rate {rate!r} / burst {burst!r} are not numbers") from None
        policy = self.config.policy
        if scope == "*":
            new = replace(policy, default_plan=plan, plans={t: plan for t in policy.plans})
        elif scope:
            new = replace(policy, plans={**policy.plans, scope: plan})
        else:
            raise SentryConfigError("rate-limit scope must be a tenant name or '*'")
        self.reload(new)
        return new

    def set_max_in_flight(self, limit: int) -> None:
        """Hot-resize the global concurrency gate (holders above a lowered limit finish)."""
        self.gate.set_limit(limit)  # validates first
        self.config = replace(self.config, policy=replace(self.config.policy,
                                                          max_in_flight=limit))

    def set_acl(self, acl: AclPolicy) -> None:
        """Hot-replace the ACL; requests already admitted are unaffected."""
        self.acl = acl
        self.config = replace(self.config, policy=replace(self.config.policy, acl=acl))

    def reload(self, policy: Policy) -> None:
        """Swap the hot-reloadable policy; tunnels and in-flight RPCs are untouched."""
        now = self.clock()
        self.verifier.set_issuers(policy.issuers)
        self.verifier.cache_size = policy.assertion_cache_size
        self.verifier.clock_skew = policy.clock_skew
        self.limiter.set_plans(policy.plans, policy.default_plan, now)
        self.gate.set_limit(policy.max_in_flight)
        self.gate.set_caps(policy.tenant_share, policy.tenant_caps)
        self.acl = policy.acl
        old = self.sanitizer.digests()
        self.sanitizer = IdentitySanitizer(policy.sanitizer)
        self.config = replace(self.config, policy=policy)
        self._anchor_policies(skip=old)
        log.info("sentry policy reloaded", extra={"max_in_flight": policy.max_in_flight,
                                                  "tenants": sorted(policy.issuers)})

    def reload_file(self, new: SentryConfig) -> list[str]:
        """A re-read config file: swap its policy in, and name the static keys it changed
        (``listen``, ``backends``, ``bounds…``): they apply only at a restart, so they
        are logged and ``pqcnet_sentry_config_restart_pending`` is 1 until the file
        matches the running static part again. Returns those keys."""
        self.reload(new.policy)
        pending = changed_keys(self._started_static, _static(new))
        self.metrics.restart_pending.set(1 if pending else 0)
        if pending:
            log.warning("config keys changed that apply only at a restart",
                        extra={"keys": pending})
        return pending

    def _anchor_policies(self, skip: dict[str, bytes] | None = None) -> None:
        if self.ledger is None:
            return
        for tenant, digest in self.sanitizer.digests().items():
            if skip is not None and skip.get(tenant) == digest:
                continue
            self.ledger.anchor_policy(tenant, digest, "sentry identity sanitizer policy")

    async def aclose(self) -> None:
        """Close backend pools (and stop the write watch)."""
        await self.write_watch.aclose()
        for be in self.backends.values():
            await be.aclose()


def _static(cfg: SentryConfig) -> dict[str, Any]:
    """The static part of ``cfg`` as plain data (what a hot reload cannot change)."""
    return {f.name: plain(getattr(cfg, f.name)) for f in fields(cfg)
            if f.name not in ("policy", "source")}
