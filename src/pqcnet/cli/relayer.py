"""``pqcnet relayer``, ``pqcnet publish``, ``pqcnet subscribe``, ``pqcnet governance``.

All four live here (``publish.py``, ``subscribe.py``, ``governance.py`` next to this
file only re-export) because they share identity loading and host:port parsing.
``relayer run`` serves until SIGINT/SIGTERM and prints one ``ready`` JSON line on
stdout once it listens (scripts and tests wait for it); SIGHUP re-reads the config
file's policy part (``authz``, ``quotas``) without dropping a tunnel.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from pqcnet.cli._common import hostport, run_until_signalled
from pqcnet.cli._common import load_identity as load_cli_identity
from pqcnet.cli._rotation import bind_relayer, build_manager, rotation_options, unbind
from pqcnet.errors import PqcnetError
from pqcnet.identity import NodeIdentity, dev_identities
from pqcnet.relayer.client import (
    ClusterSubscriber,
    FailoverPublisher,
    ResumingSubscriber,
    SubscriberClient,
)
from pqcnet.relayer.config import RelayerConfig
from pqcnet.relayer.cursor import Cursor, FileCursor, JournalCursor, MemoryCursor
from pqcnet.relayer.frame import Frame
from pqcnet.relayer.governance import VolumeFilter, pull_report, pull_volume
from pqcnet.relayer.node import RelayerNode, load_identity

# ------------------------------------------------------------------ pqcnet relayer


@click.group()
def cli() -> None:
    """Relayer node: run it, or make dev identities for a local try-out."""


@cli.command("run")
@click.option("--config", "config_path", required=True, type=click.Path(exists=True,
              dir_okay=False, path_type=Path), help="Relayer YAML (see examples/relayer.yaml).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Relayer processes sharing the listen port (SO_REUSEPORT); each is a "
                   "cluster member (worker 0 is the configured relayer; worker i is "
                   "<node_id>-w<i> with data_dir/w<i>, metrics on metrics_port + i). "
                   "Backends redis and kafka only: embedded is single-process.")
@rotation_options
def run_cmd(config_path: Path, workers: int, **rotation: Any) -> None:
    """Serve QSTP ingress/egress, shard workers, metrics and governance gRPC.

    The identity directory is watched (hot reload); --renew-ca-url / --renew-ca-dir
    renew the certificate (same key: it signs the relayer's QS-DAG proofs)."""
    from pqcnet.cli._relayer_workers import check_workers, run_workers

    if workers > 1:
        run_workers(config_path, workers, rotation)
        return
    cfg = RelayerConfig.load(config_path)
    check_workers(cfg, 1)  # no state of an earlier --workers N run left stranded
    cfg.require_identity(str(config_path))
    start, stop = relayer_lifecycle(cfg, config_path, rotation)

    def ready(node: RelayerNode) -> None:
        click.echo(json.dumps({"ready": True, "port": node.port, "metrics_port":
                               node.metrics_port, "grpc_port": node.grpc_port,
                               "backend": cfg.backend, "node": cfg.node_id,
                               "degraded": node.degraded}))
        sys.stdout.flush()

    run_until_signalled(start, stop, ready, fast_loop=True)


def relayer_lifecycle(cfg: RelayerConfig, config_path: Path, rotation: dict[str, Any],
                      *, started: RelayerConfig | None = None,
                      **node_options: Any) -> tuple[Callable[[], Awaitable[RelayerNode]],
                                                    Callable[[RelayerNode], Awaitable[None]]]:
    """``start``/``stop`` of one relayer process (``relayer run`` and each ``--workers``
    worker): the node, SIGHUP policy reload, and the certificate manager bound to it.
    ``started``: the file as loaded (a worker's ``cfg`` differs from it), what a reload
    compares the re-read file with."""
    from pqcnet.relayer.node import save_identity

    identity = load_identity(cfg)
    manager = build_manager(Path(str(cfg.identity_dir)), None, rotate_key=False,
                            load=lambda: load_identity(cfg),
                            save=lambda new: save_identity(cfg, new), **rotation)

    async def start() -> RelayerNode:
        node = RelayerNode(cfg, identity, **node_options)
        await node.start()
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGHUP, functools.partial(reload_policy, node, config_path, started or cfg))
        await bind_relayer(node, manager)
        return node

    async def stop(node: RelayerNode) -> None:
        await unbind(manager)
        await node.stop()

    return start, stop


def reload_policy(node: RelayerNode, path: Path, started: RelayerConfig) -> None:
    """SIGHUP: re-read ``path`` and hot-reload its policy part (authz, quotas); a bad
    file leaves the policy in force and says why on stderr. Static keys the file
    changed since ``started`` are named: they apply at a restart."""
    try:
        pending = node.reload(RelayerConfig.load(path), started=started)
    except PqcnetError as exc:
        click.echo(json.dumps({"reloaded": False, "error": str(exc)}), err=True)
        return
    click.echo(json.dumps({"reloaded": True, "config": str(path),
                           "restart_pending": pending}), err=True)


@cli.command("dev-identities")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory; gets relayer/, publisher/, subscriber/ identity dirs.")
@click.option("--trust-domain", default="pqcnet.dev", show_default=True)
def dev_identities_cmd(out: Path, trust_domain: str) -> None:
    """Create a throw-away mesh CA and three identities (unencrypted keys, dev only)."""
    names = ("relayer", "publisher", "subscriber")
    _, nodes = dev_identities(trust_domain,
                              *(f"spiffe://{trust_domain}/dev/{n}/{n}-1" for n in names))
    for name, node in zip(names, nodes):
        node.save(out / name, None)
        click.echo(f"{out / name}  {node.spiffe_id}")


# ------------------------------------------------------------------ pqcnet publish


@click.command()
@click.option("--relayer", "target", required=True,
              help="Relayer QSTP address host:port; a cluster: host:port,host:port,...")
@click.option("--identity", "identity_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--customer", required=True)
@click.option("--channel", required=True)
@click.option("--message", default=None, help="Send this one payload (else --count frames).")
@click.option("--count", default=100, show_default=True, type=click.IntRange(1))
@click.option("--size", default=256, show_default=True, type=click.IntRange(0),
              help="Payload bytes per generated frame.")
@click.option("--batch", default=64, show_default=True, type=click.IntRange(1, 4096))
@click.option("--start-seq", default=1, show_default=True, type=click.IntRange(1))
@click.option("--qos", default=1, show_default=True, type=click.IntRange(0, 2))
@click.option("--retry", is_flag=True,
              help="Mark the frames as resends: seqs already delivered are accepted (and "
                   "suppressed) instead of refused as late (code 15).")
def publish_cli(target: str, identity_dir: Path, customer: str, channel: str,
                message: str | None, count: int, size: int, batch: int, start_seq: int,
                qos: int, retry: bool) -> None:
    """Send frames to a relayer; prints a JSON summary of accepted/rejected frames."""
    targets = _targets(target)
    identity = load_cli_identity(identity_dir)
    payloads = [message.encode()] if message is not None else None
    n = 1 if payloads else count
    summary = asyncio.run(_publish(targets, identity, customer, channel, n, size, batch,
                                   start_seq, qos, payloads, retry))
    click.echo(json.dumps(summary))
    if summary["rejected"]:
        raise SystemExit(1)


def _targets(value: str) -> list[tuple[str, int]]:
    """``host:port[,host:port...]`` of --relayer."""
    out = [hostport(part.strip(), param_hint="--relayer")
           for part in value.split(",") if part.strip()]
    if not out:
        raise click.BadParameter("no relayer address", param_hint="--relayer")
    return out


async def _publish(targets: list[tuple[str, int]], identity: NodeIdentity, customer: str,
                   channel: str, count: int, size: int, batch: int, start: int, qos: int,
                   payloads: list[bytes] | None, retry: bool = False) -> dict[str, Any]:
    # fails over to the next relayer with the same seqs (dedup keeps it exactly once)
    client = FailoverPublisher(targets, identity)
    accepted = rejected = overflowed = 0
    errors: list[str] = []
    t0 = time.perf_counter()
    try:
        with tqdm(total=count, unit="frame", desc="publish", disable=None) as bar:
            for first in range(start, start + count, batch):
                seqs = range(first, min(first + batch, start + count))
                frames = [Frame(customer, channel, s,
                                payloads[0] if payloads else os.urandom(size), qos)
                          for s in seqs]
                for r in await client.publish(frames, retry=retry):
                    if r.accepted:
                        accepted += 1
                        overflowed += r.overflowed
                    else:
                        rejected += 1
                        if len(errors) < 5:
                            errors.append(f"seq {r.seq}: {r.reason} (code {r.code})")
                bar.update(len(frames))
    finally:
        await client.close()
    return {"accepted": accepted, "rejected": rejected, "overflowed": overflowed,
            "pauses_seen": client.pauses_seen, "seconds": round(time.perf_counter() - t0, 3),
            "failovers": client.failovers, "errors": errors}


# ------------------------------------------------------------------ pqcnet subscribe


@click.command()
@click.option("--relayer", "target", required=True,
              help="Relayer QSTP address host:port; a cluster: host:port,host:port,...")
@click.option("--identity", "identity_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--customer", required=True)
@click.option("--channel", "channels", multiple=True, help="Repeatable; default all channels.")
@click.option("--count", default=0, type=click.IntRange(0), help="Stop after N frames (0: run).")
@click.option("--timeout", "limit", default=0.0, type=click.FloatRange(0),
              help="Stop after this many seconds (0: no limit).")
@click.option("--quiet", is_flag=True, help="No per-frame lines, only the summary.")
@click.option("--output", "output", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Append frame lines to FILE (fsynced per batch) instead of stdout; the "
                   "file is also the cursor: a rerun resumes after its last line, exactly once.")
@click.option("--cursor", "cursor_path", default=None,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Durable cursor file for stdout output (committed after each batch is "
                   "written and flushed): a rerun resumes after it.")
@click.option("--reconnect/--no-reconnect", default=True, show_default=True,
              help="Reconnect and resume from the cursor when the tunnel or relayer goes away.")
def subscribe_cli(target: str, identity_dir: Path, customer: str, channels: tuple[str, ...],
                  count: int, limit: float, quiet: bool, output: Path | None,
                  cursor_path: Path | None, reconnect: bool) -> None:
    """Receive a customer's frames in order, exactly once, one JSON line each, then a summary.

    Each batch is acknowledged to the relayer only after its lines are written and
    flushed (and the cursor committed), so a crash of the relayer or of this command
    never loses a frame; with --output or --cursor a rerun never repeats one.
    """
    if output is not None and cursor_path is not None:
        raise click.UsageError("--output is its own cursor; give --output or --cursor")
    targets = _targets(target)
    if len(targets) > 1 and not reconnect:
        raise click.UsageError("a cluster (several --relayer addresses) needs --reconnect")
    identity = load_cli_identity(identity_dir)
    cursor: Cursor
    if output is not None:
        cursor = JournalCursor(output)
    elif cursor_path is not None:
        cursor = FileCursor(cursor_path)
    else:
        cursor = MemoryCursor()
    summary = asyncio.run(_subscribe(targets, identity, customer, channels, count, limit,
                                     quiet or output is not None, cursor, reconnect))
    click.echo(json.dumps(summary))


async def _subscribe(targets: list[tuple[str, int]], identity: NodeIdentity, customer: str,
                     channels: tuple[str, ...], count: int, limit: float,
                     quiet: bool, cursor: Cursor, reconnect: bool) -> dict[str, Any]:
    sub: ClusterSubscriber | ResumingSubscriber | SubscriberClient
    if len(targets) > 1:  # each relayer delivers the shards it owns: listen to all
        sub = ClusterSubscriber(targets, identity, customer, channels, cursor=cursor)
    elif reconnect:
        sub = ResumingSubscriber(targets, identity, customer, channels, cursor=cursor)
    else:
        sub = await SubscriberClient.connect(*targets[0], identity, cursor=cursor)
        await sub.subscribe(customer, channels)
    got = nbytes = 0

    async def consume() -> None:
        nonlocal got, nbytes
        async for batch in sub.batches():
            taken: dict[tuple[str, str], int] = {}
            for f in batch:
                got += 1
                nbytes += len(f.payload)
                taken[f.topic] = f.seq
                if not quiet:
                    click.echo(json.dumps({"customer": f.customer, "channel": f.channel,
                                           "seq": f.seq, "bytes": len(f.payload)}))
                if count and got >= count:
                    break
            sys.stdout.flush()  # the application's ack: written and flushed, then committed
            if count and got >= count:
                await sub.ack(taken)  # only what was taken; the rest is redelivered
                return

    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit or None):
                await consume()
    finally:
        await sub.close()
        if isinstance(cursor, JournalCursor):
            cursor.close()
    out: dict[str, Any] = {"frames": got, "bytes": nbytes,
                           "duplicates_dropped": sub.duplicates_dropped}
    if isinstance(sub, ResumingSubscriber | ClusterSubscriber):
        out["reconnects"] = sub.reconnects
    return out


# ------------------------------------------------------------------ pqcnet governance


@click.group()
def governance_cli() -> None:
    """Governance queries against a relayer's VolumeMetrics gRPC service."""


@governance_cli.command("pull")
@click.option("--target", required=True,
              help="host:port of the node's QSTP governance listener (with --identity), "
                   "of its TLS gRPC (with --ca-cert), or of a loopback plaintext gRPC.")
@click.option("--identity", "identity_dir", default=None,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Our mesh identity: pull post-quantum through QSTP (the default for a "
                   "remote node).")
@click.option("--expect-peer", default=None,
              help="SPIFFE ID or glob the node must present (with --identity).")
@click.option("--customer", default=None)
@click.option("--channel", default=None)
@click.option("--epoch-from", default=0, show_default=True, type=click.IntRange(0))
@click.option("--epoch-to", default=None, type=click.IntRange(0))
@click.option("--ca-cert", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Classical TLS instead of QSTP (explicit opt-in): PEM CA of the endpoint.")
@click.option("--report", is_flag=True, help="Also fetch and include the signed report.")
def pull_cmd(target: str, identity_dir: Path | None, expect_peer: str | None,
             customer: str | None, channel: str | None, epoch_from: int,
             epoch_to: int | None, ca_cert: str | None, report: bool) -> None:
    """Volume per (customer, channel, qos, epoch) and totals, as JSON.

    With --identity the pull travels inside a QSTP tunnel (ML-KEM key exchange, ML-DSA
    mutual authentication) to the relayer's governance_qstp_port."""
    if identity_dir is not None and ca_cert:
        raise click.UsageError("--identity (QSTP) and --ca-cert (classical TLS) exclude "
                               "each other")
    q = VolumeFilter(customer, channel, epoch_from, epoch_to)
    identity = load_cli_identity(identity_dir) if identity_dir is not None else None

    async def go() -> dict[str, Any]:
        s = await pull_volume(target, q, ca_cert=ca_cert, identity=identity,
                              expect_peer=expect_peer)
        out: dict[str, Any] = {
            "total_bytes": s.total_bytes, "total_frames": s.total_frames,
            "records": [{"customer": r.customer, "channel": r.channel, "qos": r.qos,
                         "epoch": r.epoch, "bytes": r.bytes, "frames": r.frames}
                        for r in s.records]}
        if report:
            rep = await pull_report(target, epoch_from, epoch_to, ca_cert=ca_cert,
                                    identity=identity, expect_peer=expect_peer)
            out["report"] = {"relayer": rep.relayer_id, "epoch_from": rep.epoch_from,
                             "epoch_to": rep.epoch_to, "uptime_seconds": rep.uptime_seconds,
                             "proofs": [{"epoch": p.epoch, "root": p.root.hex(),
                                         "bytes": p.total_bytes, "frames": p.total_frames}
                                        for p in rep.proofs],
                             "receipts": [r.hex() for r in rep.receipts],
                             "signature_bytes": len(rep.signature)}
        return out

    click.echo(json.dumps(asyncio.run(go()), indent=2))


__all__ = ["cli", "governance_cli", "publish_cli", "subscribe_cli"]
