"""``ReceiveBudget``: the receive credit all QSTP connections of one process may grant.

Why: each connection's window bounds what *one* peer can make us buffer
(``QstpConfiguration.connection_window``, a server's ``tunnel_buffer_bytes``), but a
server with ``max_tunnels`` tunnels could still be made to hold their product — 8 GiB
with the defaults — when its application reads slowly. A budget caps the sum.

How: every connection starts with :data:`~pqcnet.qstp.config.INITIAL_WINDOW` (both
sides assume it; it cannot be withheld), and takes the rest of its window from the
budget when it grants its preface credit. A connection that gets less than its full
window works with the smaller one: it returns credit at half of the window it has,
and tops its reservation up from the budget whenever it returns credit, so it grows
back to the full window once other connections closed. A connection gives its whole
reservation back when it terminates. Credit already granted is never taken back
(the peer may send it), so the budget is first come, first served; a tunnel that
keeps its full window while idle holds it until it closes.

So the bytes a process may be made to buffer are at most ``total`` plus
``INITIAL_WINDOW`` per connection. Single-threaded: the connections of one event loop
share it (a sentry or relayer with ``--workers N`` has one budget per worker process).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric


class ReceiveBudget:
    """Bytes of receive credit beyond the initial window, shared by connections."""

    __slots__ = ("reduced_starts", "reserved", "total")

    def __init__(self, total: int) -> None:
        if total < 0:
            raise ValueError(f"receive budget must be >= 0 bytes, got {total}")
        self.total = total
        #: bytes reserved by live connections now
        self.reserved = 0
        #: connections that started with less than their full window (budget short)
        self.reduced_starts = 0

    @property
    def free(self) -> int:
        """Bytes not reserved by any connection."""
        return self.total - self.reserved

    def reserve_window(self, want: int) -> int:
        """A new connection's window beyond the initial one: :meth:`take`, counting a
        start with less than ``want`` in ``reduced_starts``."""
        got = self.take(want)
        if got < want:
            self.reduced_starts += 1
        return got

    def take(self, want: int) -> int:
        """Reserve up to ``want`` bytes; returns how many were reserved (0 when spent)."""
        n = max(0, min(want, self.total - self.reserved))
        self.reserved += n
        return n

    def give_back(self, n: int) -> None:
        """Return ``n`` bytes a connection reserved (it terminated)."""
        if n < 0 or n > self.reserved:
            raise ValueError(f"giving back {n} bytes of {self.reserved} reserved")
        self.reserved -= n


def budget_metrics(budget: ReceiveBudget | None, role: str) -> Iterator[Metric]:
    """The budget's metric families for a role's collector (``role``: ``relayer``,
    ``sentry``): bytes reserved and the total, and the tunnels that started with a
    reduced window. Nothing without a budget."""
    if budget is None:
        return
    size = GaugeMetricFamily(f"pqcnet_{role}_tunnel_buffer_budget_bytes",
                             "Receive credit beyond 64 KiB per tunnel that all tunnels "
                             "may hold (total) and hold now (reserved)", labels=["state"])
    size.add_metric(["total"], budget.total)
    size.add_metric(["reserved"], budget.reserved)
    yield size
    yield CounterMetricFamily(f"pqcnet_{role}_tunnel_reduced_windows",
                              "Tunnels that opened with less than their full receive "
                              "window because the budget was spent",
                              value=budget.reduced_starts)
