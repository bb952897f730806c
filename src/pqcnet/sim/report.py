"""``pqcnet sim report``: a Markdown page over a results directory, and sweeps.

The report has one section per run (its key metrics and its plots), a scale table
across runs, and the comparison with Waku's published Shadow run — 1000 nwaku nodes,
100 ms links, D = 6, 10 kB messages: mean 508 ms, p95 < 627 ms, 100 % delivery — for
every run whose scenario used the same link latency and D.

A sweep runs a grid (scenarios x sizes x seeds) with ``jobs`` worker processes; each
run is one process, single-threaded and deterministic, so the grid's results do not
depend on ``jobs``. A run that fails (a bug, memory) does not stop the others: the sweep
ends with :class:`~pqcnet.sim.errors.SweepFailed` naming it, the others written.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pqcnet.sim.config import Scenario, load, override
from pqcnet.sim.errors import SweepFailed
from pqcnet.sim.output import dir_name, partial_dirs, scaling_plot, write_run
from pqcnet.sim.run import run

WAKU_SHADOW = {"nodes": 1000, "latency_ms": 100.0, "D": 6, "msg_bytes": 10_000,
               "mean_ms": 508.0, "p95_ms": 627.0, "delivery": 1.0}
#: "within ±20 %" of Waku's figures, as the issue sets it.
TOLERANCE = 0.20


def load_summaries(results: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(results.glob("*/summary.json")):
        if path.parent.name.startswith("."):  # an unfinished write (sim.output)
            continue
        data = json.loads(path.read_text())
        data["_dir"] = path.parent.name
        out.append(data)
    return out


def waku_comparable(s: dict[str, Any]) -> bool:
    sc = s["scenario"]
    lat = sc["network"]["latency"]
    return (lat["kind"] == "constant" and lat["ms"] == WAKU_SHADOW["latency_ms"]
            and sc["gossipsub"]["D"] == WAKU_SHADOW["D"]
            and sc["workload"]["msg_bytes"] == WAKU_SHADOW["msg_bytes"]
            and "data" in s["relay"]["latency_ms"])


def waku_row(s: dict[str, Any]) -> dict[str, Any]:
    lat = s["relay"]["latency_ms"]["data"]
    dr = s["relay"]["delivery_ratio"].get("data", {}).get("mean")
    return {"run": s["_dir"], "nodes": s["nodes"], "mean_ms": lat["mean"], "p95_ms": lat["p95"],
            "delivery": dr,
            "mean_vs_waku": round(lat["mean"] / WAKU_SHADOW["mean_ms"] - 1, 3),
            "p95_vs_waku": round(lat["p95"] / WAKU_SHADOW["p95_ms"] - 1, 3)}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "—" if v is None else str(v)


def _headline(s: dict[str, Any]) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [("wall s", s["run"]["wall_s"]),
                                   ("peak RSS MiB", s["run"]["peak_rss_mib"]),
                                   ("events", s["events"])]
    for kind, d in s["relay"]["delivery_ratio"].items():
        if isinstance(d, dict) and "mean" in d:
            rows.append((f"delivery {kind} (mean / min)", f"{d['mean']:.4f} / {d['min']:.4f}"))
    lat = s["relay"]["latency_ms"].get("data")
    if lat:
        rows.append(("data latency ms mean/p50/p95/p99/max",
                     "/".join(f"{lat[k]:.0f}" for k in ("mean", "p50", "p95", "p99", "max"))))
    rows.append(("duplicates to app", s["relay"]["duplicates_to_app"]))
    rows.append(("amplification (dups per delivery)", s["relay"]["amplification"]))
    net = s["network"]
    rows.append(("bytes in/out per node (mean)",
                 f"{net['bytes_in_per_node']['mean_bytes']:.0f} / "
                 f"{net['bytes_out_per_node']['mean_bytes']:.0f}"))
    for section in ("formation", "directive", "churn", "partition", "adversaries"):
        if section in s:
            rows.append((section, "`" + json.dumps(_compact(s[section]))[:600] + "`"))
    return rows


def _compact(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _compact(v) for k, v in d.items() if k not in ("ledger_vertices",)}
    return d


def render(results: Path) -> str:
    summaries = load_summaries(results)
    lines = ["# pqcnet simulation report", "",
             f"{len(summaries)} run(s) under `{results}`.", ""]
    comparable = [waku_row(s) for s in summaries if waku_comparable(s)]
    lines += ["## Against Waku's Shadow figures", "",
              "Waku (nwaku, Shadow, 1000 nodes, 100 ms links, D=6, 10 kB): mean 508 ms, "
              "p95 < 627 ms, 100 % delivery. Runs with the same link latency, D and size:", ""]
    if comparable:
        lines += ["| run | nodes | mean ms | p95 ms | delivery | mean vs Waku | p95 vs Waku |",
                  "|---|---|---|---|---|---|---|"]
        for r in comparable:
            lines.append(f"| {r['run']} | {r['nodes']} | {r['mean_ms']:.0f} | {r['p95_ms']:.0f} | "
                         f"{_fmt(r['delivery'])} | {r['mean_vs_waku']:+.1%} | "
                         f"{r['p95_vs_waku']:+.1%} |")
    else:
        lines.append("(no comparable run)")
    scale = [scale_row(s) for s in summaries if s["scenario"]["workload"]["kind"] == "scale"]
    if len(scale) > 1:
        png = scaling_plot(scale, results / "scaling.png")
        lines += ["", "## Scale", "",
                  "| run | nodes | log2 N | wall s | CPU s | CPU s / node-hour | peak RSS MiB | "
                  "msgs in / node | bytes in / node | route-update bytes / node | "
                  "data latency mean / p95 ms |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(scale, key=lambda r: r["nodes"]):
            lines.append(
                f"| {r['name']} | {r['nodes']} | {r['log2_nodes']:.2f} | {r['wall_s']:.1f} | "
                f"{r['cpu_s']:.1f} | {r['cpu_s_per_node_hour']:.3f} | {r['peak_rss_mib']:.0f} | "
                f"{r['msgs_in_per_node']:.0f} | {r['bytes_in_per_node']:.0f} | "
                f"{r['route_bytes_per_node']:.0f} | {r['latency']} |")
        if png:
            lines += ["", f"![scaling]({png})"]
    for s in summaries:
        lines += ["", f"## {s['_dir']}", "", s["scenario"].get("description", "").strip(), "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in _headline(s)]
        for png in s["run"].get("plots", []) if isinstance(s["run"].get("plots"), list) else []:
            lines += ["", f"![{png}]({s['_dir']}/{png})"]
    return "\n".join(lines) + "\n"


def scale_row(s: dict[str, Any]) -> dict[str, Any]:
    n = s["nodes"]
    lat = s["relay"]["latency_ms"].get("data", {})
    return {"name": s["_dir"], "nodes": n, "log2_nodes": s["network"]["log2_nodes"],
            "wall_s": s["run"]["wall_s"], "cpu_s": s["run"]["cpu_s"],
            "cpu_s_per_node_hour": s["run"]["cpu_s_per_node_hour"] or 0.0,
            "peak_rss_mib": s["run"]["peak_rss_mib"],
            "msgs_in_per_node": s["network"]["messages_in"] / n,
            "bytes_in_per_node": s["network"]["bytes_in_per_node"]["mean_bytes"],
            "route_bytes_per_node": s["relay"]["bytes_by_kind"].get("routes", 0) / n,
            "latency": f"{lat.get('mean', 0):.0f} / {lat.get('p95', 0):.0f}"}


#: One run of a sweep: scenario file, overrides, results directory, plots.
Job = tuple[str, dict[str, Any], str, bool]


def _one(job: tuple[int, Job]) -> tuple[int, str, str | None]:
    """Run and write one grid entry: ``(index, run directory, None)``, or ``(index,
    run name, "<ExceptionType>: text")`` when it failed — a failed run does not stop
    the others."""
    i, (path, assignments, out, plots) = job
    scenario = override(load(path), assignments)
    try:
        return i, str(write_run(run(scenario), Path(out), plots=plots)), None
    except Exception as exc:  # reported with the run's name: SweepFailed
        name = dir_name(scenario.name, scenario.nodes, scenario.seed)
        return i, name, f"{type(exc).__name__}: {exc}"


def sweep(paths: list[str], sizes: list[int], seeds: list[int], out: Path, *, jobs: int,
          extra: dict[str, Any] | None = None, plots: bool = True,
          done: Callable[[str, str | None], None] | None = None) -> list[str]:
    """Run every (scenario, size, seed); returns the run directories in grid order.
    ``done(run, error)`` is called as each run ends (in the order they end). A run that
    fails does not stop the others; once all ended, :class:`SweepFailed` names the
    failed ones."""
    grid: list[Job] = [(p, {**(extra or {}), "nodes": n, "seed": s}, str(out), plots)
                       for p in paths for n in sizes for s in seeds]
    names = []
    for path, assignments, _, _ in grid:  # fail fast on a bad grid, before any work
        sc = override(load(path), assignments)
        names.append(dir_name(sc.name, sc.nodes, sc.seed))
    ended: dict[int, tuple[str, str | None]] = {}

    def note(result: tuple[int, str, str | None]) -> None:
        i, where, error = result
        ended[i] = (where, error)
        if done is not None:
            done(where, error)

    if jobs <= 1:
        for job in enumerate(grid):
            note(_one(job))
    else:
        # multiprocessing's Pool, not ProcessPoolExecutor: leaving its block by an
        # exception (SIGINT/SIGTERM under pqcnet._util.signals.stopping) terminates the
        # workers, where the executor would wait for every run in flight to finish
        try:
            with multiprocessing.get_context("fork").Pool(
                    jobs, initializer=_worker_signals) as pool:
                for result in pool.imap_unordered(_one, enumerate(grid), chunksize=1):
                    note(result)
        except BaseException:  # a worker terminated mid-write leaves its partial directory
            for name in names:
                for stale in partial_dirs(out, name):
                    shutil.rmtree(stale, ignore_errors=True)
            raise
    failed = {where: error for where, error in (ended[i] for i in sorted(ended))
              if error is not None}
    dirs = [where for where, error in (ended[i] for i in sorted(ended)) if error is None]
    if failed:
        raise SweepFailed(failed, dirs)
    return dirs


def _worker_signals() -> None:
    """A sweep worker leaves stopping to its parent: Ctrl-C reaches the whole process
    group, and the parent terminates the workers (SIGTERM, default action) itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


__all__ = ["WAKU_SHADOW", "Job", "Scenario", "render", "sweep"]
