"""``pqcnet relayer run --workers N``: N relayer processes on one host, one port.

The supervisor (this process) reserves the listen port (a bound, non-listening
SO_REUSEPORT socket, so ``listen_port: 0`` works too) and starts N workers (spawned
processes). Each worker is an ordinary :class:`~pqcnet.relayer.node.RelayerNode`
listening with SO_REUSEPORT — the kernel spreads *tunnels* over the workers — and a
member of the relayer cluster on the shared bus, so the shards split between the
workers by Redis leases or the Kafka group exactly as between hosts. Worker 0 *is* the
configured relayer (its ``node_id``, ``data_dir``, ``ledger_dir``): going from one
process to N keeps its overflow queue, proofs, ledger and metered volume. Worker
``i >= 1`` is ``<node_id>-w<i>`` with ``data_dir/w<i>`` and ``<ledger_dir>-w<i>``. A
``data_dir/w<i>`` of a worker a run would not start (fewer workers than before) is
refused: its overflow queue and unproven volume would be stranded
(``docs/explanation/relayer-cluster.md``). Publishers use the shared port; a worker
delivers only the shards it owns, so each worker also listens on a port of its own
(:func:`own_port`) and subscribers list all of them (``pqcnet subscribe --relayer
h:p1,h:p2,...``, the ready line's ``worker_ports``). Each worker serves its own
metrics and health port (:func:`~pqcnet.cli._common.worker_metrics_port`, the ready line's
``worker_metrics_ports``): a process's counters are its own, and Prometheus sums
targets. Worker 0 alone serves the gRPC and governance ports and renews the
certificate; the others hot-reload the renewed identity from ``identity_dir``.

The embedded backend is one RocksDB log one process opens: ``--workers`` above 1 is a
:class:`~pqcnet.relayer.errors.SingleProcessBackend` error; ``owned_shards`` is a
:class:`~pqcnet.relayer.errors.ConfigError` (every worker would work on the same fixed
shards). A worker that dies is restarted; SIGTERM / SIGINT stop them all, and so does
the supervisor's own death (even SIGKILL: the kernel sends each worker SIGTERM,
:func:`~pqcnet._util.orphans.die_with_parent`, and the quota segment is anonymous
memory freed with the last process); SIGHUP is passed on to every worker (policy
reload). The supervisor prints one ``ready`` JSON line once every worker listens.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

from pqcnet._util.shmlimits import SharedLimitState
from pqcnet.cli._common import Respawner, reserve_port, stop_workers, worker_metrics_port
from pqcnet.relayer.authz import MAX_QUOTA_CUSTOMERS
from pqcnet.relayer.config import RelayerConfig
from pqcnet.relayer.errors import ConfigError, SingleProcessBackend

#: Seconds a worker may take to start listening.
WORKER_START_TIMEOUT = 90.0
#: Seconds a worker gets to stop after SIGTERM before it is killed.
WORKER_STOP_TIMEOUT = 20.0
#: Buckets in the workers' shared quota segment: two per customer (frames, bytes).
QUOTA_SLOTS = 2 * MAX_QUOTA_CUSTOMERS


def worker_dir(cfg: RelayerConfig, index: int) -> Path:
    """Where worker ``index`` keeps its node-local state (worker 0: ``data_dir``)."""
    return Path(cfg.data_dir) / f"w{index}" if index else Path(cfg.data_dir)


def check_workers(cfg: RelayerConfig, workers: int) -> None:
    """Refuse a worker count the configuration cannot run (typed errors); also for one
    process, which must not strand the state of workers of an earlier, larger run."""
    stranded = sorted(p.name for p in Path(cfg.data_dir).glob("w[0-9]*")
                      if p.is_dir() and p.name[1:].isdigit() and int(p.name[1:]) >= workers)
    if stranded:
        raise ConfigError(
            f"data_dir: {', '.join(stranded)} belong to workers this run would not start "
            f"(--workers {workers}); their overflow queues and unproven volume would be "
            f"stranded: run with as many workers until they drained and proved their "
            f"epochs, then remove those directories")
    if workers <= 1:
        return
    if cfg.backend == "embedded":
        raise SingleProcessBackend(
            f"backend embedded is single-process (its RocksDB log is opened by one process): "
            f"--workers {workers} needs backend redis or kafka")
    if cfg.owned_shards:
        raise ConfigError(f"owned_shards: with --workers {workers} the workers split the "
                          "shards among themselves (Redis leases / Kafka group); leave it "
                          "empty")
    if cfg.backend == "kafka" and not cfg.kafka_rebalance:
        raise ConfigError(f"kafka_rebalance: --workers {workers} needs the Kafka group to "
                          "split the partitions")


def worker_config(cfg: RelayerConfig, index: int, port: int, workers: int = 1
                  ) -> RelayerConfig:
    """Worker ``index``'s config (of ``workers``) on the shared ``port``: worker 0 is
    the configured relayer; the others get their own node id, state directories and
    metrics port, and no gRPC or governance port. Each gets ``1 / workers`` of
    ``tunnel_buffer_total_bytes``, so the configured budget bounds the host, not each
    process (the kernel spreads tunnels evenly; a worker whose share is spent gives
    new tunnels the initial 64 KiB window, it refuses none)."""
    budget = cfg.tunnel_buffer_total_bytes // max(1, workers)
    if index == 0:
        return cfg.replace(listen_port=port, tunnel_buffer_total_bytes=budget)
    changes: dict[str, Any] = {"node_id": f"{cfg.node_id}-w{index}", "listen_port": port,
                               "tunnel_buffer_total_bytes": budget,
                               "data_dir": str(worker_dir(cfg, index)),
                               "metrics_port": worker_metrics_port(cfg.metrics_port, index),
                               "grpc_port": None,
                               "governance_qstp_port": None, "ledger_anchors": ""}
    if cfg.ledger_dir:  # a sibling: not inside another RocksDB directory
        changes["ledger_dir"] = f"{cfg.ledger_dir.rstrip('/')}-w{index}"
    return cfg.replace(**changes)


def own_port(port: int, index: int) -> int:
    """Worker ``index``'s own port: ``port + 1 + index`` (stable across restarts, so
    subscribers' lists stay right), or any free one when the config says port 0."""
    return 0 if port == 0 else port + 1 + index


def _worker_main(config_path: Path, index: int, workers: int, port: int,
                 rotation: dict[str, Any], ready: Any, shm_path: str) -> None:
    from pqcnet._util.orphans import die_with_parent
    from pqcnet.cli._common import run_until_signalled
    from pqcnet.cli.relayer import relayer_lifecycle
    from pqcnet.relayer.authz import SharedQuotas
    from pqcnet.relayer.node import RelayerNode

    die_with_parent()  # a worker left running would serve unsupervised
    base = RelayerConfig.load(config_path)
    own = own_port(base.listen_port, index)  # from the configured port (0: any free one)
    cfg = worker_config(base, index, port, workers)
    if index > 0:  # one renewer; the others pick the renewed identity up from disk
        rotation = {**rotation, "renew_ca_url": "", "renew_ca_dir": None}
    state = SharedLimitState.attach(shm_path)  # quotas: one bucket per host
    # quota_scope cluster: each worker draws from the cluster's buckets in Redis itself
    quotas = SharedQuotas(state, cfg.quotas) if cfg.quota_scope == "host" else None
    start, stop = relayer_lifecycle(cfg, config_path, rotation, started=base, reuse_port=True,
                                    own_port=own, quotas=quotas)

    def up(node: RelayerNode) -> None:
        ready.put({"index": index, "port": node.port, "own_port": node.own_port,
                   "metrics_port": node.metrics_port,
                   "grpc_port": node.grpc_port, "node": cfg.node_id,
                   "degraded": node.degraded})

    try:
        run_until_signalled(start, stop, up, fast_loop=True)
    finally:
        state.close()


def run_workers(config_path: Path, workers: int, rotation: dict[str, Any]) -> None:
    """Supervise ``workers`` relayer processes until SIGTERM/SIGINT."""
    cfg = RelayerConfig.load(config_path)
    cfg.require_identity(str(config_path))
    check_workers(cfg, workers)
    ctx = multiprocessing.get_context("spawn")
    quota_state = SharedLimitState.create(workers=workers, slots=QUOTA_SLOTS,
                                          prefix="pqcnet-relayer-quotas-")
    holder = reserve_port(cfg.listen_host, cfg.listen_port)
    port = int(holder.getsockname()[1])
    ready = ctx.Queue()
    stopping = False

    def stop(_sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    def hup(_sig: int, _frame: object) -> None:  # policy reload: every worker re-reads
        for p in procs.values():
            if p.is_alive() and p.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGHUP)

    def spawn(i: int) -> Any:
        p = ctx.Process(target=_worker_main, name=f"relayer-worker-{i}",
                        args=(config_path, i, workers, port, rotation, ready,
                              quota_state.path))
        p.start()
        return p

    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    old[signal.SIGHUP] = signal.signal(signal.SIGHUP, hup)
    procs: dict[int, Any] = {}
    try:
        procs = {i: spawn(i) for i in range(workers)}
        deadline = time.monotonic() + WORKER_START_TIMEOUT
        up: dict[int, dict[str, Any]] = {}
        while len(up) < workers and not stopping:
            try:
                info = ready.get(timeout=0.2)
                up[int(info["index"])] = info
            except Exception:  # queue.Empty
                if time.monotonic() > deadline or any(not p.is_alive()
                                                      for p in procs.values()):
                    raise click.ClickException("a relayer worker failed to start "
                                               "(see its log lines above)") from None
        if not stopping:
            first = up[0]
            click.echo(json.dumps({
                "ready": True, "port": port, "metrics_port": first["metrics_port"],
                "grpc_port": first["grpc_port"], "backend": cfg.backend,
                "node": cfg.node_id, "workers": workers,
                "worker_nodes": [up[i]["node"] for i in range(workers)],
                "worker_ports": [up[i]["own_port"] for i in range(workers)],
                "worker_metrics_ports": [up[i]["metrics_port"] for i in range(workers)],
                "pids": [procs[i].pid for i in range(workers)],
                "degraded": any(u["degraded"] for u in up.values())}))
            sys.stdout.flush()
        respawner = Respawner("relayer", procs, spawn)
        while not stopping:
            time.sleep(0.2)
            with contextlib.suppress(Exception):  # later ready lines of restarted workers
                while True:
                    ready.get_nowait()
            if not stopping:
                respawner.poll()
    finally:
        stop_workers(procs.values(), WORKER_STOP_TIMEOUT)
        for sig, handler in old.items():
            signal.signal(sig, handler)
        holder.close()
        quota_state.close()  # the owner: the segment goes too
        sys.stdout.flush()


__all__ = ["check_workers", "own_port", "run_workers", "worker_config", "worker_dir"]
