"""Run one scenario: build the world, drive it, and summarize what it showed.

The summary has two parts. Everything except ``run`` is a function of the scenario and
the seed — the determinism test compares it between two runs byte for byte. ``run``
holds what depends on the machine: wall time, CPU seconds, peak RSS, load average,
versions, date.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import logging
import math
import os
import platform
import resource
import sys
import time
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pqcnet.sim.config import Scenario
from pqcnet.sim.crypto import verify_once
from pqcnet.sim.metrics import MessageRecord, summary
from pqcnet.sim.workloads import WORKLOADS, Workload
from pqcnet.sim.world import World

#: Relay kinds whose delivery ratio is reported (inbox messages have one recipient).
BROADCAST_KINDS = ("data", "announce", "routes", "governance", "relay-reports", "dagsync",
                   "forged", "replayed")
#: Loggers of the node code the simulator runs (quietened during a run).
NODE_LOGGERS = ("pqcnet.mesh", "pqcnet.qsdag", "pqcnet.relayer", "pqcnet.sentry")
#: A node (and a publisher) joins the delivery population this long after it joined.
JOIN_GRACE_S = 10.0
#: Housekeeping period: forget payloads and duplicate-detection state past the seen TTL.
SWEEP_S = 60.0


@dataclass
class RunResult:
    summary: dict[str, Any]
    records: list[MessageRecord]
    timeline: list[dict[str, Any]]
    #: kind -> latencies (seconds) of every first reception
    latencies: dict[str, list[float]] = field(default_factory=dict)


@contextlib.contextmanager
def _quiet_nodes() -> Iterator[None]:
    """Node loggers at ERROR for the run: a thousand agents each warning about every
    forged directive they refuse would cost more than simulating them, and the
    simulator counts those events itself (``handled_by_agents``, drops, events)."""
    loggers = [logging.getLogger(n) for n in NODE_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def run(scenario: Scenario, *, progress: Callable[[float], None] | None = None) -> RunResult:
    """Simulate ``scenario``; ``progress(now)`` is called once per simulated second."""
    with _quiet_nodes():
        return _run(scenario, progress)


def _run(scenario: Scenario, progress: Callable[[float], None] | None) -> RunResult:
    wall0, cpu0 = time.perf_counter(), time.process_time()
    load0 = os.getloadavg()
    with verify_once(scenario.verify_cache) as vstats:
        world = World(scenario, vstats)
        workload = WORKLOADS[scenario.workload.kind](world)
        workload.schedule()
        ttl = scenario.gossipsub.seen_ttl_s + SWEEP_S
        next_sweep = [SWEEP_S]

        def tick(now: float) -> None:
            workload.sample(now)
            if now >= next_sweep[0]:
                next_sweep[0] += SWEEP_S
                world.relay.forget_payloads(now - ttl)
                world.rec.forget_before(now - ttl)
            if progress is not None:
                progress(now)

        try:
            world.engine.run(scenario.duration_s, tick=tick)
            results = workload.results()
        finally:
            workload.close()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    out: dict[str, Any] = {
        "scenario": scenario.to_dict(),
        "seed": scenario.seed,
        "nodes": scenario.nodes,
        "events": world.engine.events,
        "relay": relay_section(world),
        "network": network_section(world),
        "crypto": {"verify_cache": scenario.verify_cache, "verifications_real": vstats.real,
                   "verifications_cached": vstats.cached,
                   "verifications_failed": vstats.failures},
        "handled_by_agents": dict(sorted(world.handled.items())),
        "directives_applied_twice": sum(1 for n in world.applications.values() if n > 1),
    }
    out.update(results)
    out["run"] = machine_section(wall, cpu, load0, scenario)
    latencies = {k: list(v) for k, v in world.rec.latency.items()}
    return RunResult(out, list(world.rec.records.values()), workload.timeline, latencies)


def _delivery(world: World) -> dict[str, Any]:
    rec = world.rec
    joined = sorted(world.joined)
    churned = sorted(rec.downtime)
    out: dict[str, Any] = {}
    per_kind: dict[str, list[float]] = {}
    during_split: dict[str, list[float]] = {}
    end = world.sc.duration_s
    for r in rec.records.values():
        if r.kind not in BROADCAST_KINDS or r.t0 + rec.window_s > end:
            continue
        t1 = r.t0 + rec.window_s
        # a node counts once it has been up JOIN_GRACE_S (time to dial and be grafted)
        cut = r.t0 - JOIN_GRACE_S
        if world.joined[r.origin] > cut:
            continue
        eligible = bisect_right(joined, cut) - 1
        eligible -= sum(1 for i in churned if i != r.origin and world.joined[i] <= cut
                        and not rec.up_throughout(i, cut, t1))
        if eligible <= 0:
            continue
        got = min(1.0, r.receivers / eligible)
        target = during_split if rec.split_during(r.t0, t1) else per_kind
        target.setdefault(r.kind, []).append(got)
    for kind, ratios in sorted(per_kind.items()):
        out[kind] = {"messages": len(ratios), "mean": round(sum(ratios) / len(ratios), 6),
                     "min": round(min(ratios), 6),
                     "complete": sum(1 for x in ratios if x >= 1.0)}
    if during_split:
        out["during_partition"] = {k: round(sum(v) / len(v), 6)
                                   for k, v in sorted(during_split.items())}
    return out


def relay_section(world: World) -> dict[str, Any]:
    rec, relay = world.rec, world.relay
    deliveries = sum(len(v) for v in rec.latency.values())
    latency = {k: {m: (round(v * 1000, 3) if m != "count" else v)
                   for m, v in summary(rec.latency[k]).items()}
               for k in sorted(rec.latency)}
    hops = {}
    for k in sorted(rec.hops):
        values = [float(h) for h, c in rec.hops[k].items() for _ in range(c) if h > 0]
        hops[k] = {m: round(v, 3) for m, v in summary(values).items()}
        hops[k]["via_gossip"] = rec.hops[k].get(0, 0)
    published = dict(sorted(Counter(r.kind for r in rec.records.values()).items()))
    return {
        "published": published,
        "delivery_ratio": _delivery(world),
        "latency_ms": latency,
        "hops": hops,
        "deliveries": deliveries,
        "duplicates_received": relay.stats["duplicates"],
        "amplification": round(relay.stats["duplicates"] / deliveries, 4) if deliveries else 0,
        "duplicates_to_app": rec.app_dups,
        "control": dict(relay.stats),
        "bytes_by_kind": dict(sorted(relay.bytes_by_kind.items())),
        "records_kept": len(rec.records), "records_dropped": rec.records_dropped,
    }


def network_section(world: World) -> dict[str, Any]:
    net, dur = world.net, world.sc.duration_s
    inb = [float(b) for b in net.bytes_in]
    outb = [float(b) for b in net.bytes_out]

    def per_node(values: list[float]) -> dict[str, float]:
        s = summary(values)
        return {"mean_bytes": round(s["mean"], 1), "p99_bytes": s["p99"], "max_bytes": s["max"],
                "mean_bps": round(s["mean"] * 8 / dur, 1)}

    return {"bytes_in_per_node": per_node(inb), "bytes_out_per_node": per_node(outb),
            "messages_in": sum(net.msgs_in), "dropped": dict(net.dropped),
            "log2_nodes": round(math.log2(world.sc.nodes), 3)}


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_section(wall: float, cpu: float, load0: tuple[float, float, float],
                    scenario: Scenario) -> dict[str, Any]:
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    node_hours = scenario.nodes * scenario.duration_s / 3600
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "cpu_s_per_node_hour": round(cpu / node_hours, 4) if node_hours else None,
        "sim_s_per_wall_s": round(scenario.duration_s / wall, 3) if wall else None,
        "loadavg_start": [round(x, 2) for x in load0],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "versions": {"pqcnet": _version("pqcnet"), "python": sys.version.split()[0],
                     "cryptography": _version("cryptography"),
                     "matplotlib": _version("matplotlib")},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "processor": platform.processor() or platform.machine()},
    }


def strip_run(summary_: dict[str, Any]) -> dict[str, Any]:
    """The deterministic part of a summary (everything but ``run``)."""
    return {k: v for k, v in summary_.items() if k != "run"}


__all__ = ["RunResult", "Workload", "run", "strip_run"]
