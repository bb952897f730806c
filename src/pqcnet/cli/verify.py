"""``pqcnet verify``: check what a relayer says it carried, with public keys only.

* ``receipt FILE`` — a customer's signed volume receipt (``fetch-receipt`` gets one):
  receipt signature, every proof header's signature, the QS-DAG vertex anchoring each
  header, each record's inclusion proof; with ``--layer0`` also the Layer-0 envelope
  committing each vertex.
* ``proof FILE`` — a relayer's stored volume proof (``<data_dir>/proofs/<epoch>.proof``):
  signature, root and totals recomputed from its records, every record's inclusion;
  with ``--ledger`` the anchoring vertex, with ``--layer0`` its envelope.

Keys (``--relayer-key``, ``--layer0-key``) are PEM public keys or certificates (an
identity's ``cert.pem``). Output is one JSON object; a check that fails is one
``error:`` line naming it and exit status 1.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import click

from pqcnet._util.files import read_bounded
from pqcnet.cli._common import hostport
from pqcnet.cli._common import load_identity as load_cli_identity
from pqcnet.crypto.pqc import VerifyKey
from pqcnet.errors import PqcnetError
from pqcnet.identity.certs import load_certs, verify_key_of
from pqcnet.layer0 import JsonlSink
from pqcnet.relayer.errors import ReceiptInvalid
from pqcnet.relayer.receipts import (
    MAX_RECEIPT,
    VolumeReceipt,
    check_anchor_vertex,
    verify_receipt,
    verify_receipt_layer0,
)

#: Largest key or certificate file read.
MAX_KEY_FILE = 256 * 1024


def load_public_key(path: Path) -> VerifyKey:
    """A public key from a PEM public key or certificate (or an unencrypted dev key)."""
    try:
        with path.open("rb") as fh:
            pem = fh.read(MAX_KEY_FILE + 1)
    except OSError as exc:
        raise PqcnetError(f"cannot read key {path}: {exc.strerror}") from None
    if len(pem) > MAX_KEY_FILE:
        raise PqcnetError(f"key file {path} is larger than {MAX_KEY_FILE} bytes")
    if b"BEGIN CERTIFICATE" in pem:
        return verify_key_of(load_certs(pem, str(path))[0])
    return VerifyKey.from_pem(pem, private_ok=True)


_key_type = click.Path(exists=True, dir_okay=False, path_type=Path)


def _layer0(vids: list[bytes], layer0: Path | None, layer0_key: Path | None
            ) -> list[dict[str, Any]] | None:
    if layer0 is None:
        return None
    if layer0_key is None:
        raise click.UsageError("--layer0 needs --layer0-key")
    anchors = verify_receipt_layer0(vids, JsonlSink(layer0).records(),
                                    load_public_key(layer0_key))
    return [{"network": a.network, "epoch": a.epoch, "first_position": a.first_position,
             "last_position": a.last_position, "root": a.merkle_root.hex()} for a in anchors]


@click.group()
def cli() -> None:
    """Check volume receipts and proofs with public keys only."""


@cli.command("receipt")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--relayer-key", required=True, type=_key_type,
              help="The relayer's public key or certificate (PEM).")
@click.option("--layer0", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Layer-0 epoch records (JSONL) to check the anchors against.")
@click.option("--layer0-key", type=_key_type, help="The Layer-0 anchorer's public key (PEM).")
def receipt_cmd(file: Path, relayer_key: Path, layer0: Path | None,
                layer0_key: Path | None) -> None:
    """Verify a customer's signed volume receipt FILE."""
    receipt = VolumeReceipt.decode(
        read_bounded(file, MAX_RECEIPT, ReceiptInvalid, unreadable=PqcnetError))
    vids = verify_receipt(receipt, load_public_key(relayer_key))
    out: dict[str, Any] = {
        "ok": True, "relayer": receipt.relayer_id, "customer": receipt.customer,
        "epoch": receipt.epoch, "frames": receipt.total_frames, "bytes": receipt.total_bytes,
        "records": [{"channel": e.record.channel, "qos": e.record.qos,
                     "frames": e.record.frames, "bytes": e.record.bytes, "part": e.part}
                    for e in receipt.entries],
        "parts": len(receipt.proofs), "anchors": [v.hex() for v in vids]}
    l0 = _layer0(vids, layer0, layer0_key)
    if l0 is not None:
        out["layer0"] = l0
    click.echo(json.dumps(out, indent=2))


@cli.command("proof")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--relayer-key", required=True, type=_key_type,
              help="The relayer's public key or certificate (PEM).")
@click.option("--ledger", "ledger_dir", type=click.Path(exists=True, file_okay=False,
                                                        path_type=Path),
              help="A QS-DAG ledger holding the anchoring vertex (not in use by a running node).")
@click.option("--layer0", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Layer-0 epoch records (JSONL) to check the anchor against.")
@click.option("--layer0-key", type=_key_type, help="The Layer-0 anchorer's public key (PEM).")
def proof_cmd(file: Path, relayer_key: Path, ledger_dir: Path | None, layer0: Path | None,
              layer0_key: Path | None) -> None:
    """Verify a relayer's volume proof FILE (``<epoch>[.<part>].proof``)."""
    from pqcnet.qsdag import Ledger
    from pqcnet.relayer.errors import ProofError
    from pqcnet.relayer.proof import inclusion_proof, verify_inclusion, verify_volume_proof
    from pqcnet.relayer.proofstore import ProofStore

    name = file.name.removesuffix(".proof").split(".")
    try:
        epoch, part = int(name[0]), int(name[1]) if len(name) > 1 else 0
    except ValueError:
        raise click.UsageError(f"{file.name}: expected <epoch>[.<part>].proof") from None
    proof, vid = ProofStore(file.parent).read(epoch, part)
    key = load_public_key(relayer_key)
    try:
        verify_volume_proof(proof, key)
        for i, rec in enumerate(proof.records):
            verify_inclusion(rec, inclusion_proof(proof, i), proof.header())
    except ProofError as exc:
        raise ReceiptInvalid(f"volume proof: {exc}") from None
    out: dict[str, Any] = {
        "ok": True, "relayer": proof.relayer_id, "epoch": proof.epoch, "part": proof.part,
        "parts": proof.parts, "records": proof.record_count, "frames": proof.total_frames,
        "bytes": proof.total_bytes, "root": proof.root.hex(), "anchor": vid.hex()}
    if ledger_dir is not None:
        with Ledger.open(ledger_dir) as ledger:
            try:
                encoded = ledger.get(vid).encode()
            except PqcnetError as exc:
                raise ReceiptInvalid(f"anchor vertex: {exc}") from None
        check_anchor_vertex(encoded, proof.header(), key)
        out["ledger"] = "anchor vertex verified"
    l0 = _layer0([vid], layer0, layer0_key)
    if l0 is not None:
        out["layer0"] = l0
    click.echo(json.dumps(out, indent=2))


@cli.command("fetch-receipt")
@click.option("--relayer", "target", required=True, help="Relayer QSTP address host:port.")
@click.option("--identity", "identity_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--customer", default=None, help="Default: the identity's tenant.")
@click.option("--epoch", required=True, type=click.IntRange(0))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
def fetch_receipt_cmd(target: str, identity_dir: Path, customer: str | None, epoch: int,
                      out: Path) -> None:
    """Ask a relayer for the customer's signed receipt of EPOCH and store it in OUT."""
    from pqcnet.identity.keystore import atomic_write
    from pqcnet.relayer.client import PublisherClient

    host, port = hostport(target, param_hint="--relayer")
    identity = load_cli_identity(identity_dir)
    who = customer or identity.spiffe_id.tenant

    async def go() -> VolumeReceipt:
        client = await PublisherClient.connect(host, port, identity)
        try:
            return await client.receipt(who, epoch)
        finally:
            await client.close()

    receipt = asyncio.run(go())
    atomic_write(out, receipt.encode())
    click.echo(json.dumps({"out": str(out), "relayer": receipt.relayer_id, "customer": who,
                           "epoch": epoch, "frames": receipt.total_frames,
                           "bytes": receipt.total_bytes}))


__all__ = ["cli", "load_public_key"]
