"""``pqcnet ledger query``: the Ledger gRPC service, local or remote (post-quantum).

Separate from :mod:`pqcnet.cli.ledger` because it needs grpcio (the relayer extra),
while the rest of ``pqcnet ledger`` runs on the core install.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from pqcnet.cli.ledger import KINDS, _id


@click.command()
@click.option("--remote", default=None, metavar="HOST:PORT",
              help="Query a node's Ledger service instead of --path: through its QSTP "
                   "governance listener with --identity (post-quantum, the default), through "
                   "classical TLS with --ca-cert, or plaintext on loopback.")
@click.option("--identity", "identity_dir", default=None,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Our mesh identity for the QSTP tunnel to --remote.")
@click.option("--expect-peer", default=None, help="SPIFFE ID or glob --remote must present.")
@click.option("--ca-cert", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Classical TLS to --remote (explicit opt-in).")
@click.option("--vertex", "vertex_id", default=None, help="One vertex by id (hex).")
@click.option("--anchor", "anchor_of", default=None,
              help="The Layer-0 envelope and inclusion proof of a vertex (hex id).")
@click.option("--slashes", "slashes", is_flag=True, help="Slashed nodes (and --author's history).")
@click.option("--author", default=None, help="Only vertices by this node.")
@click.option("--kind", type=click.Choice([k.upper().replace("-", "_") for k in KINDS]
                                           + ["GENESIS"]), default=None)
@click.option("--since-ms", default=0, type=click.IntRange(0), help="Author time, inclusive.")
@click.option("--until-ms", default=None, type=click.IntRange(0), help="Author time, exclusive.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 10_000))
@click.pass_context
def query(ctx: click.Context, remote: str | None, identity_dir: Path | None,
          expect_peer: str | None, ca_cert: str | None, vertex_id: str | None,
          anchor_of: str | None, slashes: bool, author: str | None, kind: str | None,
          since_ms: int, until_ms: int | None, limit: int) -> None:
    """Query a ledger as JSON: vertices by author/kind/time, one vertex, slashes, anchors.

    Local (--path) and remote (--remote) queries take the same path: the Ledger gRPC
    service (for a local ledger, served in-process on loopback for this command).
    """
    import asyncio
    import contextlib

    from pqcnet.cli._common import load_identity
    from pqcnet.relayer import ledger_api as api
    from pqcnet.relayer.governance import open_channel

    if identity_dir is not None and ca_cert:
        raise click.UsageError("--identity (QSTP) and --ca-cert (classical TLS) exclude "
                               "each other")
    identity = load_identity(identity_dir) if identity_dir is not None else None

    async def ask(channel: Any) -> Any:
        if vertex_id:
            return await api.get_vertex(channel, _id(vertex_id))
        if anchor_of:
            return await api.get_anchor(channel, _id(anchor_of))
        if slashes:
            return await api.get_slashes(channel, author)
        return await api.query_vertices(channel, api.VertexFilter(
            author, kind, since_ms, until_ms, limit))

    async def go() -> Any:
        async with contextlib.AsyncExitStack() as stack:
            target = remote
            if target is None:
                from pqcnet.qsdag import Ledger

                ledger = Ledger.open(ctx.obj["path"])
                stack.callback(ledger.close)
                server, port = await api.serve_ledger(api.LedgerService(ledger))
                stack.push_async_callback(server.stop, 0)
                target = f"127.0.0.1:{port}"
            channel = await stack.enter_async_context(open_channel(
                target, identity=identity, expect_peer=expect_peer, ca_cert=ca_cert))
            return await ask(channel)

    click.echo(json.dumps(asyncio.run(go()), indent=2))
