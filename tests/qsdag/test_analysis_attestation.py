"""networkx audit export; attestation measurement and allow-list policy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pqcnet.qsdag import (
    AttestationRejected,
    MeasurementPolicy,
    Route,
    VertexKind,
    build_attestation,
    measure,
    package_hash,
    verify_attestation,
)
from pqcnet.qsdag.analysis import (
    ancestry,
    confirmation_depth,
    is_acyclic,
    to_graph,
    topological_order,
    write_graph,
)
from pqcnet.qsdag.attestation import installed_root, package_files
from tests.qsdag.conftest import ALICE, BOB, GOV, World

pytestmark = pytest.mark.timeout(120)


def test_graph_export_order_ancestry_confirmation(world: World, tmp_path: Path) -> None:
    ledger = world.ledger
    a = ledger.append(VertexKind.ROUTE, Route("a", "alice"), "alice", ALICE)
    b = ledger.append(VertexKind.ROUTE, Route("b", "bob"), "bob", BOB)
    g = to_graph(ledger)
    assert is_acyclic(g) and g.number_of_nodes() == len(ledger)
    order = topological_order(g)
    assert order == [vid.hex() for vid in ledger.ids()]
    gid = (ledger.genesis_id or b"").hex()
    assert ancestry(g, b.id.hex()) == {vid.hex() for vid in ledger.ids()} - {b.id.hex()}
    assert confirmation_depth(g, gid) == 2  # alice and bob built on gov's genesis
    assert confirmation_depth(g, a.id.hex()) == 1  # only bob, after it
    assert confirmation_depth(g, b.id.hex()) == 0
    assert write_graph(g, tmp_path / "g.json") == "json"
    data = json.loads((tmp_path / "g.json").read_text())
    assert len(data["nodes"]) == len(ledger)
    assert write_graph(g, tmp_path / "g.graphml") == "graphml"
    g.add_edge(b.id.hex(), gid)  # a cycle is noticed
    assert not is_acyclic(g)


def test_measurement_is_deterministic_and_covers_the_whole_package(
        monkeypatch: pytest.MonkeyPatch) -> None:
    files = [rel for rel, _ in package_files()]
    assert files == sorted(files)
    assert all(f.startswith("pqcnet/") for f in files)
    subpackages = {f.split("/")[1] for f in files if f.count("/") >= 2}
    assert subpackages >= {"qstp", "qsdag", "layer0", "mesh", "relayer", "sentry", "crypto",
                           "identity", "proto", "runtime", "cli"}
    assert any(f.endswith("_pb2.py") for f in files)  # generated code is measured too
    assert not any("__pycache__" in f for f in files)
    monkeypatch.setenv("PQCNET_IMAGE_DIGEST", "sha256:" + "ab" * 32)
    m1, m2 = measure(b"cfg"), measure(b"cfg")
    assert m1 == m2 and m1.image_digest == "sha256:" + "ab" * 32
    assert measure(b"other").config_hash != m1.config_hash


def test_measurement_sees_a_changed_generated_protobuf_file(tmp_path: Path) -> None:
    """A copy of the installed package measures the same; one edited _pb2 file changes it."""
    copy = tmp_path / "pqcnet"
    shutil.copytree(installed_root(), copy,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    assert package_hash(copy) == package_hash()
    target = copy / "proto" / "relayer_pb2.py"
    target.write_bytes(target.read_bytes() + b"\n# tampered\n")
    assert package_hash(copy) != package_hash()


def test_attestation_policy_allow_list() -> None:
    event = build_attestation("alice", "sentry", ALICE, 7, b"cfg", quote=b"tpm-quote")
    m = event.measurements
    good = MeasurementPolicy(frozenset({m.package_hash}), frozenset({m.config_hash}),
                             roles=frozenset({"sentry"}), require_quote=True)
    verify_attestation(event, ALICE.public_key, good)
    bad_cases = [
        (MeasurementPolicy(frozenset({b"\x00" * 32})), ALICE),
        (MeasurementPolicy(frozenset({m.package_hash}), frozenset({b"\x00" * 32})), ALICE),
        (MeasurementPolicy(frozenset({m.package_hash}), image_digests=frozenset({"x"})), ALICE),
        (MeasurementPolicy(frozenset({m.package_hash}), roles=frozenset({"relayer"})), ALICE),
        (good, GOV),  # wrong key
    ]
    for policy, key in bad_cases:
        with pytest.raises(AttestationRejected):
            verify_attestation(event, key.public_key, policy)
    no_quote = build_attestation("alice", "sentry", ALICE, 8, b"cfg", measurements=m)
    with pytest.raises(AttestationRejected):
        verify_attestation(no_quote, ALICE.public_key, good)
