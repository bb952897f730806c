"""Prometheus metrics of one ``pqcnet sidecar`` process: its pool of sentries as it
sees them, and how long each sentry took to answer.

Why the sidecar needs its own: it is the only place that sees the whole round trip a
local app waits on (tunnel, sentry, backend) and which sentry of its pool served it;
the sentry's ``pqcnet_sentry_request_duration_seconds`` starts once the request is off
the tunnel, and ``pqcnet_sentry_upstream_duration_seconds`` is the backend's share of
that. Subtract one from the next and each hop's time is known.

Only the round trip is measured per request (a cached histogram child per sentry,
one ``observe``); the pool state (up, outstanding, answered, marked down, failovers) is
read from :class:`~pqcnet.sentry.pool.SentryPool` at scrape time, so it costs nothing
on the request path. Labels are the ``--sentry`` addresses: bounded by the command line.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pqcnet.sentry.metrics import LATENCY_BUCKETS
from pqcnet.sentry.pool import SentryPool


class _PoolState(Collector):
    """The pool's members, read when Prometheus scrapes."""

    def __init__(self, pool: SentryPool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "pqcnet_sidecar_sentry_up",
            "1 while the sentry is in rotation (its last dial, request or PING "
            "succeeded), 0 while it is marked down", labels=["sentry"])
        outstanding = GaugeMetricFamily(
            "pqcnet_sidecar_sentry_outstanding_requests",
            "Requests sent to the sentry whose response head has not arrived (what "
            "least-outstanding-requests balances on)", labels=["sentry"])
        answered = CounterMetricFamily(
            "pqcnet_sidecar_sentry_responses",
            "Requests the sentry answered with a response head", labels=["sentry"])
        down = CounterMetricFamily(
            "pqcnet_sidecar_sentry_marked_down",
            "Times the sentry was taken out of rotation (a failed dial, send, response "
            "or health check)", labels=["sentry"])
        for m in self.pool.members:
            up.add_metric([m.name], 1.0 if m.healthy else 0.0)
            outstanding.add_metric([m.name], m.outstanding)
            answered.add_metric([m.name], m.served)
            down.add_metric([m.name], m.failures)
        yield from (up, outstanding, answered, down)
        yield CounterMetricFamily(
            "pqcnet_sidecar_failovers",
            "Idempotent requests replayed on another sentry after the first one failed",
            value=self.pool.failovers)


class SidecarMetrics:
    """The sidecar's registry: the per-sentry round-trip histogram (observed by the
    pool) and the pool's state (collected at scrape time)."""

    def __init__(self, pool: SentryPool, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.round_trip = Histogram(
            "pqcnet_sidecar_sentry_round_trip_seconds",
            "Time from handing a request to the pool until its sentry's response head "
            "is in: tunnel, sentry and backend together, per sentry that answered",
            ["sentry"], buckets=LATENCY_BUCKETS, registry=self.registry)
        for m in pool.members:
            m.observe = self.round_trip.labels(m.name).observe
        self.registry.register(_PoolState(pool))


__all__ = ["SidecarMetrics"]
