"""``pqcnet ledger`` end to end on a real ledger directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pqcnet.cli import app
from pqcnet.qsdag import AuthorSlashed, InvalidNodeId, Ledger

pytestmark = pytest.mark.timeout(120)


def _run(runner: CliRunner, *args: str, code: int = 0) -> str:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result.stdout  # logs from the run (stderr) never mix into the parsed output


def test_ledger_cli_round_trip(tmp_path: Path) -> None:
    runner = CliRunner()
    lp = ["ledger", "--path", str(tmp_path / "L")]
    gov, rel = str(tmp_path / "gov.pem"), str(tmp_path / "rel.pem")
    _run(runner, *lp, "init", "--network", "t", "--authority", "gov", "--key", gov)
    _run(runner, *lp, "register", "--node", "r1", "--node-key", rel, "--registrar", "gov",
         "--key", gov)
    out = _run(runner, *lp, "append", "--kind", "route", "--json",
               '{"topic": "orders", "shardOwner": "r1"}', "--author", "r1", "--key", rel)
    vid = json.loads(out.strip().splitlines()[-1])["id"]
    assert _run(runner, *lp, "tips").split() == [vid]
    shown = json.loads(_run(runner, *lp, "show", vid))
    assert shown["payload"]["topic"] == "orders" and shown["author"] == "r1"
    assert '"invalid": 0' in _run(runner, *lp, "verify")
    graph = json.loads(_run(runner, *lp, "export-graph", str(tmp_path / "g.json")))
    assert graph["vertices"] == 3 and graph["acyclic"]
    anchored = json.loads(_run(runner, *lp, "anchor", "--sink", str(tmp_path / "a.jsonl"),
                               "--signer-id", "gov", "--key", gov).strip().splitlines()[-1])
    assert anchored["sequences"] == [1]
    # corrupt one stored vertex: verify names it and exits 1
    ledger = Ledger.open(tmp_path / "L")
    raw = bytearray(ledger._store.raw_get("vertices", bytes.fromhex(vid)) or b"")
    raw[40] ^= 1
    ledger._store.raw_put("vertices", bytes.fromhex(vid), bytes(raw))
    ledger.close()
    out = _run(runner, *lp, "verify", code=1)
    assert f"INVALID {vid} CorruptRecord" in out


def test_ledger_cli_slash(tmp_path: Path) -> None:
    runner = CliRunner()
    lp = ["ledger", "--path", str(tmp_path / "L")]
    gov, rel = str(tmp_path / "gov.pem"), str(tmp_path / "rel.pem")
    _run(runner, *lp, "init", "--network", "t", "--authority", "gov", "--key", gov)
    _run(runner, *lp, "register", "--node", "r1", "--node-key", rel, "--registrar", "gov",
         "--key", gov)
    out = json.loads(_run(runner, *lp, "slash", "--target", "r1", "--reason", "equivocation",
                          "--authority", "gov", "--key", gov))
    assert out["target"] == "r1"
    assert json.loads(_run(runner, *lp, "slashed")) == {"slashed": ["r1"]}
    row = json.loads(_run(runner, *lp, "slashed", "r1"))
    assert row["slashed"] and row["slashes"][0]["vertex"] == out["id"]
    # errors escape the command as typed PqcnetErrors (pqcnet.cli.main prints "error: ...")
    result = runner.invoke(app, [*lp, "append", "--kind", "route", "--json",
                                 '{"topic": "o", "shardOwner": "r1"}', "--author", "r1",
                                 "--key", rel])
    assert isinstance(result.exception, AuthorSlashed)
    result = runner.invoke(app, [*lp, "slash", "--target", "r\x00", "--reason", "x",
                                 "--authority", "gov", "--key", gov])
    assert isinstance(result.exception, InvalidNodeId)
    assert "slash target contains" in str(result.exception)
