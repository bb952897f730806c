"""Small shared pieces of every benchmark's JSON: percentiles and the machine's state.

Why the machine's state in every result: these benchmarks run on small shared
machines, where a load average of 4 on 2 cores halves a wall-clock rate. A number
without the load it was taken under cannot be compared with another.
"""

from __future__ import annotations

import datetime as dt
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def percentiles(samples_s: Sequence[float]) -> dict[str, Any]:
    """p50/p99 in milliseconds of latencies given in seconds (None when empty)."""
    if not samples_s:
        return {"p50_ms": None, "p99_ms": None, "n": 0}
    ordered = sorted(samples_s)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"p50_ms": round(statistics.median(ordered) * 1000, 3),
            "p99_ms": round(p99 * 1000, 3), "n": len(ordered)}


def loadavg() -> list[float] | None:
    """1/5/15-minute load averages (None where /proc is missing)."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None


def machine() -> dict[str, Any]:
    """When and on what a run happened: UTC time, cores, load averages."""
    return {"utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S"),
            "cpus": os.cpu_count(), "loadavg": loadavg()}


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b rounded, or None when either side was not measured."""
    if a is None or not b:
        return None
    return round(a / b, 3)
