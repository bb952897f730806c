"""verify_and_anchor: tampering, authors and key versions, equivocation, gaps, orphans."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest

from pqcnet.crypto.pqc import SigningKey
from pqcnet.qsdag import (
    AttestationRejected,
    BadSignature,
    Equivocation,
    InvalidPayload,
    KeyVersionMismatch,
    Ledger,
    MalformedVertex,
    OpaqueRecord,
    OrphanPoolFull,
    PolicyAnchor,
    Rejection,
    Route,
    TimestampSkew,
    UnknownAuthor,
    VertexKind,
    VertexParked,
    build_attestation,
    decode,
    verify_evidence,
)
from pqcnet.qsdag.attestation import Measurements
from pqcnet.qsdag.payloads import encode_payload
from tests.qsdag.conftest import ALICE, BOB, GOV, World

pytestmark = pytest.mark.timeout(120)


def route(topic: str = "t") -> Route:
    return Route(topic, "alice", priority=1)


def test_append_returns_receipt_and_updates_tips(world: World) -> None:
    ledger = world.ledger
    before = len(ledger)
    r = ledger.append(VertexKind.ROUTE, route(), "alice", ALICE)
    assert r.position == before and r.depth == 3
    assert ledger.tips() == [r.id]
    assert ledger.get(r.id).author == "alice"
    assert ledger.views.routing.get("t")["shard_owner"] == "alice"  # type: ignore[index]
    # anchoring the same vertex again is idempotent
    assert ledger.verify_and_anchor(ledger.get(r.id)).position == r.position


def test_every_tampered_byte_is_rejected_and_nothing_new_is_anchored(world: World) -> None:
    ledger = world.ledger
    v = ledger.build_vertex("alice", ALICE, VertexKind.ROUTE, route())
    wire = bytearray(v.encode())
    before = set(ledger.ids())
    outcomes: dict[str, int] = {}
    for i in range(len(wire)):
        bad = bytearray(wire)
        bad[i] ^= 0x01
        try:
            tampered = decode(bytes(bad))
        except MalformedVertex:
            outcomes["malformed"] = outcomes.get("malformed", 0) + 1
            continue
        if tampered == v:  # flip landed in a byte protobuf ignores: same vertex
            continue
        with pytest.raises(Rejection) as info:
            ledger.verify_and_anchor(tampered)
        name = type(info.value).__name__
        outcomes[name] = outcomes.get(name, 0) + 1
    assert set(ledger.ids()) == before and ledger.orphan_count == 0
    assert outcomes.get("BadSignature", 0) > 3000  # the signature and signed fields
    assert ledger.verify_and_anchor(v).id == v.id  # the untouched vertex is fine


@pytest.mark.parametrize("field", ["payload", "parents", "counter", "signature"])
def test_tampered_field_rejected(world: World, field: str) -> None:
    ledger = world.ledger
    other = ledger.append(VertexKind.ROUTE, route("x"), "bob", BOB)
    v = ledger.build_vertex("alice", ALICE, VertexKind.ROUTE, route())
    changes = {
        "payload": encode_payload(route("other")),
        "parents": tuple(sorted({*v.parents, ledger.genesis_id or b""})),
        "counter": v.counter + 1,
        "signature": bytes([v.signature[0] ^ 1]) + v.signature[1:],
    }
    assert other.id in v.parents
    with pytest.raises(BadSignature):
        ledger.verify_and_anchor(replace(v, **{field: changes[field]}))
    assert ledger.orphan_count == 0


def test_unknown_author_and_key_version_mismatch(world: World) -> None:
    ledger = world.ledger
    mallory = SigningKey.generate()
    with pytest.raises(UnknownAuthor):
        ledger.append(VertexKind.ROUTE, route(), "mallory", mallory)
    with pytest.raises(BadSignature):  # alice's name, mallory's key
        ledger.append(VertexKind.ROUTE, route(), "alice", mallory)
    v = ledger.build_vertex("alice", ALICE, VertexKind.ROUTE, route(), key_version=2)
    with pytest.raises(KeyVersionMismatch):
        ledger.verify_and_anchor(v)


def test_key_rotation_old_version_refused_after(world: World) -> None:
    ledger = world.ledger
    new = SigningKey.generate()
    ledger.rotate_key("alice", ALICE, new.public_key)
    assert ledger.views.key_versions.current("alice") == 2
    assert [e.record.key_version for e in ledger.views.key_versions.history("alice")] == [1, 2]
    old = ledger.build_vertex("alice", ALICE, VertexKind.ROUTE, route(), key_version=1)
    with pytest.raises(KeyVersionMismatch):
        ledger.verify_and_anchor(old)
    ledger.append(VertexKind.ROUTE, route(), "alice", new)
    # bob may not register keys for alice
    with pytest.raises(InvalidPayload):
        ledger.register_author("alice", SigningKey.generate().public_key, registrar="bob",
                               signer=BOB)
    assert ledger.verify().ok


def test_equivocation_produces_verifiable_evidence_that_can_be_anchored(world: World) -> None:
    ledger = world.ledger
    a1 = ledger.build_vertex("alice", ALICE, VertexKind.ROUTE, route("one"))
    a2 = ledger.build_vertex("alice", ALICE, VertexKind.ROUTE, route("two"))
    assert a1.counter == a2.counter
    ledger.verify_and_anchor(a1)
    with pytest.raises(Equivocation) as info:
        ledger.verify_and_anchor(a2)
    ev = info.value.evidence
    assert {ev.first.id, ev.second.id} == {a1.id, a2.id} and ev.offender == "alice"
    verify_evidence(ev, ledger.key_for)
    assert ledger.evidence() == [ev]
    receipt = ledger.report_evidence(ev, "bob", BOB)
    assert ledger.get(receipt.id).kind == VertexKind.SLASHING_EVIDENCE
    # forged evidence (a vertex not signed by alice) is refused as a payload
    forged = replace(ev, second=replace(ev.second, signature=ev.first.signature))
    with pytest.raises(InvalidPayload):
        ledger.report_evidence(forged, "bob", BOB)


def test_counter_going_backwards_is_equivocation(world: World) -> None:
    ledger = world.ledger
    first = ledger.append(VertexKind.ROUTE, route("a"), "alice", ALICE)
    ledger.append(VertexKind.ROUTE, route("b"), "alice", ALICE)
    old_counter = ledger.get(first.id).counter
    back = ledger.build_vertex("alice", ALICE, VertexKind.ROUTE, route("c"), counter=old_counter)
    with pytest.raises(Equivocation) as info:
        ledger.verify_and_anchor(back)
    assert info.value.evidence.reason == "counter went backwards"


def test_counter_gap_parks_until_the_gap_fills(world: World) -> None:
    ledger = world.ledger
    c0 = ledger.build_vertex("alice", ALICE, VertexKind.ROUTE, route("a"))
    c1 = ledger.build_vertex("alice", ALICE, VertexKind.ROUTE, route("b"),
                             counter=c0.counter + 1)
    with pytest.raises(VertexParked) as info:
        ledger.verify_and_anchor(c1)
    assert info.value.waiting_counter == c0.counter
    assert not ledger.has(c1.id) and ledger.orphan_count == 1
    receipt = ledger.verify_and_anchor(c0)
    assert [r.id for r in receipt.released] == [c1.id]
    assert ledger.has(c1.id) and ledger.orphan_count == 0


def test_missing_parents_park_bounded_and_survive_reopen(tmp_path: Path) -> None:
    from tests.qsdag.conftest import make_ledger

    src = make_ledger(tmp_path / "src")
    chain = [src.append(VertexKind.ROUTE, route(str(i)), "alice", ALICE).id for i in range(4)]
    dst_path = tmp_path / "dst"
    dst = Ledger.open(dst_path, max_orphans=2)
    for vid in src.ids()[:3]:  # genesis + key registrations
        dst.verify_and_anchor(src.get(vid))
    with pytest.raises(VertexParked):
        dst.verify_and_anchor(src.get(chain[3]))
    with pytest.raises(VertexParked):
        dst.verify_and_anchor(src.get(chain[2]))
    with pytest.raises(OrphanPoolFull):
        dst.verify_and_anchor(src.get(chain[1]))
    dst.close()
    dst = Ledger.open(dst_path, max_orphans=2)
    assert dst.orphan_count == 2
    dst.verify_and_anchor(src.get(chain[0]))
    receipt = dst.verify_and_anchor(src.get(chain[1]))
    assert {r.id for r in receipt.released} == {chain[2], chain[3]}
    assert set(dst.ids()) == set(src.ids()) and dst.orphan_count == 0
    assert dst.verify().ok
    src.close()
    dst.close()


def test_timestamp_skew(tmp_path: Path) -> None:
    from tests.qsdag.conftest import make_ledger

    ledger = make_ledger(tmp_path / "l", skew=5.0)
    now = int(time.time() * 1000)
    future = ledger.build_vertex("alice", ALICE, VertexKind.ROUTE, route(),
                                 timestamp_ms=now + 60_000)
    with pytest.raises(TimestampSkew):
        ledger.verify_and_anchor(future)
    past = ledger.build_vertex("alice", ALICE, VertexKind.ROUTE, route(),
                               timestamp_ms=now - 3_600_000)
    with pytest.raises(TimestampSkew):  # older than its parents
        ledger.verify_and_anchor(past)
    ledger.close()


def test_payload_schema_per_kind(world: World) -> None:
    ledger = world.ledger
    with pytest.raises(InvalidPayload):  # a route is not a policy anchor
        ledger.append(VertexKind.POLICY_ANCHOR, route(), "alice", ALICE)
    with pytest.raises(InvalidPayload):
        ledger.append(VertexKind.POLICY_ANCHOR, PolicyAnchor(b"short", "t", 1), "alice", ALICE)
    with pytest.raises(InvalidPayload):
        ledger.append(VertexKind.VOLUME_PROOF, OpaqueRecord("", "alice", b"x"), "alice", ALICE)
    with pytest.raises(InvalidPayload):  # explicit default field: not canonical
        ledger.append(VertexKind.ROUTE, encode_payload(route()) + b"\x18\x00", "alice", ALICE)
    with pytest.raises(InvalidPayload):  # unknown field
        ledger.append(VertexKind.ROUTE, encode_payload(route()) + b"\x78\x01", "alice", ALICE)
    ok = ledger.append(VertexKind.POLICY_ANCHOR, PolicyAnchor(b"\x07" * 32, "acme", 5),
                       "alice", ALICE)
    assert ledger.views.policy_anchors.get(b"\x07" * 32)["vertex"] == ok.id.hex()  # type: ignore[index]


def test_attestation_vertex_checks_signature_and_counter(world: World) -> None:
    ledger = world.ledger
    m = Measurements(b"\x01" * 32, "sha256:abc", b"\x02" * 32)
    ev = build_attestation("alice", "sentry", ALICE, 1, b"", measurements=m)
    ledger.append(VertexKind.ATTESTATION, ev, "alice", ALICE)
    assert ledger.views.attestations.last_counter("alice") == 1
    assert ledger.views.relay.get("alice")["attestations"] == [ev.digest.hex()]
    with pytest.raises(AttestationRejected):  # counter must increase
        ledger.append(VertexKind.ATTESTATION, build_attestation(
            "alice", "sentry", ALICE, 1, b"", measurements=m), "alice", ALICE)
    with pytest.raises(AttestationRejected):  # event signed by someone else
        ledger.append(VertexKind.ATTESTATION, build_attestation(
            "alice", "sentry", BOB, 2, b"", measurements=m), "alice", ALICE)
    with pytest.raises(AttestationRejected):  # bob cannot post alice's attestation
        ledger.append(VertexKind.ATTESTATION, build_attestation(
            "alice", "sentry", ALICE, 3, b"", measurements=m), "bob", BOB)


def test_open_enrolment_only_when_genesis_allows(tmp_path: Path) -> None:
    closed = Ledger.open(tmp_path / "closed")
    closed.init_genesis("n", "gov", GOV)
    with pytest.raises(UnknownAuthor):
        closed.enrol("carol", SigningKey.generate())
    opened = Ledger.open(tmp_path / "open")
    opened.init_genesis("n", "gov", GOV, open_enrolment=True)
    carol = SigningKey.generate()
    opened.enrol("carol", carol)
    opened.append(VertexKind.ROUTE, route(), "carol", carol)
    assert opened.verify().ok
    closed.close()
    opened.close()
