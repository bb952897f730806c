"""``pqcnet node run``: a relayer or sentry together with its control plane.

The command loads and validates the node file (see ``examples/node-relayer.yaml``),
starts :class:`~pqcnet.runtime.node.NodeRuntime`, prints one ``ready`` JSON line on
stdout once the node listens and has joined the mesh (scripts and tests wait for it),
and serves until SIGINT/SIGTERM, then shuts down cleanly. ``check`` validates a node
file without starting anything.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from pqcnet.cli._common import run_until_signalled
from pqcnet.runtime import schema

_config = click.option("--config", "config_path", required=True,
                       type=click.Path(dir_okay=False, path_type=Path),
                       help="Node YAML (see examples/node-relayer.yaml, node-sentry.yaml).")


@click.group()
def cli() -> None:
    """Run a relayer or sentry with its control-plane agent (directives, reports)."""


@cli.command("check")
@_config
def check(config_path: Path) -> None:
    """Validate a node file (and the role's config it names) as `run` would; print a JSON
    summary (same as `pqcnet config check FILE --kind node`)."""
    click.echo(json.dumps(schema.check_node_file(config_path)))


@cli.command("run")
@_config
def run(config_path: Path) -> None:
    """Start the node and its control-plane agent; serve until SIGINT/SIGTERM."""
    from pqcnet.runtime.node import NodeRuntime

    cfg = schema.load_node_file(config_path)

    async def start() -> NodeRuntime:
        node = NodeRuntime(cfg)
        await node.start()
        return node

    def ready(node: NodeRuntime) -> None:
        click.echo(json.dumps({
            "ready": True, "role": cfg.role, "node": node.node_id, "port": node.port,
            "metrics_port": node.metrics_port, "mesh_metrics_port": node.mesh_metrics_port,
            "grpc_port": node.relayer.grpc_port if node.relayer is not None else None,
            "transport": cfg.control_plane.spec.transport,
            "namespace": cfg.control_plane.spec.namespace}))
        sys.stdout.flush()

    run_until_signalled(start, NodeRuntime.stop, ready)
