"""Process CPU for the benchmarks: what a process used, and waiting until it is quiet.

Why from ``/proc``: the processes measured (a relayer, a sentry, nats-server) are not
this one, and wall-clock rates on a small shared machine swing with other load while
CPU seconds per operation do not. Why a settle step: a latency run that starts while
the previous saturated phase's after-work still runs (log trims, buffers, GC, a
broker's flushes) bills that work to the first requests; both sides of a comparison
(pqcnet and its peer) wait for quiet the same way.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from pathlib import Path

#: quiet: at most this CPU share of one core per process, over SETTLE_WINDOW s ...
SETTLE_SHARE = 0.05
SETTLE_WINDOW = 0.5
#: ... or given up after this many seconds (reported, not an error)
SETTLE_MAX = 15.0


def run_delay_seconds(pid: int) -> float:
    """Seconds the live threads of a process spent runnable but waiting for a core
    (``/proc/<pid>/task/*/schedstat``, second field): on two shared cores, the part of
    a request's latency that is the scheduler's, not the process's own work."""
    total = 0
    for f in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            total += int(f.read_text().split()[1])
        except (OSError, IndexError, ValueError):  # a thread that ended meanwhile
            continue
    return total / 1e9


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) clock ticks of all cores so far (``/proc/stat``'s ``cpu`` line;
    idle and iowait are not busy)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (``/proc/<pid>/stat``)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # after "(comm)": state is field 3
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def settle(pids: Sequence[int]) -> dict[str, float]:
    """Wait until ``pids`` are quiet (see :data:`SETTLE_SHARE`); returns how long it
    took and the CPU share of the last window."""
    t0 = time.monotonic()
    while True:
        c0 = sum(cpu_seconds(p) for p in pids)
        await asyncio.sleep(SETTLE_WINDOW)
        share = (sum(cpu_seconds(p) for p in pids) - c0) / SETTLE_WINDOW / len(pids)
        waited = time.monotonic() - t0
        if share <= SETTLE_SHARE or waited >= SETTLE_MAX:
            return {"settled_after_s": round(waited, 2), "settle_cpu_share": round(share, 3)}
