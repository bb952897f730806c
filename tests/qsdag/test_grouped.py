"""Grouped writes in bulk import: faster, and exactly as consistent as one write per vertex.

``Ledger.import_`` groups the RocksDB writes of up to ``GROUP_BATCHES`` anchored
vertices into one ``WriteBatch`` (:meth:`pqcnet.qsdag.store.Store.grouped`). What must
hold, and is checked here against real RocksDB and a real SIGKILL:

* a process killed mid-import (its peer stalled mid-group) leaves a *prefix* of the
  anchoring order on disk — the written groups — each vertex complete (audit clean,
  tips/heads/positions consistent), and re-importing the same stream completes it to
  exactly the ledger an uninterrupted import gives;
* a failed grouped write (a real IO error) leaves the ledger object equal to the store;
* an import whose input fails mid-stream keeps (durably) what it anchored before;
* grouped and ungrouped imports of a hostile, shuffled stream — orphans released across
  group boundaries, forged/equivocating/stale-key vertices, garbage bytes, duplicates —
  give the same ledger, in memory and after reopening.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pqcnet.qsdag import Ledger, LedgerStateError, OpaqueRecord, Vertex, VertexKind, sync
from pqcnet.qsdag.store import GROUP_BATCHES, Store
from tests.conftest import ROOT
from tests.qsdag.conftest import ALICE, BOB, make_ledger
from tests.qsdag.test_parallel import _history, _outcome, _stream

pytestmark = pytest.mark.timeout(300)


def _peer(tmp_path: Path, n: int) -> tuple[Path, list[Vertex]]:
    """A ledger with just the bootstrap (genesis, alice, bob), and ``n`` more vertices
    a peer anchored on the same bootstrap, in the peer's anchoring order."""
    base = tmp_path / "base"
    make_ledger(base).close()
    shutil.copytree(base, tmp_path / "peer")
    peer = Ledger.open(tmp_path / "peer")
    boot = len(peer)
    for i in range(n):
        author, key = ("alice", ALICE) if i % 2 else ("bob", BOB)
        peer.append(VertexKind.VOLUME_PROOF,
                    OpaqueRecord("test.Volume", author, i.to_bytes(8, "big") * 8), author, key)
    vertices = [peer.get(vid) for vid in peer.ids()[boot:]]
    peer.close()
    return base, vertices


def _state(ledger: Ledger) -> dict[str, object]:
    return {"ids": ledger.ids(), "tips": sorted(ledger.tips()), "len": len(ledger),
            "alice": ledger.next_counter("alice"), "bob": ledger.next_counter("bob"),
            "orphans": ledger.orphan_count}


def _frames(path: Path, vertices: list[Vertex]) -> Path:
    path.write_bytes(b"".join(struct.pack(">I", len(raw)) + raw
                              for raw in (v.encode() for v in vertices)))
    return path


def _child(module: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", f"tests.qsdag.{module}", *map(str, args)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_sigkill_mid_import_leaves_a_consistent_prefix(tmp_path: Path) -> None:
    total = 1200
    base, vertices = _peer(tmp_path, total)
    frames = _frames(tmp_path / "frames", vertices)
    with Ledger.open(base) as boot:
        boot_ids = boot.ids()
    stall = GROUP_BATCHES + 44  # one group written, 44 vertices anchored in the next
    proc = _child("crash_importer", base, frames, stall)
    assert proc.stdout is not None
    for line in proc.stdout:
        assert line.strip() != "done", "the import finished before it could be killed"
        if int(line) == stall:
            break  # the peer stalls before frame `stall`: anchoring is mid-group
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    ledger = Ledger.open(base)
    report = ledger.verify()
    assert report.ok, report.invalid
    anchored = ledger.ids()[len(boot_ids):]
    n = len(anchored)
    # a prefix of the anchoring order, in whole groups: the 44 anchored in the
    # unwritten group are lost, nothing else
    assert n == GROUP_BATCHES
    assert ledger.ids()[:len(boot_ids)] == boot_ids
    assert anchored == [v.id for v in vertices[:n]]
    assert ledger.tips() == [anchored[-1]]
    last = {v.author: v.counter for v in vertices[:n]}
    assert ledger.next_counter("alice") == last["alice"] + 1
    assert ledger.next_counter("bob") == last["bob"] + 1
    assert ledger.orphan_count == 0
    # importing the same stream again completes it: the lost tail, nothing twice
    again = ledger.import_([v.encode() for v in vertices])
    assert again.duplicates == anchored and len(again.anchored) == total - n
    assert not again.rejected and not again.parked
    assert ledger.ids()[len(boot_ids):] == [v.id for v in vertices]
    assert ledger.verify().ok
    ledger.close()


def test_failed_grouped_write_leaves_the_ledger_as_on_disk(tmp_path: Path) -> None:
    """A real write error (RLIMIT_FSIZE stops the WAL mid-import): the import raises
    LedgerStateError, and what the ledger object then reports — length, ids, tips,
    author counters, orphans — is exactly what reopening the store shows."""
    base, vertices = _peer(tmp_path, 700)
    frames = _frames(tmp_path / "frames", vertices)
    wal = max(f.stat().st_size for f in base.glob("*.log"))
    proc = _child("fsize_importer", base, frames, wal + 1_500_000)  # ~1.5 groups fit
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0
    seen = json.loads(out)
    assert seen["error"] and "failed" in seen["error"]
    reopened = Ledger.open(base)
    on_disk = {"error": seen["error"], "ids": [v.hex() for v in reopened.ids()],
               "tips": sorted(t.hex() for t in reopened.tips()), "len": len(reopened),
               "alice": reopened.next_counter("alice"), "bob": reopened.next_counter("bob"),
               "orphans": reopened.orphan_count}
    assert seen == on_disk
    assert 3 + GROUP_BATCHES <= seen["len"] < 3 + len(vertices)  # one group written, not all
    assert reopened.verify().ok
    reopened.close()


def test_input_failing_mid_import_keeps_what_was_anchored(tmp_path: Path) -> None:
    base, vertices = _peer(tmp_path, 40)
    ledger = Ledger.open(base)
    forged = vertices[30].encode()
    forged = forged[:-10] + bytes(10)  # signature bytes damaged: BadSignature

    def stream() -> Iterator[Vertex | bytes]:
        yield from vertices[:20]
        yield b"\x00garbage"
        yield vertices[5]  # duplicate
        yield forged
        raise ConnectionResetError("peer went away")

    with pytest.raises(ConnectionResetError):
        ledger.import_(stream())
    in_memory = _state(ledger)
    assert in_memory["len"] == 3 + 20
    assert in_memory["tips"] == [vertices[19].id]
    ledger.close()
    reopened = Ledger.open(base)
    assert _state(reopened) == in_memory
    assert reopened.verify().ok
    # the ledger goes on from there
    rest = reopened.import_(vertices[20:])
    assert len(rest.anchored) == 20 and not rest.rejected
    reopened.close()


@pytest.mark.parametrize("group", [1, 2, 5, GROUP_BATCHES])
def test_grouped_import_equals_ungrouped_import(tmp_path: Path, group: int) -> None:
    history, extras = _history(tmp_path / "src")
    items = _stream(history, extras, 7)
    outcomes = []
    for name, grouped in (("plain", False), ("grouped", True)):
        ledger = Ledger.open(tmp_path / name)
        if grouped:
            with ledger._store.grouped(max_batches=group):
                report = sync.import_(ledger, items)
        else:
            report = sync.import_(ledger, items)
        outcome = _outcome(ledger, report)
        ledger.close()
        reopened = Ledger.open(tmp_path / name)
        outcomes.append((outcome, _state_of(reopened)))
        reopened.close()
    assert outcomes[0] == outcomes[1]
    plain = outcomes[0][0]
    assert plain["parked"] == [] and plain["len"] == len(history)  # orphans all released
    assert len(plain["rejected"]) == 4  # type: ignore[arg-type]


def _state_of(ledger: Ledger) -> dict[str, object]:
    return {"ids": ledger.ids(), "tips": sorted(ledger.tips()),
            "evidence": [e.digest for e in ledger.evidence()],
            "orphans": ledger.orphan_count, "audit": ledger.verify().invalid}


def test_store_group_reads_its_own_writes_and_writes_them_on_exit(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    with store.grouped(max_batches=3):
        for i in range(5):
            batch = store.batch()
            batch.put("meta", b"k%d" % i, b"v%d" % i)
            if i:
                batch.delete("meta", b"k%d" % (i - 1))
            store.commit(batch)
            assert store.get("meta", b"k%d" % i) == b"v%d" % i
            assert store.has("meta", b"k%d" % i)
            assert not i or not store.has("meta", b"k%d" % (i - 1))
        assert list(store.keys("meta")) == [b"k4"]  # ordered reads see the group too
        with pytest.raises(LedgerStateError), store.grouped():
            pass  # not reentrant
    store.close()
    store = Store(tmp_path / "db")
    assert list(store.items("meta")) == [(b"k4", b"v4")]
    assert store.raw_get("meta", b"k4") != b"v4"  # stored with its checksum
    with pytest.raises(LedgerStateError), store.grouped(max_batches=0):
        pass
    store.close()
