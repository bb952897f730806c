"""``pqcnet verify receipt|proof`` on files a real relayer produced: good ones pass with
public keys only, tampered ones fail with one ``error:`` line and exit status 1."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pqcnet.cli import main
from pqcnet.crypto.pqc import SigningKey
from pqcnet.layer0 import Anchorer, JsonlSink
from pqcnet.relayer import proof as proof_mod
from pqcnet.relayer.metering import VolumeDelta
from tests.relayer.e2e import identities, start_node

pytestmark = pytest.mark.timeout(120)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        main(list(argv))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


async def test_verify_receipt_and_split_proof_files(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proof_mod, "MAX_LEAVES", 2)  # 3 records: two trees
    node = await start_node(tmp_path, epoch_seconds=60.0)
    try:
        delta: VolumeDelta = {(5, "acme", ch, 1): [100, 2] for ch in ("a", "b", "c")}
        await node.store.save(0, {}, delta)
        node.meter.apply(delta)
        assert len(node.prove_closed_epochs(now=time.time())) == 2
        (tmp_path / "receipt.bin").write_bytes(node.receipt_for("acme", 5).encode())
        ledger_dir = node.data_dir / "ledger"
    finally:
        await node.stop()
    cert = tmp_path / "relayer-cert.pem"
    cert.write_bytes(identities()[0].cert_chain_pem)
    l0 = SigningKey.generate()
    (tmp_path / "l0.pub").write_bytes(l0.public_key.to_pem())
    from pqcnet.qsdag import Ledger

    with Ledger.open(ledger_dir) as ledger:
        Anchorer(ledger, JsonlSink(tmp_path / "anchors.jsonl"), channel="channel-0",
                 signer_id="anchorer-1", signer=l0).anchor_all()

    code, out, _ = run(capsys, "verify", "receipt", str(tmp_path / "receipt.bin"),
                       "--relayer-key", str(cert), "--layer0", str(tmp_path / "anchors.jsonl"),
                       "--layer0-key", str(tmp_path / "l0.pub"))
    got = json.loads(out)
    assert code == 0 and got["ok"] and got["frames"] == 6 and got["parts"] == 2
    assert len(got["layer0"]) == 2

    for name in ("5.proof", "5.1.proof"):
        code, out, err = run(capsys, "verify", "proof", str(node.data_dir / "proofs" / name),
                             "--relayer-key", str(cert), "--ledger", str(ledger_dir),
                             "--layer0", str(tmp_path / "anchors.jsonl"),
                             "--layer0-key", str(tmp_path / "l0.pub"))
        assert code == 0, err
        assert json.loads(out)["ledger"] == "anchor vertex verified"

    raw = bytearray((tmp_path / "receipt.bin").read_bytes())
    raw[len(raw) // 2] ^= 1
    (tmp_path / "bad.bin").write_bytes(bytes(raw))
    code, out, err = run(capsys, "verify", "receipt", str(tmp_path / "bad.bin"),
                         "--relayer-key", str(cert))
    assert code == 1 and err.startswith("error:") and out == ""
    code, _, err = run(capsys, "verify", "receipt", str(tmp_path / "receipt.bin"),
                       "--relayer-key", str(cert), "--layer0", str(tmp_path / "anchors.jsonl"),
                       "--layer0-key", str(cert))  # the wrong Layer-0 key
    assert code == 1 and "layer-0" in err
