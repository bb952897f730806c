"""Parallel signature checks: the same ledger as the serial path, never a different one.

Every test imports/audits the same input twice — serially and with a
:class:`ParallelVerifier` — and compares everything observable: what was anchored,
in which order, the tips, the parked and rejected vertices with their errors, the
audit report. The input mixes what a hostile or out-of-order peer sends: keys
registered and rotated inside the batch, shuffled order (orphans), a forged
signature, an equivocation, garbage bytes and duplicates.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from pqcnet.crypto.pqc import SigningKey
from pqcnet.qsdag import ImportReport, Ledger, Route, Vertex, VertexKind
from pqcnet.qsdag.parallel import ParallelVerifier, VerifierConfigError, prepare_import, proven
from tests.qsdag.conftest import ALICE, BOB, GOV, make_ledger

pytestmark = pytest.mark.timeout(180)
CAROL = SigningKey.from_seed(b"c" * 32)
ALICE2 = SigningKey.from_seed(b"A" * 32)


def _history(path: Path) -> tuple[list[Vertex], list[Vertex]]:
    """A source ledger's whole history, plus hostile extras a peer might add."""
    src = make_ledger(path)
    for i in range(4):
        src.append(VertexKind.ROUTE, Route(f"a{i}", "alice"), "alice", ALICE)
        src.append(VertexKind.ROUTE, Route(f"b{i}", "bob"), "bob", BOB)
    src.register_author("carol", CAROL.public_key, registrar="gov", signer=GOV)
    src.rotate_key("alice", ALICE, ALICE2.public_key)
    for i in range(4):
        src.append(VertexKind.ROUTE, Route(f"c{i}", "carol"), "carol", CAROL)
        src.append(VertexKind.ROUTE, Route(f"a2-{i}", "alice"), "alice", ALICE2)
    history = src.export(src.tips())
    forged = src.build_vertex("bob", BOB, VertexKind.ROUTE, Route("forged", "bob"))
    forged = replace(forged, signature=BOB.sign(b"something else"))
    twin = src.build_vertex("carol", CAROL, VertexKind.ROUTE, Route("twin", "carol"),
                            counter=src.next_counter("carol") - 1)  # equivocation
    stale = src.build_vertex("alice", ALICE, VertexKind.ROUTE, Route("old-key", "alice"),
                             key_version=1)  # signed with the rotated-out key
    src.close()
    return history, [forged, twin, stale]


def _stream(history: list[Vertex], extras: list[Vertex], seed: int) -> list[Vertex | bytes]:
    items: list[Vertex | bytes] = [*history, *extras, history[3], b"\x00garbage"]
    random.Random(seed).shuffle(items[1:])  # genesis first, everything else in any order
    return [v.encode() if isinstance(v, Vertex) and i % 3 == 0 else v
            for i, v in enumerate(items)]


def _outcome(ledger: Ledger, report: ImportReport) -> dict[str, object]:
    return {
        "ids": ledger.ids(), "tips": sorted(ledger.tips()), "len": len(ledger),
        "anchored": report.anchored, "duplicates": report.duplicates,
        "parked": report.parked, "orphans": ledger.orphan_count,
        "rejected": [(vid, type(e).__name__, str(e)) for vid, e in report.rejected],
        "evidence": [e.digest for e in ledger.evidence()],
        "audit": ledger.verify().invalid,
    }


def _import(path: Path, items: list[Vertex | bytes],
            verifier: ParallelVerifier | None) -> dict[str, object]:
    ledger = Ledger.open(path, verifier=verifier)
    try:
        return _outcome(ledger, ledger.import_(items))
    finally:
        ledger.close()


@pytest.mark.parametrize(("seed", "chunk", "lookahead"), [(1, 256, 2048), (2, 3, 7), (3, 1, 1)])
def test_threaded_import_equals_serial_import(tmp_path: Path, seed: int, chunk: int,
                                              lookahead: int) -> None:
    history, extras = _history(tmp_path / "src")
    items = _stream(history, extras, seed)
    serial = _import(tmp_path / "serial", items, None)
    with ParallelVerifier(2, mode="thread", chunk=chunk, lookahead=lookahead) as verifier:
        par = _import(tmp_path / "par", items, verifier)
    assert par == serial
    # the input really exercised the rules: forged, equivocating, stale-key and
    # undecodable vertices rejected, a duplicate seen, everything honest anchored
    kinds = sorted(k for _, k, _ in serial["rejected"])  # type: ignore[attr-defined]
    assert kinds == ["BadSignature", "Equivocation", "KeyVersionMismatch", "MalformedVertex"]
    assert serial["len"] == len(history) and serial["duplicates"] and not serial["audit"]


def test_process_pool_import_equals_serial_import(tmp_path: Path) -> None:
    history, extras = _history(tmp_path / "src")
    items = _stream(history, extras, 4)
    serial = _import(tmp_path / "serial", items, None)
    with ParallelVerifier(2, mode="process", chunk=5, lookahead=12) as verifier:
        assert _import(tmp_path / "par", items, verifier) == serial


def test_workers_prove_valid_signatures_and_only_those(tmp_path: Path) -> None:
    history, extras = _history(tmp_path / "src")
    forged = extras[0]
    ledger = make_ledger(tmp_path / "l")  # knows gov, alice v1, bob
    seen: list[Vertex | bytes] = []
    with ParallelVerifier(2, mode="thread") as verifier, \
            verifier.ahead([*history, forged, b"junk"], prepare_import,
                           ledger.key_for) as stream:
        for item in stream:
            seen.append(item)
            if not isinstance(item, Vertex) or item.author != "bob":
                continue
            key = ledger.key_for("bob", 1)
            assert key is not None
            assert proven(key, item) is (item is not forged)
    # order kept, bytes that do not decode passed through for the importer to report
    assert seen[:len(history)] == history and seen[-1] == b"junk"
    assert not proven(GOV.public_key, history[0])  # outside a session nothing is proven
    ledger.close()


def test_parallel_audit_equals_serial_audit_on_a_damaged_ledger(tmp_path: Path) -> None:
    history, _ = _history(tmp_path / "src")
    ledger = Ledger.open(tmp_path / "l")
    assert not ledger.import_(history).rejected
    victim = history[7].id
    ledger._store.raw_put("vertices", victim, os.urandom(64))  # storage damage
    serial = ledger.verify()
    ledger.close()
    with ParallelVerifier(2, mode="thread", chunk=4, lookahead=9) as verifier:
        ledger = Ledger.open(tmp_path / "l", verifier=verifier)
        par = ledger.verify()
        ledger.close()
    assert par == serial and serial.checked == len(history)
    assert serial.invalid[0][0] == victim.hex()


def test_bad_settings_are_typed_errors() -> None:
    with pytest.raises(VerifierConfigError):
        ParallelVerifier(0)
    with pytest.raises(VerifierConfigError):
        ParallelVerifier(2, mode="fibers")  # type: ignore[arg-type]
    with pytest.raises(VerifierConfigError):
        ParallelVerifier(2, chunk=10, lookahead=5)


def _gil_released_during(op: Callable[[], object], calls: int = 40) -> bool:
    """Does another thread get to run while ``op`` runs? No timing involved: with the
    switch interval far longer than the test, a waiting thread can only take the GIL
    when ``op`` itself releases it."""
    done = 0
    ran_after: list[int] = []
    go = threading.Event()

    def other() -> None:
        go.wait()
        ran_after.append(done)

    t = threading.Thread(target=other)
    t.start()
    old = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    try:
        go.set()
        for _ in range(calls):
            op()
            done += 1
    finally:
        sys.setswitchinterval(old)
    t.join()
    return ran_after[0] < calls


def test_mldsa_verify_releases_the_gil() -> None:
    """Why threads can verify side by side at all (parallel.py's docstring)."""
    key = SigningKey.from_seed(b"v" * 32)
    msg = os.urandom(600)
    sig = key.sign(msg, context=b"ctx")
    pub = key.public_key
    assert _gil_released_during(lambda: pub.verify(sig, msg, context=b"ctx"))
    # control: the probe does see an operation that keeps the GIL
    assert not _gil_released_during(lambda: hashlib.sha256(msg).digest())
