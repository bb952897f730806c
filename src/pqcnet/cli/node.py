"""``pqcnet node run``: a relayer or sentry together with its control plane.

The command loads and validates the node file (see ``examples/node-relayer.yaml``),
starts :class:`~pqcnet.runtime.node.NodeRuntime`, prints one ``ready`` JSON line on
stdout once the node listens and has joined the mesh (scripts and tests wait for it),
and serves until SIGINT/SIGTERM, then shuts down cleanly. ``check`` validates a node
file without starting anything.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import click

from pqcnet.runtime.config import NodeConfig, load_node_config

_config = click.option("--config", "config_path", required=True,
                       type=click.Path(dir_okay=False, path_type=Path),
                       help="Node YAML (see examples/node-relayer.yaml, node-sentry.yaml).")


@click.group()
def cli() -> None:
    """Run a relayer or sentry with its control-plane agent (directives, reports)."""


@cli.command("check")
@_config
def check(config_path: Path) -> None:
    """Validate a node file (and the role's config it names); print a JSON summary."""
    cfg = load_node_config(config_path)
    cp = cfg.control_plane
    click.echo(json.dumps({
        "role": cfg.role, "transport": cp.transport, "waku_rest_urls": list(cp.waku_rest_urls),
        "namespace": cp.namespace, "governance_keys": len(cp.governance_keys),
        "governance_threshold": cp.governance_threshold, "trusted": sorted(cp.trust),
        "ledger": cp.ledger}))


@cli.command("run")
@_config
def run(config_path: Path) -> None:
    """Start the node and its control-plane agent; serve until SIGINT/SIGTERM."""
    cfg = load_node_config(config_path)
    asyncio.run(_run(cfg))


async def _run(cfg: NodeConfig) -> None:
    from pqcnet.runtime.node import NodeRuntime

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    node = NodeRuntime(cfg)
    await node.start()
    try:
        click.echo(json.dumps({
            "ready": True, "role": cfg.role, "node": node.node_id, "port": node.port,
            "metrics_port": node.metrics_port, "mesh_metrics_port": node.mesh_metrics_port,
            "grpc_port": node.relayer.grpc_port if node.relayer is not None else None,
            "transport": cfg.control_plane.transport,
            "namespace": cfg.control_plane.namespace}))
        sys.stdout.flush()
        await stop.wait()
    finally:
        await node.stop()
