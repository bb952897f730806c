"""What a run leaves on disk: summary.json, per-message records, timeline, PNG plots.

``results/<run>/`` where ``<run>`` is ``<scenario>-n<nodes>-s<seed>``:

* ``summary.json`` — every metric, the scenario as run, seed, versions, machine;
* ``messages.csv`` — one row per relay message (kind, origin, publish time, size,
  receivers, eligible-free last arrival, max hops);
* ``timeline.csv`` — one row per simulated second (online nodes, and the workload's
  own series: formed share, ledger agreement);
* ``latency_cdf.png``, ``timeline.png`` and, for churn, ``delivery_over_time.png``.

Plots need matplotlib (the ``sim`` extra); without it the run still writes its data
and says so in ``summary.json`` (``plots: "matplotlib not installed"``).

A run directory is whole or absent: the files are written into a hidden
``.<run>.<pid>@<host>.<random>.partial`` directory beside it, which takes the run's name
only when every file is in (a rename), replacing an earlier run of the same name as a
whole — a stop or a crash in the middle (a plot failing, SIGTERM, the disk full) leaves
the earlier results as they were, never some files of each. A stopped ``write_run``
removes its partial directory. One killed outright (SIGKILL, the OOM killer) cannot: its
directory stays, hidden (the report skips hidden directories), until the next write of
the same run removes it — only when its writer is known to be gone (same host, no
process with that pid), so a write in progress elsewhere (another process, another host
on a shared disk) is never touched.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import json
import os
import re
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pqcnet.sim.run import RunResult

#: PNG size and resolution: small files (< 200 KB) that still read well in a README.
FIG_SIZE = (6.0, 3.6)
DPI = 90
#: Delivery-over-time buckets, seconds.
BUCKET_S = 60.0


def dir_name(scenario: str, nodes: int, seed: int) -> str:
    """The directory name of a run of ``scenario`` with ``nodes`` and ``seed``."""
    return f"{scenario}-n{nodes}-s{seed}"


def run_name(summary: dict[str, Any]) -> str:
    return dir_name(summary["scenario"]["name"], summary["nodes"], summary["seed"])


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def _owner() -> str:
    """This process as a partial directory's writer: ``<pid>@<host>``."""
    return f"{os.getpid()}@{_host()}"


def _gone(owner: str) -> bool:
    """Whether the writer ``<pid>@<host>`` is known to have ended: on this host, and no
    process has its pid (a reused pid keeps the directory: the safe side)."""
    pid, _, host = owner.partition("@")
    if not pid.isdigit() or host != _host():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process
        return False
    return False


def remove_stale(out_dir: Path, name: str) -> list[Path]:
    """Remove the hidden directories unfinished writes of run ``name`` left (a partial
    one, or an earlier run moved aside) whose writers are gone; returns them."""
    stale = [p for p in sorted(out_dir.glob(f".{glob.escape(name)}.*@*.*"))
             if p.is_dir() and _gone(p.name[len(name) + 2:].split(".", 1)[0])]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def write_run(result: RunResult, out_dir: Path, *, plots: bool = True) -> Path:
    """Write one run's files as ``out_dir/<run>/``, whole or not at all; returns that
    directory. What killed writes of the same run left is removed first."""
    name = run_name(result.summary)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale(out_dir, name)
    partial = Path(tempfile.mkdtemp(prefix=f".{name}.{_owner()}.", suffix=".partial",
                                    dir=out_dir))
    try:
        _write_files(result, partial, plots=plots)
        partial.chmod(0o755)  # mkdtemp's 0700 is for the files in the making
        return _put_in_place(partial, out_dir / name)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


@contextlib.contextmanager
def _stops_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM to this thread for the few system calls of a swap; they
    arrive when it is done."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _put_in_place(partial: Path, target: Path) -> Path:
    """Rename the finished ``partial`` to ``target``; an earlier ``target`` is moved
    aside first and removed after (a directory cannot replace a non-empty one)."""
    old = None
    try:
        with _stops_deferred():
            if target.exists():
                old = partial.with_suffix(".old")
                os.rename(target, old)
            os.rename(partial, target)
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return target


def _write_files(result: RunResult, target: Path, *, plots: bool) -> None:
    with (target / "messages.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["mid", "kind", "origin", "t0_s", "bytes", "receivers", "last_arrival_s",
                    "max_hops"])
        for r in sorted(result.records, key=lambda r: r.mid):
            w.writerow([r.mid, r.kind, r.origin, f"{r.t0:.6f}", r.size, r.receivers,
                        f"{r.last_s:.6f}", r.hops_max])
    keys = sorted({k for row in result.timeline for k in row})
    with (target / "timeline.csv").open("w", newline="") as fh:
        dw = csv.DictWriter(fh, fieldnames=keys)
        dw.writeheader()
        dw.writerows(result.timeline)
    if plots:
        result.summary["run"]["plots"] = make_plots(result, target)
    (target / "summary.json").write_text(json.dumps(result.summary, indent=2, sort_keys=True,
                                                    default=str) + "\n")


def make_plots(result: RunResult, target: Path) -> list[str] | str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed"
    made = []
    fig, ax = plt.subplots(figsize=FIG_SIZE)
    for kind, values in sorted(result.latencies.items()):
        if len(values) < 10:
            continue
        xs = sorted(v * 1000 for v in values)
        step = max(1, len(xs) // 2000)
        xs = xs[::step]
        ax.plot(xs, [(k + 1) / len(xs) for k in range(len(xs))], label=kind)
    ax.set_xlabel("propagation latency (ms)")
    ax.set_ylabel("share of receptions")
    ax.set_title(f"latency CDF — {run_name(result.summary)}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(target / "latency_cdf.png", dpi=DPI)
    plt.close(fig)
    made.append("latency_cdf.png")

    series = [k for k in ("online", "formed", "agreement") if any(k in r for r in result.timeline)]
    if result.timeline and series:
        fig, ax = plt.subplots(figsize=FIG_SIZE)
        t = [r["t"] for r in result.timeline]
        n = result.summary["nodes"]
        for key in series:
            ys = [r.get(key, float("nan")) for r in result.timeline]
            if key == "online":
                ys = [y / n for y in ys]
            ax.plot(t, ys, label=key if key != "online" else "online share")
        ax.set_xlabel("simulated time (s)")
        ax.set_ylim(-0.02, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(f"over time — {run_name(result.summary)}")
        fig.tight_layout()
        fig.savefig(target / "timeline.png", dpi=DPI)
        plt.close(fig)
        made.append("timeline.png")

    buckets: dict[int, list[float]] = {}
    for r in result.records:
        if r.kind == "data":
            buckets.setdefault(int(r.t0 // BUCKET_S), []).append(r.receivers)
    if len(buckets) > 1 and result.summary.get("churn"):
        fig, ax = plt.subplots(figsize=FIG_SIZE)
        bins = sorted(buckets)
        ax.plot([b * BUCKET_S / 60 for b in bins],
                [sum(buckets[b]) / len(buckets[b]) / (result.summary["nodes"] - 1)
                 for b in bins], marker=".")
        ax.set_xlabel("publish time (min)")
        ax.set_ylabel("receivers / (nodes - 1)")
        ax.set_title(f"relay delivery over time — {run_name(result.summary)}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(target / "delivery_over_time.png", dpi=DPI)
        plt.close(fig)
        made.append("delivery_over_time.png")
    return made


def scaling_plot(rows: list[dict[str, Any]], target: Path) -> str | None:
    """Scale curve across runs: wall time, RSS, bytes per node vs N (log x)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = sorted(rows, key=lambda r: r["nodes"])
    if len(rows) < 2:
        return None
    fig, axes = plt.subplots(1, 4, figsize=(11.0, 3.0))
    n = [r["nodes"] for r in rows]
    for ax, key, label in ((axes[0], "cpu_s", "CPU s"), (axes[1], "peak_rss_mib", "peak RSS MiB"),
                           (axes[2], "bytes_in_per_node", "bytes in / node"),
                           (axes[3], "route_bytes_per_node", "route-update bytes / node")):
        ax.plot(n, [r[key] for r in rows], marker="o")
        ax.set_xscale("log")
        ax.set_xlabel("nodes")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(target, dpi=DPI)
    plt.close(fig)
    return target.name
