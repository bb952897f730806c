"""Prometheus metrics of one sentry, in its own registry (several sentries per process
in tests and benchmarks must not collide). Names follow ``pqcnet_sentry_<what>_<unit>``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pqcnet.qstp.aio import Server, server_metrics
from pqcnet.qstp.budget import ReceiveBudget, budget_metrics

OUTCOMES = ("ok", "unauthenticated", "denied", "rate_limited", "backend_error",
            "bad_request", "too_large", "error")
#: seconds; shared by the whole-request and the upstream histograms so their buckets
#: compare one to one
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 2.5, 10)


class _Children:
    """The labelled children of one single-label metric, resolved once per label value:
    ``labels()`` takes a lock and builds a key tuple on every call, which showed up per
    RPC in the hot path. Label values are bounded by config (outcomes, error classes,
    request kinds, tenants)."""

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[str, Any] = {}

    def __getitem__(self, label: str) -> Any:
        child = self._children.get(label)
        if child is None:
            child = self._children[label] = self._metric.labels(label)
        return child


class _Live(Collector):
    """Metrics computed at scrape time by ``collect`` (the QSTP receive budget's, the
    QSTP server's counters)."""

    def __init__(self, collect: Callable[[], Iterator[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        return self._collect()


class SentryMetrics:
    """All sentry instruments."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "pqcnet_sentry_requests_total", "RPCs by outcome", ["outcome"], registry=r
        )
        for o in OUTCOMES:
            self.requests.labels(o)
        self.rejections = Counter(
            "pqcnet_sentry_rejections_total",
            "Refused RPCs by precise reason (error class)",
            ["reason"],
            registry=r,
        )
        self.cache_hits = Counter(
            "pqcnet_sentry_assertion_cache_hits_total", "Assertions found verified", registry=r
        )
        self.cache_misses = Counter(
            "pqcnet_sentry_assertion_cache_misses_total",
            "Assertions that needed a signature check",
            registry=r,
        )
        self.cache_ratio = Gauge(
            "pqcnet_sentry_assertion_cache_hit_ratio", "hits / (hits + misses)", registry=r
        )
        self.bucket_level = Gauge(
            "pqcnet_sentry_token_bucket_level_tokens",
            "Tokens left in the bucket of the tenant's most recent client",
            ["tenant"],
            registry=r,
        )
        self.in_flight = Gauge(
            "pqcnet_sentry_in_flight_requests", "RPCs holding the concurrency gate", registry=r
        )
        self.tunnels = Gauge(
            "pqcnet_sentry_tunnels_active", "QSTP tunnels currently open", registry=r
        )
        self.restart_pending = Gauge(
            "pqcnet_sentry_config_restart_pending",
            "1 while the config file's static part differs from the running one (those "
            "keys apply at a restart; the reload's log line names them)", registry=r
        )
        self.latency = Histogram(
            "pqcnet_sentry_request_duration_seconds",
            "Time from head received to response end",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_latency = Histogram(
            "pqcnet_sentry_upstream_duration_seconds",
            "Time from handing a request to its backend (pool checkout, write) until the "
            "response head, and a small body, is in: the backend's share of "
            "pqcnet_sentry_request_duration_seconds (answered requests; names are config's)",
            ["backend"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.flow_pauses = Counter(
            "pqcnet_sentry_flow_pauses_total",
            "QSTP FLOW PAUSEs sent to tunnels that kept hammering after refusals",
            registry=r,
        )
        self.attestations = Counter(
            "pqcnet_sentry_attestations_total", "Attestation events emitted", registry=r
        )

        self._requests = _Children(self.requests)
        self._rejections = _Children(self.rejections)
        self._latency = _Children(self.latency)
        self._upstream = _Children(self.upstream_latency)
        self._levels = _Children(self.bucket_level)
        self._budget: _Live | None = None
        self._server: _Live | None = None
        self._holders: Callable[[], Mapping[str, int]] = dict
        self.registry.register(_Live(self._tenant_metrics))

    def bind_gauges(self, in_flight: Callable[[], float], ratio: Callable[[], float]) -> None:
        """Read live values at scrape time."""
        self.in_flight.set_function(in_flight)
        self.cache_ratio.set_function(ratio)

    def bind_tenants(self, holders: Callable[[], Mapping[str, int]]) -> None:
        """Read each tenant's slots of the concurrency gate at scrape time (tenants are
        config-bounded: the label set is)."""
        self._holders = holders

    def _tenant_metrics(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "pqcnet_sentry_tenant_in_flight_requests",
            "RPCs of each tenant holding the concurrency gate (its cap: limits.tenant_share)",
            labels=["tenant"])
        for tenant, held in sorted(self._holders().items()):
            family.add_metric([tenant], held)
        yield family

    def bind_usage(self, collect: Callable[[], Iterator[Metric]]) -> None:
        """Export each tenant's usage (:mod:`pqcnet.sentry.usage`) at scrape time."""
        self.registry.register(_Live(collect))

    def bind_budget(self, budget: ReceiveBudget | None) -> None:
        """Export the QSTP receive budget the sentry's tunnels share (read at scrape
        time); a later call (a new server for the same sentry) replaces the earlier."""
        if self._budget is not None:
            self.registry.unregister(self._budget)
            self._budget = None
        if budget is not None:
            self._budget = _Live(lambda: budget_metrics(budget, "sentry"))
            self.registry.register(self._budget)

    def bind_server(self, server: Callable[[], Server | None]) -> None:
        """Export the handshake counters of the QSTP server ``server()`` returns at
        scrape time; a later call replaces the earlier."""
        if self._server is not None:
            self.registry.unregister(self._server)
        self._server = _Live(lambda: server_metrics(server(), "sentry"))
        self.registry.register(self._server)

    def count(self, outcome: str, reason: str | None = None) -> None:
        """Count one finished RPC."""
        self._requests[outcome].inc()
        if reason is not None:
            self._rejections[reason].inc()

    def observe_latency(self, kind: str, seconds: float) -> None:
        """One finished RPC's duration."""
        self._latency[kind].observe(seconds)

    def observe_upstream(self, backend: str, seconds: float) -> None:
        """How long one answered request waited on its backend (backend names are
        config-bounded)."""
        self._upstream[backend].observe(seconds)

    def set_bucket_level(self, tenant: str, tokens: float) -> None:
        """Bucket level of the tenant's most recent client (tenants are config-bounded)."""
        self._levels[tenant].set(tokens)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current sample value (tests and the benchmark read metrics through this)."""
        v = self.registry.get_sample_value(name, labels or {})
        return 0.0 if v is None else v
