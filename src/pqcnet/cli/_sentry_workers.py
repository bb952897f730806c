"""``pqcnet sentry run --workers N``: N sentry processes on one port, one set of limits.

The supervisor (this process) creates the shared limiter segment
(:mod:`pqcnet.sentry.shared`, with its own lock, which a worker's death releases),
reserves the port (a bound, non-listening SO_REUSEPORT socket, so
``listen: 127.0.0.1:0`` works too), and starts N workers (spawned processes). Each
worker is an ordinary :class:`~pqcnet.runtime.sentry.SentryService` listening with
SO_REUSEPORT — the kernel
spreads *tunnels* (connections) over the workers — whose token buckets and
concurrency gate are the shared ones. Each worker hot-reloads the config file itself.

What stays with worker 0 only: the QS-DAG ledger (RocksDB takes one process; policy
anchors and attestations are written once). Each worker serves its own metrics and
health port, ``metrics_port + i`` (a process's counters are its own; Prometheus sums
the targets). A worker that dies is restarted after its in-flight counts are zeroed in
the shared gate — at once, or after a growing wait if it keeps dying soon after its
start (:class:`~pqcnet.cli._common.Respawner`). SIGTERM / SIGINT stop them all, and so
does the supervisor's own death (even SIGKILL: each worker gets SIGTERM from the
kernel, :func:`~pqcnet._util.orphans.die_with_parent`; the shared segment is
anonymous memory, freed with the last process).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from pqcnet.cli._common import Respawner, reserve_port, stop_workers, worker_metrics_port

if TYPE_CHECKING:
    from pqcnet.sentry.config import SentryConfig

#: Seconds a worker may take to start listening.
WORKER_START_TIMEOUT = 60.0
#: Seconds a worker gets to stop after SIGTERM before it is killed.
WORKER_STOP_TIMEOUT = 15.0


def worker_config(cfg: SentryConfig, index: int, port: int, workers: int) -> SentryConfig:
    """Worker ``index``'s copy of the config (of ``workers``) on the shared ``port``:
    worker 0 keeps the ledger; the others get none and a metrics port each. Each gets
    ``1 / workers`` of ``bounds.tunnel_buffer_total_bytes``, so the configured budget
    bounds the host, not each process (the kernel spreads tunnels evenly; a worker
    whose share is spent gives new tunnels the initial 64 KiB window, it refuses
    none)."""
    bounds = cfg.bounds.model_copy(update={
        "tunnel_buffer_total_bytes": cfg.bounds.tunnel_buffer_total_bytes // max(1, workers)})
    cfg = dataclasses.replace(cfg, listen_port=port, bounds=bounds)
    if index > 0:  # one ledger writer; a metrics port each (metrics_port 0: none)
        cfg = dataclasses.replace(cfg, ledger_path=None,
                                  metrics_port=worker_metrics_port(cfg.metrics_port,
                                                                   index) or None)
    return cfg


def _worker_main(config_path: Path, index: int, workers: int, shm_path: str, port: int,
                 node_pass: bytes | None, reload_interval: float, ready: Any) -> None:
    from pqcnet._util.orphans import die_with_parent
    from pqcnet.cli._common import run_until_signalled
    from pqcnet.identity import NodeIdentity
    from pqcnet.runtime.sentry import SentryService
    from pqcnet.sentry.config import load_config, require_identity
    from pqcnet.sentry.shared import SharedLimitState

    die_with_parent()  # a worker left running would serve unsupervised

    base = load_config(config_path)
    cfg = worker_config(base, index, port, workers)
    identity = NodeIdentity.load(require_identity(cfg), node_pass)
    state = SharedLimitState.attach(shm_path)
    service = SentryService(cfg, identity, config_path=config_path,
                            reload_interval=reload_interval, shared=(state, index),
                            reuse_port=True, started=base)
    try:
        run_until_signalled(service.start, SentryService.aclose,
                            lambda s: ready.put((index, s.metrics_port)), fast_loop=True)
    finally:
        state.close()


def run_workers(config_path: Path, workers: int, node_pass: bytes | None,
                reload_interval: float) -> None:
    """Supervise ``workers`` sentry processes until SIGTERM/SIGINT."""
    from pqcnet.sentry.config import load_config
    from pqcnet.sentry.shared import SharedLimitState

    cfg = load_config(config_path)
    ctx = multiprocessing.get_context("spawn")
    state = SharedLimitState.create(workers=workers, prefix="pqcnet-sentry-limits-")
    holder = reserve_port(cfg.listen_host, cfg.listen_port)
    port = int(holder.getsockname()[1])
    ready = ctx.Queue()
    stopping = False

    def stop(_sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    def spawn(i: int) -> Any:
        p = ctx.Process(target=_worker_main, name=f"sentry-worker-{i}",
                        args=(config_path, i, workers, state.path, port, node_pass,
                              reload_interval, ready))
        p.start()
        return p

    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    procs: dict[int, Any] = {}
    try:
        procs = {i: spawn(i) for i in range(workers)}
        deadline = time.monotonic() + WORKER_START_TIMEOUT
        metrics: dict[int, int | None] = {}
        while len(metrics) < workers and not stopping:
            try:
                index, metrics_port = ready.get(timeout=0.2)
                metrics[index] = metrics_port
            except Exception:  # queue.Empty
                if time.monotonic() > deadline or any(not p.is_alive()
                                                      for p in procs.values()):
                    raise click.ClickException("a sentry worker failed to start") from None
        if not stopping:
            ops = (f"; metrics ports {', '.join(str(metrics[i]) for i in range(workers))}"
                   if cfg.metrics_port else "")
            click.echo(f"sentry listening on {cfg.listen_host}:{port} ({workers} workers, "
                       f"shared limits{ops})", err=True)
        respawner = Respawner("sentry", procs, spawn, on_death=state.reset_worker)
        while not stopping:
            time.sleep(0.2)
            if not stopping:
                respawner.poll()
    finally:
        stop_workers(procs.values(), WORKER_STOP_TIMEOUT)
        for sig, handler in old.items():
            signal.signal(sig, handler)
        holder.close()
        state.close()
        sys.stdout.flush()


__all__ = ["run_workers"]
