"""Slashing in the ledger: ancestry ordering, lifting, persistence and replicas."""

from __future__ import annotations

from pathlib import Path

import pytest

from pqcnet.crypto.pqc import SigningKey
from pqcnet.qsdag import (
    AuthorSlashed,
    InvalidPayload,
    KeyRecord,
    Ledger,
    OpaqueRecord,
    Route,
    UnknownAuthor,
    VertexKind,
    build_attestation,
)
from pqcnet.qsdag.attestation import Measurements
from pqcnet.qsdag.slashing import SLASH_CONTENT_TYPE, SlashNotice
from pqcnet.qsdag.sync import pull
from tests.qsdag.conftest import ALICE, BOB, GOV, World, make_ledger

pytestmark = pytest.mark.timeout(120)

ALICE2 = SigningKey.from_seed(b"A" * 32)
M = Measurements(b"\x01" * 32, "sha256:abc", b"\x02" * 32)


def route(topic: str = "t", owner: str = "alice") -> Route:
    return Route(topic, owner)


def reattest(ledger: Ledger, signer: SigningKey, version: int, counter: int) -> bytes:
    ev = build_attestation("alice", "relayer", signer, counter, b"", key_version=version,
                           measurements=M)
    return ledger.append(VertexKind.ATTESTATION, ev, "alice", signer).id


def test_slash_refuses_descendants_and_keeps_earlier_vertices(world: World) -> None:
    ledger = world.ledger
    before = ledger.append(VertexKind.ROUTE, route("a"), "alice", ALICE)
    # a vertex alice signed before seeing the slash: its parents do not include it
    concurrent = ledger.build_vertex("alice", ALICE, VertexKind.ROUTE, route("c"))
    assert not ledger.is_slashed("alice")
    s = ledger.slash("alice", "equivocation", "gov", GOV)
    assert ledger.is_slashed("alice") and not ledger.is_slashed("bob")
    assert ledger.has(before.id) and ledger.verify().ok
    with pytest.raises(AuthorSlashed) as exc:
        ledger.append(VertexKind.ROUTE, route("b"), "alice", ALICE)
    assert exc.value.slash_ids == (s.id,) and exc.value.author == "alice"
    # ordering is by ancestry: the concurrent vertex is accepted (on every replica)
    assert ledger.verify_and_anchor(concurrent).id == concurrent.id
    # ... but nothing of alice built on the current tips
    n = len(ledger)
    with pytest.raises(AuthorSlashed):
        ledger.rotate_key("alice", ALICE, ALICE2.public_key)  # no self-rotation out of it
    assert len(ledger) == n
    # other authors are unaffected
    ledger.append(VertexKind.ROUTE, route("x", "bob"), "bob", BOB)
    row = ledger.views.slashes.get("alice")
    assert row["slashed"] and row["slashes"][0]["reason"] == "equivocation"
    assert row["slashes"][0]["key_version"] == 1 and row["slashes"][0]["authority"] == "gov"


def test_lift_needs_registrar_reregistration_and_reattestation(world: World) -> None:
    ledger = world.ledger
    s = ledger.slash("alice", "counter regression", "gov", GOV)
    # re-attesting with the disabled key does not lift
    with pytest.raises(AuthorSlashed):
        reattest(ledger, ALICE, 1, 1)
    ledger.register_author("alice", ALICE2.public_key, registrar="gov", signer=GOV)
    assert ledger.is_slashed("alice")
    # re-registered but not yet re-attested: ordinary vertices still refused
    with pytest.raises(AuthorSlashed):
        ledger.append(VertexKind.ROUTE, route(), "alice", ALICE2)
    lift = reattest(ledger, ALICE2, 2, 1)
    assert not ledger.is_slashed("alice")
    assert ledger.views.slashes.get("alice")["slashes"][0]["lifted_by"] == lift.hex()
    ledger.append(VertexKind.ROUTE, route(), "alice", ALICE2)
    assert s.id in ledger.ids() and ledger.verify().ok


def test_self_rotation_before_the_slash_does_not_lift_it(world: World) -> None:
    ledger = world.ledger
    concurrent = ledger.build_vertex(
        "alice", ALICE, VertexKind.KEY_VERSION,
        KeyRecord("alice", 2, ALICE2.algorithm, ALICE2.public_key.raw))
    ledger.slash("alice", "bad measurements", "gov", GOV)
    ledger.verify_and_anchor(concurrent)  # concurrent self-rotation: accepted (ancestry rule)
    assert ledger.views.key_versions.current("alice") == 2
    with pytest.raises(AuthorSlashed):  # v2 was not registered by a registrar
        reattest(ledger, ALICE2, 2, 1)
    assert ledger.is_slashed("alice") and ledger.verify().ok


def test_only_authorities_slash_and_notices_are_validated(world: World) -> None:
    ledger = world.ledger
    with pytest.raises(InvalidPayload):
        ledger.slash("bob", "grudge", "alice", ALICE)
    forged = SlashNotice("bob", "grudge", 1).to_record()
    with pytest.raises(InvalidPayload):  # directly, as a directive
        ledger.append(VertexKind.GOVERNANCE_DIRECTIVE, forged, "alice", ALICE)
    with pytest.raises(InvalidPayload):  # subject must equal the target
        ledger.append(VertexKind.GOVERNANCE_DIRECTIVE,
                      OpaqueRecord(SLASH_CONTENT_TYPE, "alice", forged.body), "gov", GOV)
    with pytest.raises(InvalidPayload):  # body must decode
        ledger.append(VertexKind.GOVERNANCE_DIRECTIVE,
                      OpaqueRecord(SLASH_CONTENT_TYPE, "bob", b"\xff\xff"), "gov", GOV)
    with pytest.raises(InvalidPayload):  # empty reason
        ledger.slash("bob", "", "gov", GOV)
    with pytest.raises(UnknownAuthor):
        ledger.slash("nobody", "x", "gov", GOV)
    assert not ledger.is_slashed("bob")
    # other directives are untouched by the slash rules
    ledger.append(VertexKind.GOVERNANCE_DIRECTIVE,
                  OpaqueRecord("pqcnet.mesh.SignedDirective", "bob", b"d"), "alice", ALICE)


def test_slash_survives_reopen_and_rebuild_views(tmp_path: Path) -> None:
    path = tmp_path / "l"
    ledger = make_ledger(path)
    s = ledger.slash("alice", "equivocation", "gov", GOV)
    ledger.append(VertexKind.ROUTE, route("x", "bob"), "bob", BOB)
    ledger.close()
    ledger = Ledger.open(path)
    assert ledger.is_slashed("alice")
    with pytest.raises(AuthorSlashed):
        ledger.append(VertexKind.ROUTE, route(), "alice", ALICE)
    assert ledger.rebuild_views() == len(ledger)
    assert ledger.is_slashed("alice")
    with pytest.raises(AuthorSlashed):
        ledger.append(VertexKind.ROUTE, route(), "alice", ALICE)
    ledger.register_author("alice", ALICE2.public_key, registrar="gov", signer=GOV)
    lift = reattest(ledger, ALICE2, 2, 1)
    ledger.rebuild_views()
    assert not ledger.is_slashed("alice")
    assert ledger.views.slashes.get("alice")["slashes"] == [{
        "vertex": s.id.hex(), "authority": "gov", "reason": "equivocation", "key_version": 1,
        "timestamp_ms": ledger.get(s.id).timestamp_ms, "lifted_by": lift.hex()}]
    ledger.append(VertexKind.ROUTE, route(), "alice", ALICE2)
    ledger.close()


def test_replicas_agree_whatever_the_arrival_order(tmp_path: Path) -> None:
    a = make_ledger(tmp_path / "a")
    b = Ledger.open(tmp_path / "b")
    pull(b, a)
    early = a.append(VertexKind.ROUTE, route("early"), "alice", ALICE)
    concurrent = a.build_vertex("alice", ALICE, VertexKind.ROUTE, route("conc"))
    a.slash("alice", "equivocation", "gov", GOV)
    descendant = a.build_vertex("alice", ALICE, VertexKind.ROUTE, route("late"),
                                counter=concurrent.counter + 1)
    # replica a sees the slash before alice's vertices; replica b gets them reversed
    ra = a.import_([concurrent, descendant])
    rb = b.import_([descendant, concurrent, *reversed(a.export(a.tips()))])
    assert concurrent.id in ra.anchored and concurrent.id in rb.anchored
    assert [type(e) for _, e in ra.rejected] == [AuthorSlashed]
    assert all(vid != descendant.id for vid in rb.anchored)
    assert not b.has(descendant.id) and b.has(early.id) and b.orphan_count == 0
    assert set(a.ids()) == set(b.ids()) and b.is_slashed("alice")
    assert a.verify().ok and b.verify().ok
    a.close()
    b.close()


def test_slashed_orphan_is_dropped_when_released(world: World) -> None:
    ledger = world.ledger
    s = ledger.build_vertex("gov", GOV, VertexKind.GOVERNANCE_DIRECTIVE,
                            SlashNotice("alice", "x", 1).to_record())
    child = ledger.build_vertex("alice", ALICE, VertexKind.ROUTE, route(), parents=[s.id])
    report = ledger.import_([child])
    assert report.parked == [child.id]
    report = ledger.import_([s])
    assert report.anchored == [s.id] and ledger.orphan_count == 0
    assert not ledger.has(child.id)


def test_audit_replays_the_slash_rule_independently_of_views(world: World) -> None:
    ledger = world.ledger
    s = ledger.slash("alice", "equivocation", "gov", GOV)
    v = ledger.build_vertex("alice", ALICE, VertexKind.ROUTE, route("sneaked"))
    # bypass the anchoring rules, as a buggy or tampered writer would
    ledger._write(ledger._store.batch(), v, v.id, route("sneaked"),
                  ledger.receipt(s.id).depth + 1)
    report = ledger.verify()
    assert report.invalid == [(v.id.hex(), report.invalid[0][1])]
    assert report.invalid[0][1].startswith("AuthorSlashed")
