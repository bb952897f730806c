"""Storage: crash safety under SIGKILL, corruption detection, view rebuilds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pqcnet.qsdag import CorruptRecord, Ledger, NotFound, RelayRecord, Route, VertexKind
from pqcnet.qsdag.store import VIEW_FAMILIES
from tests.conftest import ROOT
from tests.qsdag.conftest import ALICE, BOB, GOV, World, make_ledger

pytestmark = pytest.mark.timeout(120)


def test_sigkill_mid_stream_loses_nothing_acknowledged(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    make_ledger(path).close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.qsdag.crash_writer", str(path)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    acked: list[str] = []
    for line in proc.stdout:
        acked.append(line.strip())
        if len(acked) >= 150:
            break
    proc.send_signal(signal.SIGKILL)
    rest, _ = proc.communicate(timeout=30)
    acked += [x for x in rest.split("\n") if len(x) == 64]  # printed before the kill
    assert proc.returncode == -signal.SIGKILL
    ledger = Ledger.open(path)
    report = ledger.verify()
    assert report.ok, report.invalid
    assert report.checked >= len(acked) + 3
    for vid in acked:
        assert ledger.has(bytes.fromhex(vid))
    # the reopened ledger keeps working: counters and tips continue consistently
    ledger.append(VertexKind.ROUTE, Route("after-crash", "alice"), "alice", ALICE)
    assert ledger.verify().ok and len(ledger.tips()) == 1
    ledger.close()


def test_flipped_stored_byte_is_detected_not_served(world: World) -> None:
    ledger = world.ledger
    r = ledger.append(VertexKind.ROUTE, Route("t", "alice"), "alice", ALICE)
    store = ledger._store
    raw = bytearray(store.raw_get("vertices", r.id) or b"")
    raw[len(raw) // 2] ^= 0x40
    store.raw_put("vertices", r.id, bytes(raw))
    with pytest.raises(CorruptRecord):
        ledger.get(r.id)
    report = ledger.verify()
    assert [vid for vid, _ in report.invalid] == [r.id.hex()]
    assert "CorruptRecord" in report.invalid[0][1]
    # a damaged view row is detected too
    key = next(iter(store.keys("v_route")))
    view = bytearray(store.raw_get("v_route", key) or b"")
    view[-2] ^= 1
    store.raw_put("v_route", key, bytes(view))
    with pytest.raises(CorruptRecord):
        ledger.views.routing.get("t")


def test_value_moved_under_another_key_is_detected(world: World) -> None:
    ledger = world.ledger
    a = ledger.append(VertexKind.ROUTE, Route("a", "alice"), "alice", ALICE)
    b = ledger.append(VertexKind.ROUTE, Route("b", "bob"), "bob", BOB)
    store = ledger._store
    store.raw_put("vertices", a.id, store.raw_get("vertices", b.id) or b"")
    with pytest.raises(CorruptRecord):
        ledger.get(a.id)
    with pytest.raises(NotFound):
        ledger.get(b"\x00" * 32)


def test_views_rebuild_from_vertices(world: World) -> None:
    ledger = world.ledger
    ledger.append(VertexKind.RELAY_RECORD, RelayRecord("alice", 500, "127.0.0.1:1", ("s0",)),
                  "gov", GOV)
    ledger.append(VertexKind.ROUTE, Route("orders", "alice", replicas=2), "alice", ALICE)
    before = (ledger.views.relay.get("alice"), ledger.views.routing.table(),
              [e.record for e in ledger.views.key_versions.history("bob")])
    for cf in VIEW_FAMILIES:
        ledger._store.clear(cf)
    ledger.views.key_versions.forget_cache()
    assert ledger.views.routing.table() == {}
    assert ledger.rebuild_views() == len(ledger)
    after = (ledger.views.relay.get("alice"), ledger.views.routing.table(),
             [e.record for e in ledger.views.key_versions.history("bob")])
    assert after == before and before[0]["stake"] == 500
    ledger.append(VertexKind.ROUTE, Route("x", "bob"), "bob", BOB)  # registry works again
