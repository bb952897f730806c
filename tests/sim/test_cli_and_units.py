"""The CLI end to end at tiny size, the scenario checks, and engine/network/store units."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pqcnet.cli import main
from pqcnet.crypto.errors import SignatureInvalid
from pqcnet.qsdag import Ledger, OpaqueRecord, VertexKind
from pqcnet.sim.config import NetworkSpec, from_dict, override
from pqcnet.sim.crypto import signing_key, verify_once
from pqcnet.sim.engine import Engine, Streams
from pqcnet.sim.errors import ScenarioError, SimStateError
from pqcnet.sim.memstore import MemoryStore
from pqcnet.sim.network import Network
from pqcnet.sim.transport import drive
from tests.sim.conftest import SCENARIOS


def test_cli_run_then_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results"
    main(["sim", "run", str(SCENARIOS / "scale.yaml"), "--nodes", "20", "--seed", "3",
          "--duration", "50", "--set", "workload.start_s=10", "--set", "workload.drain_s=25",
          "--out", str(out), "--no-progress"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run_dir = Path(line["results"])
    assert run_dir.name == "scale-n20-s3"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["seed"] == 3 and summary["nodes"] == 20
    for key in ("wall_s", "peak_rss_mib", "versions", "machine", "loadavg_start"):
        assert key in summary["run"]
    assert (run_dir / "messages.csv").read_text().startswith("mid,kind,origin")
    for png in summary["run"]["plots"]:
        data = (run_dir / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 200_000
    main(["sim", "report", str(out)])
    report = (out / "REPORT.md").read_text()
    assert "Against Waku's Shadow figures" in report and "scale-n20-s3" in report


def test_cli_bad_override_is_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["sim", "run", str(SCENARIOS / "scale.yaml"), "--set", "gossipsub.D=99",
              "--no-progress"])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: gossipsub") and "\n" not in err


def test_scenario_validation_names_the_field() -> None:
    with pytest.raises(ScenarioError, match=r"unknown key network\.latncy"):
        from_dict({"name": "x", "network": {"latncy": {}}})
    with pytest.raises(ScenarioError, match="nodes: must be in"):
        from_dict({"name": "x", "nodes": 1})
    with pytest.raises(ScenarioError, match=r"workload\.kind: must be one of"):
        from_dict({"name": "x", "workload": {"kind": "nope"}})
    sc = from_dict({"name": "x"})
    with pytest.raises(ScenarioError, match=r"unknown key churn\.rate"):
        override(sc, {"churn.rate": 1})


def test_engine_orders_ties_by_insertion_and_refuses_the_past() -> None:
    eng, seen = Engine(), []
    for k in range(5):
        eng.at(1.0, seen.append, k)
    eng.at(0.5, seen.append, "first")
    eng.run(2.0)
    assert seen == ["first", 0, 1, 2, 3, 4]
    with pytest.raises(SimStateError):
        eng.at(1.0, seen.append, "late")
    assert Streams(7)["a"].random() == Streams(7)["a"].random() != Streams(8)["a"].random()


def test_network_serializes_on_both_links_and_drops_across_a_partition() -> None:
    eng = Engine()
    spec = NetworkSpec(bandwidth_mbps=8.0)  # 1 byte per microsecond
    net = Network(eng, spec, 3, Streams(1))
    net.online = [True, True, True]
    got: list[float] = []
    for _ in range(2):
        net.send(0, 1, 1000, lambda: got.append(eng.now))
    net.split([2])
    net.send(0, 2, 10, lambda: got.append(-1.0))
    eng.run(1.0)
    # 1 ms uplink + 100 ms + 1 ms downlink; the second waits behind the first on both
    assert got == pytest.approx([0.102, 0.103])
    assert net.dropped["partition"] == 1


def test_memstore_runs_the_real_ledger_and_survives_a_reopen() -> None:
    store = MemoryStore()
    key = signing_key(1, "gov")
    ledger = Ledger(store, clock=lambda: 1_800_000_000.0, max_orphans=16, skew=30.0)
    ledger.init_genesis("net", "gov", key)
    ledger.append(VertexKind.PERFORMANCE_REPORT, OpaqueRecord("t", "gov", b"x"), "gov", key)
    reopened = Ledger(store, clock=lambda: 1_800_000_000.0, max_orphans=16, skew=30.0)
    assert len(reopened) == 2 and reopened.tips() == ledger.tips()
    assert reopened.verify().ok


def test_memstore_layers_write_over_a_shared_base_without_touching_it() -> None:
    base = MemoryStore()
    gov, sentry = signing_key(1, "gov"), signing_key(1, "sentry")
    clock = lambda: 1_800_000_000.0  # noqa: E731
    first = Ledger(base, clock=clock, max_orphans=16, skew=30.0)
    first.init_genesis("net", "gov", gov)
    first.register_author("sentry", sentry.public_key, registrar="gov", signer=gov)
    onboarding = first.tips()
    a, b = MemoryStore(base=base), MemoryStore(base=base)
    la = Ledger(a, clock=clock, max_orphans=16, skew=30.0)
    la.append(VertexKind.PERFORMANCE_REPORT, OpaqueRecord("t", "sentry", b"x"), "sentry", sentry)
    assert len(la) == 3 and la.tips() != onboarding and la.verify().ok
    # the other layer and the base still see only the onboarding state
    lb = Ledger(b, clock=clock, max_orphans=16, skew=30.0)
    assert len(lb) == 2 and lb.tips() == onboarding
    assert Ledger(base, clock=clock, max_orphans=16, skew=30.0).tips() == onboarding
    # ordered scans merge both layers and skip the tombstoned tip
    assert list(a.keys("tips")) == la.tips()
    assert len(list(a.keys("vertices"))) == 3


def test_verify_once_caches_outcomes_and_restores_the_real_method() -> None:
    key = signing_key(1, "k")
    sig = key.sign(b"m", context=b"c")
    with verify_once(True) as stats:
        for _ in range(3):
            key.public_key.verify(sig, b"m", context=b"c")
        for _ in range(2):
            with pytest.raises(SignatureInvalid):
                key.public_key.verify(sig, b"other", context=b"c")
    assert (stats.real, stats.cached, stats.failures) == (2, 3, 2)
    with verify_once(False) as paid:
        key.public_key.verify(sig, b"m", context=b"c")
        key.public_key.verify(sig, b"m", context=b"c")
    assert (paid.real, paid.cached) == (2, 0)
    with pytest.raises(SignatureInvalid):  # the real method is back
        key.public_key.verify(sig, b"other", context=b"c")


def test_drive_refuses_a_coroutine_that_suspends() -> None:
    import asyncio

    async def ok() -> int:
        return 3

    async def sleeps() -> None:
        await asyncio.sleep(0)

    assert drive(ok()) == 3
    with pytest.raises(SimStateError):
        drive(sleeps())
