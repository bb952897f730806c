"""``pqcnet chaos``: fault runs against a real relayer, checked from the clients' histories.

``run`` is the benchmark of issue 11: per backend, a fault-free run and a run under the
seeded fault schedule, the checker's table for the latter, frames/s of both and the
recovery time after each fault. ``check`` re-checks history files. ``publisher`` and
``subscriber`` are the recording clients the harness starts (and kills).
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import click

from pqcnet._util.signals import stopping
from pqcnet.cli._common import hostport
from pqcnet.cli._common import load_identity as load_cli_identity


@click.group()
def cli() -> None:
    """Fault harness + history checker: lost-acked, duplicated, out-of-order, mis-billed."""


@cli.command("run")
@click.option("--minutes", default=0.5, show_default=True, type=click.FloatRange(0.05),
              help="Length of the fault schedule (and of the baseline run).")
@click.option("--backend", "backends", multiple=True, default=("embedded",), show_default=True,
              type=click.Choice(["embedded", "redis", "kafka"]), help="Repeatable.")
@click.option("--seed", default=1, show_default=True, type=int)
@click.option("--faults", default=0, type=click.IntRange(0),
              help="Faults in the schedule (default: one per 5 s).")
@click.option("--rate", default=100.0, show_default=True, type=click.FloatRange(1),
              help="Frames/s per publisher (paced).")
@click.option("--kafka-bootstrap", default=lambda: os.environ.get("PQCNET_KAFKA_BOOTSTRAP", ""),
              help="Kafka broker host:port (default $PQCNET_KAFKA_BOOTSTRAP).")
@click.option("--workdir", default="chaos-runs", show_default=True,
              type=click.Path(file_okay=False, path_type=Path))
@click.option("--relayers", default=1, show_default=True, type=click.IntRange(1, 5),
              help="Relayer processes: more than one is a cluster on one bus (redis, kafka) "
                   "with a spare that starts down; kill-relayer then hands a relayer's shards "
                   "to the others, and add-relayer / remove-relayer change the membership.")
@click.option("--no-baseline", is_flag=True, help="Skip the fault-free run.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def run_cmd(minutes: float, backends: tuple[str, ...], seed: int, faults: int, rate: float,
            kafka_bootstrap: str, workdir: Path, relayers: int, no_baseline: bool,
            as_json: bool) -> None:
    """Run the fault schedule per backend; print the checker's table and the benchmark.

    Exits 1 if the checker finds any anomaly.
    """
    from pqcnet.chaos.harness import ChaosConfig, run_chaos

    # SIGINT / SIGTERM: the relayers and clients (a paused one too) are stopped first
    with stopping("pqcnet chaos run"):
        duration = minutes * 60
        n_faults = faults or max(1, int(duration / 5))
        out: list[dict[str, object]] = []
        ok = True
        for backend in backends:
            base = None
            if not no_baseline:
                base = asyncio.run(run_chaos(ChaosConfig(
                    backend=backend, workdir=workdir / f"{backend}-baseline", seed=seed,
                    duration=duration, faults=0, rate=rate, kafka_bootstrap=kafka_bootstrap,
                    relayers=relayers)))
                ok = ok and base.report.ok
            res = asyncio.run(run_chaos(ChaosConfig(
                backend=backend, workdir=workdir / f"{backend}-faults", seed=seed,
                duration=duration, faults=n_faults, rate=rate, kafka_bootstrap=kafka_bootstrap,
                relayers=relayers)))
            ok = ok and res.report.ok
            row = res.as_dict()
            row["baseline_frames_per_s"] = None if base is None else round(base.frames_per_s, 1)
            row["ratio"] = (None if base is None or not base.frames_per_s
                            else round(res.frames_per_s / base.frames_per_s, 3))
            row["loadavg"] = [round(x, 2) for x in os.getloadavg()]
            out.append(row)
            if not as_json:
                click.echo(f"== {backend}: {len(res.faults)} faults, seed {seed}, "
                           f"histories in {workdir / f'{backend}-faults' / 'history'}")
                click.echo(res.report.table())
                for f in res.faults:
                    rec = "n/a" if f.recovery is None else f"{f.recovery:.3f} s"
                    click.echo(f"  t={f.at:6.2f}s  {f.kind:<17} {f.victim:<13} recovery {rec}")
                click.echo(json.dumps({k: row[k] for k in (
                    "frames_per_s", "baseline_frames_per_s", "ratio", "recovery_p50_s",
                    "recovery_p99_s", "loadavg")}))
    if as_json:
        click.echo(json.dumps(out, indent=2))
    if not ok:
        raise SystemExit(1)


@cli.command("check")
@click.argument("histories", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--metering", default=None, type=click.Path(exists=True, dir_okay=False,
              path_type=Path), help="metering.json written by `chaos run`.")
@click.option("--json", "as_json", is_flag=True)
def check_cmd(histories: tuple[Path, ...], metering: Path | None, as_json: bool) -> None:
    """Check history files (publisher histories, subscriber journals); exit 1 on anomalies."""
    from pqcnet.chaos.checker import check
    from pqcnet.chaos.harness import load_metering

    report = check(histories, load_metering(metering) if metering else None)
    click.echo(json.dumps(report.as_dict(), indent=2) if as_json else report.table())
    if not report.ok:
        raise SystemExit(1)


@cli.command("publisher")
@click.option("--relayer", "targets", required=True, multiple=True,
              help="host:port; repeat for a cluster (failover in this order).")
@click.option("--identity", "identity_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--history", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--customer", required=True)
@click.option("--channel", "channels", multiple=True, required=True)
@click.option("--count", required=True, type=click.IntRange(1), help="Frames per channel.")
@click.option("--seed", default=1, show_default=True, type=int)
@click.option("--size", default=64, show_default=True, type=click.IntRange(1, 65536))
@click.option("--batch", default=10, show_default=True, type=click.IntRange(1, 1000))
@click.option("--pace", default=0.0, show_default=True, type=click.FloatRange(0))
def publisher_cmd(targets: tuple[str, ...], identity_dir: Path, history: Path, customer: str,
                  channels: tuple[str, ...], count: int, seed: int, size: int, batch: int,
                  pace: float) -> None:
    """Recording publisher (resumes from its history after a kill)."""
    from pqcnet.chaos.clients import run_publisher

    n = asyncio.run(run_publisher([hostport(t, param_hint="--relayer") for t in targets],
                                  load_cli_identity(identity_dir), history,
                                  [(customer, ch) for ch in channels], count, seed=seed,
                                  size=size, batch=batch, pace=pace))
    click.echo(json.dumps({"acked": n}))


@cli.command("subscriber")
@click.option("--relayer", "targets", required=True, multiple=True,
              help="host:port; repeat for every relayer of a cluster.")
@click.option("--identity", "identity_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--journal", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="History + cursor (JSON lines, fsynced per batch).")
@click.option("--customer", required=True)
@click.option("--until", default=0, show_default=True, type=click.IntRange(0),
              help="Stop once the journal holds this many frames (0: run until killed).")
def subscriber_cmd(targets: tuple[str, ...], identity_dir: Path, journal: Path, customer: str,
                   until: int) -> None:
    """Recording subscriber (its journal is its cursor: resumes exactly after a kill)."""
    from pqcnet.chaos.clients import run_subscriber

    n = asyncio.run(run_subscriber([hostport(t, param_hint="--relayer") for t in targets],
                                   load_cli_identity(identity_dir), journal, customer,
                                   until=until))
    click.echo(json.dumps({"taken": n}))
