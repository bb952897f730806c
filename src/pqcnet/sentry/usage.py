"""What each tenant used through one sentry: admitted requests by kind, bytes each way.

A node operator is paid for what its customers used, and a customer disputes what it
cannot see: the sentry counts both per tenant. Plain integers on the request path (one
event loop per process: no lock, no ``labels()`` call per RPC), exported at scrape time
as ``pqcnet_sentry_tenant_requests_total{tenant,kind}`` and
``pqcnet_sentry_tenant_bytes_total{tenant,direction}``.

* A request counts once it passed every check (assertion, ACL, tenant, rate limit,
  gate) — refusals are in ``pqcnet_sentry_rejections_total`` — whatever the backend
  then answers. A TCP pipe, a WebSocket and a streaming gRPC call count once each.
* Bytes are payload, never heads or tunnel framing: ``up`` is what the backend was sent
  (HTTP request bodies after the identity sanitizer, gRPC messages, every byte of a
  TCP pipe or WebSocket after its handshake), ``down`` what the client was sent
  (response bodies, gRPC messages, pipe bytes). An HTTP request whose backend failed
  to answer is counted as a request but its body is not charged.

Tenants are the configured issuers' (only an authenticated tenant gets a row), so the
label set is bounded by the config. With ``--workers N`` each worker counts its own
and Prometheus sums them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, Metric

from pqcnet.sentry import wire

#: request kinds as counted: the wire's, and ``grpc-stream`` for a streaming gRPC call
#: (derived, so a new wire kind cannot reach the counters without a row)
KINDS = (*wire.KINDS, "grpc-stream")


def _zeros() -> dict[str, int]:
    return dict.fromkeys(KINDS, 0)


@dataclass(slots=True)
class Usage:
    """One tenant's counts (mutated in place on the request path)."""

    #: admitted requests by kind
    requests: dict[str, int] = field(default_factory=_zeros)
    #: payload bytes sent to backends
    up: int = 0
    #: payload bytes sent to clients
    down: int = 0
    #: seconds the tenant's pipes waited for its ``pipe_rate`` (summed over pipes)
    pipe_throttled: float = 0.0


class TenantUsage:
    """The rows of every tenant that was admitted at least once."""

    def __init__(self) -> None:
        self.rows: dict[str, Usage] = {}

    def row(self, tenant: str) -> Usage:
        """``tenant``'s row (created on its first admission)."""
        got = self.rows.get(tenant)
        if got is None:
            got = self.rows[tenant] = Usage()
        return got

    def collect(self, tenants: Iterable[str]) -> Iterator[Metric]:
        """Both counter families; ``tenants`` (the configured ones) appear with zeros
        before their first request, so a series never starts mid-way."""
        names = sorted(set(tenants) | set(self.rows))
        requests = CounterMetricFamily(
            "pqcnet_sentry_tenant_requests",
            "Requests admitted per tenant and kind (a pipe or streaming call counts once)",
            labels=["tenant", "kind"])
        sent = CounterMetricFamily(
            "pqcnet_sentry_tenant_bytes",
            "Payload bytes per tenant: up = to backends, down = to clients (no heads, no "
            "tunnel framing)", labels=["tenant", "direction"])
        throttled = CounterMetricFamily(
            "pqcnet_sentry_tenant_pipe_throttled_seconds",
            "Seconds the tenant's pipes (TCP, WebSocket) waited for its plan's pipe_rate, "
            "summed over its pipes", labels=["tenant"])
        empty = Usage()
        for tenant in names:
            u = self.rows.get(tenant, empty)
            for kind, n in u.requests.items():
                requests.add_metric([tenant, kind], n)
            sent.add_metric([tenant, "up"], u.up)
            sent.add_metric([tenant, "down"], u.down)
            throttled.add_metric([tenant], u.pipe_throttled)
        yield requests
        yield sent
        yield throttled
