"""``pqcnet ledger``: create, append to, inspect, verify, audit and anchor a QS-DAG.

Keys are PKCS#8 PEM files (``--key``); ``init`` and ``register`` create a missing
key file (mode 0600) so a first run needs no other tooling. Payloads are given as
protobuf JSON for the kind's message (``--json``), e.g. a ROUTE:
``{"topic": "orders", "shardOwner": "relayer-1", "replicas": 2}``; bytes fields are
base64 in that mapping.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from tqdm import tqdm

from pqcnet.crypto.pqc import SigningKey
from pqcnet.errors import PqcnetError

F = TypeVar("F", bound=Callable[..., Any])
KINDS = ["attestation", "volume-proof", "performance-report", "policy-anchor", "route",
         "governance-directive", "slashing-evidence", "relay-record", "key-version"]


def _load_or_create_key(path: Path, *, create: bool) -> SigningKey:
    if path.exists():
        return SigningKey.from_pem(path.read_bytes())
    if not create:
        raise PqcnetError(f"key file {path} does not exist")
    key = SigningKey.generate()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.to_pem())
    click.echo(f"wrote new ML-DSA-65 key {path}", err=True)
    return key


def _open(ctx: click.Context) -> Any:
    from pqcnet.qsdag import Ledger

    ledger = Ledger.open(ctx.obj["path"])
    ctx.call_on_close(ledger.close)
    return ledger


def _id(text: str) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise PqcnetError(f"vertex id must be 64 hex characters, got {text!r}") from None
    if len(raw) != 32:
        raise PqcnetError("vertex id must be 32 bytes (64 hex characters)")
    return raw


def _receipt(r: Any, **extra: str) -> None:
    """Print an append's receipt (vertex id, depth, position) as one JSON line."""
    click.echo(json.dumps({"id": r.id.hex(), "depth": r.depth, "position": r.position,
                           **extra}))


def _key_option(help_text: str) -> Callable[[F], F]:
    """``--key PEM``: the signing key of the command's author/authority/registrar."""
    return click.option("--key", "key_path", required=True, type=click.Path(path_type=Path),
                        help=help_text)


@click.group()
@click.option("--path", "path", default="pqcnet-ledger", show_default=True,
              envvar="PQCNET_LEDGER", type=click.Path(file_okay=False, path_type=Path),
              help="Ledger directory (RocksDB).")
@click.pass_context
def cli(ctx: click.Context, path: Path) -> None:
    """The QS-DAG ledger: signed vertices on RocksDB, with Layer-0 anchoring."""
    ctx.obj = {"path": path}


@cli.command()
@click.option("--network", required=True, help="Network name recorded in genesis.")
@click.option("--authority", required=True, help="Node id of the genesis authority.")
@_key_option("Authority key PEM (created if missing).")
@click.option("--open-enrolment/--no-open-enrolment", default=False,
              help="Allow nodes to self-register their first key.")
@click.pass_context
def init(ctx: click.Context, network: str, authority: str, key_path: Path,
         open_enrolment: bool) -> None:
    """Create the ledger and its genesis vertex."""
    key = _load_or_create_key(key_path, create=True)
    r = _open(ctx).init_genesis(network, authority, key, open_enrolment=open_enrolment)
    click.echo(json.dumps({"genesis": r.id.hex(), "network": network}))


@cli.command()
@click.option("--node", required=True, help="Node id to register.")
@click.option("--node-key", required=True, type=click.Path(path_type=Path),
              help="The node's key PEM (created if missing; only its public key is used).")
@click.option("--registrar", required=True, help="Authority node id signing the registration.")
@_key_option("Registrar key PEM.")
@click.pass_context
def register(ctx: click.Context, node: str, node_key: Path, registrar: str,
             key_path: Path) -> None:
    """Register (or rotate to) a node key as a KEY_VERSION vertex."""
    pub = _load_or_create_key(node_key, create=True).public_key
    signer = _load_or_create_key(key_path, create=False)
    r = _open(ctx).register_author(node, pub, registrar=registrar, signer=signer)
    _receipt(r)


@cli.command()
@click.option("--kind", required=True, type=click.Choice(KINDS))
@click.option("--json", "payload_json", required=True, help="Payload as protobuf JSON.")
@click.option("--author", required=True, help="Author node id.")
@_key_option("Author key PEM.")
@click.pass_context
def append(ctx: click.Context, kind: str, payload_json: str, author: str,
           key_path: Path) -> None:
    """Sign and anchor one vertex; prints its receipt."""
    from google.protobuf import json_format

    from pqcnet.qsdag import VertexKind
    from pqcnet.qsdag.payloads import decode_payload, schema

    vkind = VertexKind[kind.upper().replace("-", "_")]
    msg = schema(vkind)[0]()
    try:
        json_format.Parse(payload_json, msg)
    except json_format.ParseError as exc:
        raise PqcnetError(f"payload JSON does not fit {vkind.name}: {exc}") from None
    payload = msg.SerializeToString(deterministic=True)
    decode_payload(vkind, payload)
    signer = _load_or_create_key(key_path, create=False)
    r = _open(ctx).append(vkind, payload, author, signer)
    _receipt(r)


@cli.command()
@click.option("--target", required=True, help="Node id to disable.")
@click.option("--reason", required=True, help="Why (recorded in the ledger).")
@click.option("--authority", required=True, help="Genesis authority node id signing it.")
@_key_option("Authority key PEM.")
@click.pass_context
def slash(ctx: click.Context, target: str, reason: str, authority: str,
          key_path: Path) -> None:
    """Disable a node's key: its vertices descending from this one are refused
    until a registrar re-registers it and it re-attests."""
    signer = _load_or_create_key(key_path, create=False)
    r = _open(ctx).slash(target, reason, authority, signer)
    _receipt(r, target=target)


@cli.command()
@click.argument("node", required=False)
@click.pass_context
def slashed(ctx: click.Context, node: str | None) -> None:
    """List slashed nodes, or show NODE's slash history (JSON)."""
    ledger = _open(ctx)
    if node is None:
        click.echo(json.dumps({"slashed": ledger.views.slashes.slashed_nodes()}))
    else:
        click.echo(json.dumps(ledger.views.slashes.get(node), indent=2))


@cli.command()
@click.argument("vertex_id")
@click.pass_context
def show(ctx: click.Context, vertex_id: str) -> None:
    """Print one vertex (and its decoded payload) as JSON."""
    from google.protobuf import json_format

    from pqcnet.qsdag.payloads import schema

    ledger = _open(ctx)
    vid = _id(vertex_id)
    v, r = ledger.get(vid), ledger.receipt(vid)
    msg = schema(v.kind)[0]()
    msg.ParseFromString(v.payload)
    click.echo(json.dumps({
        "id": vid.hex(), "kind": v.kind.name, "author": v.author, "counter": v.counter,
        "timestamp_ms": v.timestamp_ms, "key_version": v.key_version,
        "parents": [p.hex() for p in v.parents], "depth": r.depth, "position": r.position,
        "children": [c.hex() for c in ledger.children(vid)],
        "payload": json_format.MessageToDict(msg), "signature_bytes": len(v.signature),
    }, indent=2))


@cli.command()
@click.pass_context
def verify(ctx: click.Context) -> None:
    """Re-verify every vertex; lists every invalid one (exit 1 if any)."""
    ledger = _open(ctx)
    with tqdm(total=len(ledger), unit="vertex", desc="verify", disable=None) as bar:
        report = ledger.verify(progress=bar.update)
    for vid, reason in report.invalid:
        click.echo(f"INVALID {vid} {reason}")
    click.echo(json.dumps({"checked": report.checked, "invalid": len(report.invalid),
                           "orphans": ledger.orphan_count}))
    if not report.ok:
        ctx.exit(1)


@cli.command()
@click.pass_context
def tips(ctx: click.Context) -> None:
    """Print the current tips (one id per line)."""
    for t in _open(ctx).tips():
        click.echo(t.hex())


@cli.command("export-graph")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.pass_context
def export_graph(ctx: click.Context, out: Path) -> None:
    """Write the DAG for audit: OUT.graphml (GraphML) or node-link JSON otherwise."""
    from pqcnet.qsdag.analysis import is_acyclic, to_graph, write_graph

    g = to_graph(_open(ctx))
    fmt = write_graph(g, out)
    click.echo(json.dumps({"out": str(out), "format": fmt, "vertices": g.number_of_nodes(),
                           "edges": g.number_of_edges(), "acyclic": is_acyclic(g)}))


@cli.command()
@click.option("--sink", "sink_path", default="anchors.jsonl", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path), help="JSONL sink file.")
@click.option("--channel", default="channel-0", show_default=True)
@click.option("--signer-id", required=True, help="Node id of the anchoring node.")
@_key_option("Anchoring node key PEM.")
@click.option("--epoch-size", default=1024, show_default=True, type=click.IntRange(1, 65536))
@click.pass_context
def anchor(ctx: click.Context, sink_path: Path, channel: str, signer_id: str, key_path: Path,
           epoch_size: int) -> None:
    """Anchor all not-yet-anchored vertices to Layer-0 (one envelope per epoch)."""
    from pqcnet.layer0 import Anchorer, JsonlSink

    ledger = _open(ctx)
    anchorer = Anchorer(ledger, JsonlSink(sink_path), channel=channel, signer_id=signer_id,
                        signer=_load_or_create_key(key_path, create=False),
                        key_version=ledger.views.key_versions.current(signer_id) or 1,
                        epoch_size=epoch_size)
    with tqdm(total=anchorer.pending(), unit="vertex", desc="anchor", disable=None) as bar:
        records = anchorer.anchor_all(progress=bar.update)
    click.echo(json.dumps({"envelopes": len(records),
                           "sequences": [r.envelope.sequence for r in records],
                           "sink": str(sink_path)}))



def _query_command() -> click.Command:
    """``pqcnet ledger query`` lives in :mod:`pqcnet.cli.ledger_query`: it speaks gRPC,
    which the relayer extra installs (``pip install 'pqcnet[relayer]'``); the other
    ledger commands need only the core."""
    try:
        mod = importlib.import_module("pqcnet.cli.ledger_query")
    except ImportError as exc:
        missing = exc.name

        @click.command("query")
        def unavailable() -> None:
            """Query a ledger (needs pqcnet[relayer])."""
            raise click.ClickException(f"ledger query needs {missing}: "
                                       "pip install 'pqcnet[relayer]'")

        return unavailable
    command: click.Command = mod.query
    return command


cli.add_command(_query_command())
