"""Reading a running pqcnet process's own Prometheus ``/metrics`` from a benchmark.

Why scrape rather than count in the bench: the figures a benchmark reports next to its
own (how long the sentry held a request, how much of it was its backend's) are the ones
an operator's Prometheus sees, read the same way; the parser is prometheus_client's.
"""

from __future__ import annotations

from collections.abc import Iterable

import httpx
from prometheus_client.parser import text_string_to_metric_families

#: a scrape of a loopback process that takes longer is an error, not a figure
SCRAPE_TIMEOUT_S = 10.0


def histogram_totals(url: str, families: Iterable[str]) -> dict[str, float]:
    """``{family}_sum`` and ``{family}_count`` of each histogram family at ``url``,
    summed over its label sets (absent families are absent from the result)."""
    wanted = set(families)
    totals: dict[str, float] = {}
    text = httpx.get(url, timeout=SCRAPE_TIMEOUT_S).text
    for family in text_string_to_metric_families(text):
        if family.name not in wanted:
            continue
        for sample in family.samples:
            if sample.name.endswith(("_sum", "_count")):
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals
