"""Pictures of benchmark results, for the runs people would rather look at than read.

``latency_vs_load``: the latency-vs-offered-load curve of ``pqcnet bench sentry
--sweep`` (p50 and p99 of every path, pqcnet's added p99 against its target, how
busy the sidecar, the sentry and the machine ran, and, when the run has them, where
the sidecar's mean round trip went hop by hop). matplotlib comes with the ``sim`` extra
(``pip install 'pqcnet[sim]'``); :func:`available` says whether it is importable, so a
command can refuse ``--plot`` before a long run rather than after it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: resolution of the PNGs written here
DPI = 110


def available() -> bool:
    """matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def latency_vs_load(sweep: dict[str, Any], target: Path) -> Path:
    """Write the sweep's curve to ``target`` (PNG); returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sweep["points"]
    rps = [p["offered_rps"] for p in points]
    paths = [name for name in ("direct", "nginx", "pqcnet") if name in points[0]]
    hops = [p["pqcnet"].get("hops") for p in points]
    panels = 4 if all(hops) else 3
    fig, axes = plt.subplots(1, panels, figsize=(4.0 * panels, 3.6))
    lat, added, busy = axes[:3]
    for name in paths:
        line, = lat.plot(rps, [p[name]["p99_ms"] for p in points], marker="o",
                         label=f"{name} p99")
        lat.plot(rps, [p[name]["p50_ms"] for p in points], linestyle="--",
                 color=line.get_color(), label=f"{name} p50")
    lat.set_yscale("log")
    lat.set_ylabel("ms")
    lat.set_title("latency", fontsize=9)
    lat.legend(fontsize=7)
    added.plot(rps, [p["pqcnet_added_p99_ms"] for p in points], marker="o",
               label="pqcnet p99 - direct p99")
    added.axhline(sweep["added_p99_target_ms"], color="grey", linestyle=":",
                  label=f"target {sweep['added_p99_target_ms']:g} ms")
    added.set_ylabel("ms")
    added.set_title("added p99", fontsize=9)
    added.legend(fontsize=7)
    for who in ("sidecar", "sentry", "machine"):
        busy.plot(rps, [p["pqcnet"].get("cpu", {}).get(f"{who}_busy", 0.0) for p in points],
                  marker="o", label=who if who != "machine" else "machine (all cores)")
    busy.set_ylim(0, 1.05)
    busy.set_ylabel("share of one core (machine: of all)")
    busy.set_title("busy", fontsize=9)
    busy.legend(fontsize=7)
    if panels == 4:  # where the sidecar's mean round trip went, hop by hop
        parts = (("upstream_mean_ms", "backend"), ("sentry_own_mean_ms", "sentry's own work"),
                 ("tunnel_and_wakeups_mean_ms", "tunnel, wake-ups"))
        axes[3].stackplot(rps, *[[h[k] for h in hops] for k, _ in parts],
                          labels=[label for _, label in parts], alpha=0.8)
        axes[3].set_ylabel("ms (mean)")
        axes[3].set_title("sidecar round trip, by hop", fontsize=9)
        axes[3].legend(fontsize=7, loc="upper left")
    for ax in axes:
        ax.set_xlabel("offered RPC/s")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(target, dpi=DPI)
    plt.close(fig)
    return target
