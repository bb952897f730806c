"""``pqcnet sim ...``: run scenarios, sweep grids, render reports.

``run`` simulates one scenario file (``--nodes``/``--seed``/``--set key=value``
override it) with a progress bar on stderr and writes ``<out>/<run>/`` (summary.json,
messages.csv, timeline.csv, PNG plots); ``sweep`` runs scenarios x sizes x seeds in
``--jobs`` worker processes; ``report`` renders ``<results>/REPORT.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import yaml

from pqcnet._util.signals import stopping
from pqcnet.sim.errors import ScenarioError


def _assignments(pairs: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ScenarioError(f"--set wants key=value, got {pair!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


@click.group()
def cli() -> None:
    """Discrete-event simulations of the overlay (real node logic, virtual time)."""


@cli.command("run")
@click.argument("scenario", type=click.Path(dir_okay=False))
@click.option("--nodes", type=int, help="Override the scenario's node count.")
@click.option("--seed", type=int, help="Override the scenario's seed.")
@click.option("--duration", type=float, help="Override the simulated duration (s).")
@click.option("--set", "sets", multiple=True, help="Override any field: gossipsub.D=8.")
@click.option("--out", type=click.Path(file_okay=False), default="results", show_default=True)
@click.option("--no-verify-cache", is_flag=True, help="Pay every ML-DSA verification.")
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def run_cmd(scenario: str, nodes: int | None, seed: int | None, duration: float | None,
            sets: tuple[str, ...], out: str, no_verify_cache: bool, no_plots: bool,
            progress: bool) -> None:
    """Simulate SCENARIO (a YAML file) and write its results."""
    from tqdm import tqdm

    from pqcnet.sim.config import load, override
    from pqcnet.sim.output import write_run
    from pqcnet.sim.run import run

    changes = _assignments(sets)
    for key, value in (("nodes", nodes), ("seed", seed), ("duration_s", duration)):
        if value is not None:
            changes[key] = value
    if no_verify_cache:
        changes["verify_cache"] = False
    sc = override(load(scenario), changes)
    bar = tqdm(total=sc.duration_s, unit="sim-s", disable=not progress,
               desc=f"{sc.name} n={sc.nodes}", leave=False)
    last = [0.0]

    def tick(now: float) -> None:
        bar.update(now - last[0])
        last[0] = now

    # SIGINT/SIGTERM: exit 130/143; a run stopped before its end writes nothing
    with stopping("pqcnet sim run"):
        try:
            result = run(sc, progress=tick)
        finally:
            bar.close()
        target = write_run(result, Path(out), plots=not no_plots)
    s = result.summary
    click.echo(json.dumps({"results": str(target), "wall_s": s["run"]["wall_s"],
                           "peak_rss_mib": s["run"]["peak_rss_mib"],
                           "delivery": {k: v.get("mean") for k, v in
                                        s["relay"]["delivery_ratio"].items()
                                        if isinstance(v, dict) and "mean" in v}}))


@cli.command("sweep")
@click.argument("scenarios", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--nodes", "sizes", default="100", show_default=True,
              help="Comma-separated sizes, e.g. 100,300,1000.")
@click.option("--seeds", default="1", show_default=True, help="Comma-separated seeds.")
@click.option("--set", "sets", multiple=True, help="Override any field for every run.")
@click.option("--jobs", type=int, default=1, show_default=True,
              help="Runs at once, each in its own process.")
@click.option("--out", type=click.Path(file_okay=False), default="results", show_default=True)
@click.option("--no-plots", is_flag=True)
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="A bar on stderr counting the runs that ended.")
def sweep_cmd(scenarios: tuple[str, ...], sizes: str, seeds: str, sets: tuple[str, ...],
              jobs: int, out: str, no_plots: bool, progress: bool) -> None:
    """Run SCENARIOS x sizes x seeds, one process per run. A run that fails does not
    stop the others; the sweep then exits 1 naming it."""
    from tqdm import tqdm

    from pqcnet.sim.sweep import sweep

    try:
        ns = [int(x) for x in sizes.split(",") if x]
        ss = [int(x) for x in seeds.split(",") if x]
    except ValueError:
        raise ScenarioError("--nodes and --seeds take comma-separated integers") from None
    if jobs < 1:
        raise ScenarioError("--jobs must be >= 1")
    extra = _assignments(sets)
    bar = tqdm(total=len(scenarios) * len(ns) * len(ss), unit="run", disable=not progress,
               desc="sweep", leave=False)

    def done(run: str, error: str | None) -> None:
        bar.update(1)
        bar.set_postfix_str(f"{Path(run).name} {'failed' if error else 'written'}")

    with stopping("pqcnet sim sweep"):  # SIGINT/SIGTERM: the workers are terminated
        try:
            dirs = sweep(list(scenarios), ns, ss, Path(out), jobs=jobs, extra=extra,
                         plots=not no_plots, done=done)
        finally:
            bar.close()
    click.echo(json.dumps({"runs": dirs}))


@cli.command("report")
@click.argument("results", type=click.Path(file_okay=False, exists=True))
@click.option("--output", type=click.Path(dir_okay=False),
              help="Where to write (default RESULTS/REPORT.md).")
def report_cmd(results: str, output: str | None) -> None:
    """Render a Markdown report over every run under RESULTS."""
    from pqcnet.sim.report import render

    text = render(Path(results))
    target = Path(output) if output else Path(results) / "REPORT.md"
    target.write_text(text)
    click.echo(str(target))
