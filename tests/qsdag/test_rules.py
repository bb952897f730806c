"""The anchoring rules one by one (pqcnet.qsdag.rules), against a real ledger's state.

Each rule is called on its own with a vertex that breaks exactly it: the typed error
comes out, and the ledger is unchanged (the rules only read).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from pqcnet.qsdag import (
    AttestationRejected,
    AuthorSlashed,
    BadSignature,
    Equivocation,
    Genesis,
    InvalidPayload,
    KeyRecord,
    KeyVersionMismatch,
    Ledger,
    MalformedVertex,
    Route,
    SlashingEvidence,
    TimestampSkew,
    UnknownAuthor,
    Vertex,
    VertexKind,
    build_attestation,
    decode_payload,
    rules,
    sign_vertex,
    verify_evidence,
)
from pqcnet.qsdag.attestation import Measurements
from pqcnet.qsdag.payloads import encode_payload
from pqcnet.qsdag.slashing import SlashNotice
from tests.qsdag.conftest import ALICE, BOB, GOV, World

pytestmark = pytest.mark.timeout(120)

M = Measurements(b"\x01" * 32, "sha256:abc", b"\x02" * 32)


def route(topic: str = "t") -> Route:
    return Route(topic, "alice")


def payload(v: Vertex) -> object:
    return decode_payload(v.kind, v.payload)


@pytest.fixture
def ledger(world: World) -> Iterator[Ledger]:
    """The world's ledger; after the test, proof that no rule wrote anything."""
    before = (len(world.ledger), sorted(world.ledger.tips()), world.ledger.orphan_count,
              world.ledger.evidence())
    yield world.ledger
    assert (len(world.ledger), sorted(world.ledger.tips()), world.ledger.orphan_count,
            world.ledger.evidence()) == before


def test_future_timestamp(ledger: Ledger) -> None:
    now = ledger.now_ms()
    v = ledger.build_vertex("alice", ALICE, VertexKind.ROUTE, route(), timestamp_ms=now + 31_000)
    with pytest.raises(TimestampSkew) as info:
        rules.check_not_future(v, v.id, now_ms=now, skew_ms=30_000)
    assert info.value.vertex_id == v.id
    rules.check_not_future(v, v.id, now_ms=now + 1_000, skew_ms=30_000)  # at the edge: ok


def test_genesis_rule(tmp_path: Path, ledger: Ledger) -> None:
    second = ledger.build_vertex("gov", GOV, VertexKind.ROUTE, route())
    g = Genesis("testnet", (KeyRecord("gov", 1, GOV.algorithm, GOV.public_key.raw),))
    with pytest.raises(MalformedVertex):  # there is one already
        rules.check_genesis(ledger, second, second.id, g)
    with Ledger.open(tmp_path / "fresh") as fresh:
        by_alice = sign_vertex(ALICE, kind=VertexKind.GENESIS, author="alice", counter=0,
                               timestamp_ms=fresh.now_ms(), key_version=1, parents=(),
                               payload=encode_payload(g))
        with pytest.raises(UnknownAuthor):  # not one of its own authorities
            rules.check_genesis(fresh, by_alice, by_alice.id, g)
        forged = sign_vertex(ALICE, kind=VertexKind.GENESIS, author="gov", counter=0,
                             timestamp_ms=fresh.now_ms(), key_version=1, parents=(),
                             payload=encode_payload(g))
        with pytest.raises(BadSignature):
            rules.check_genesis(fresh, forged, forged.id, g)
        assert len(fresh) == 0


def test_equivocation_returns_evidence_signed_by_the_author(world: World) -> None:
    led = world.ledger
    first = led.append(VertexKind.ROUTE, route("a"), "alice", ALICE)
    counter = led.get(first.id).counter
    twin = led.build_vertex("alice", ALICE, VertexKind.ROUTE, route("b"), counter=counter)
    refusal = rules.equivocation(led, twin, twin.id, led.next_counter("alice"))
    assert isinstance(refusal, Equivocation) and refusal.vertex_id == twin.id
    assert refusal.evidence.reason == "equivocation"
    verify_evidence(refusal.evidence, led.key_for)
    led.append(VertexKind.ROUTE, route("c"), "alice", ALICE)
    older = led.build_vertex("alice", ALICE, VertexKind.ROUTE, route("d"), counter=counter)
    assert rules.equivocation(led, older, older.id, led.next_counter(
        "alice")).evidence.reason == "counter went backwards"
    framed = led.build_vertex("alice", BOB, VertexKind.ROUTE, route("e"), counter=counter)
    with pytest.raises(BadSignature):  # nobody frames alice with a vertex she did not sign
        rules.equivocation(led, framed, framed.id, led.next_counter("alice"))


def test_slashed_author(world: World) -> None:
    led = world.ledger
    s = led.slash("alice", "equivocation", "gov", GOV)
    v = led.build_vertex("alice", ALICE, VertexKind.ROUTE, route())
    with pytest.raises(AuthorSlashed) as info:
        rules.check_not_slashed(led, v, v.id)
    assert info.value.slash_ids == (s.id,) and info.value.author == "alice"
    bob = led.build_vertex("bob", BOB, VertexKind.ROUTE, route())
    rules.check_not_slashed(led, bob, bob.id)


def test_author_key_version_and_signature(ledger: Ledger) -> None:
    carol = ledger.build_vertex("carol", BOB, VertexKind.ROUTE, route())
    with pytest.raises(UnknownAuthor):
        rules.check_author(ledger, carol, carol.id, payload(carol))
    v2 = ledger.build_vertex("alice", ALICE, VertexKind.ROUTE, route(), key_version=2)
    with pytest.raises(KeyVersionMismatch):
        rules.check_author(ledger, v2, v2.id, payload(v2))
    forged = ledger.build_vertex("alice", BOB, VertexKind.ROUTE, route())
    with pytest.raises(BadSignature):
        rules.check_author(ledger, forged, forged.id, payload(forged))
    tampered = replace(ledger.build_vertex("alice", ALICE, VertexKind.ROUTE, route()),
                       timestamp_ms=1)
    with pytest.raises(BadSignature):
        rules.check_author(ledger, tampered, tampered.id, payload(tampered))
    ok = ledger.build_vertex("alice", ALICE, VertexKind.ROUTE, route())
    rules.check_author(ledger, ok, ok.id, payload(ok))


def test_self_enrolment_only_when_genesis_allows(ledger: Ledger) -> None:
    rec = KeyRecord("carol", 1, BOB.algorithm, BOB.public_key.raw)
    v = ledger.build_vertex("carol", BOB, VertexKind.KEY_VERSION, rec, key_version=1)
    with pytest.raises(UnknownAuthor):  # the world's genesis is closed
        rules.check_author(ledger, v, v.id, rec)


def test_causality(ledger: Ledger) -> None:
    v = ledger.build_vertex("alice", ALICE, VertexKind.ROUTE, route(), timestamp_ms=10_000)
    with pytest.raises(TimestampSkew):
        rules.check_causality(v, v.id, [5_000, 10_000 + 30_001], skew_ms=30_000)
    rules.check_causality(v, v.id, [10_000 + 30_000], skew_ms=30_000)


@pytest.mark.parametrize(("author", "rec"), [
    ("alice", KeyRecord("bob", 2, BOB.algorithm, BOB.public_key.raw)),  # not her key to set
    ("gov", KeyRecord("bob", 3, BOB.algorithm, BOB.public_key.raw)),  # versions may not skip
    ("gov", KeyRecord("carol", 1, BOB.algorithm, b"\x00" * 7)),  # not a key
], ids=["not-a-registrar", "version-skip", "bad-key"])
def test_key_registration_rights(ledger: Ledger, author: str, rec: KeyRecord) -> None:
    v = ledger.build_vertex(author, {"alice": ALICE, "gov": GOV}[author],
                            VertexKind.KEY_VERSION, rec)
    with pytest.raises(InvalidPayload):
        rules.check_kind(ledger, v, v.id, rec)


def test_attestation_rules(world: World) -> None:
    led = world.ledger
    led.append(VertexKind.ATTESTATION, build_attestation("alice", "sentry", ALICE, 5, b"",
                                                         measurements=M), "alice", ALICE)
    cases = [
        ("bob", BOB, build_attestation("alice", "sentry", ALICE, 6, b"", measurements=M)),
        ("alice", ALICE, build_attestation("alice", "sentry", BOB, 6, b"", measurements=M)),
        ("alice", ALICE, build_attestation("alice", "sentry", ALICE, 5, b"", measurements=M)),
    ]  # someone else's event; signed by another key; counter not above the last
    for author, key, ev in cases:
        v = led.build_vertex(author, key, VertexKind.ATTESTATION, ev)
        with pytest.raises(AttestationRejected):
            rules.check_kind(led, v, v.id, ev)
    ok = build_attestation("alice", "sentry", ALICE, 6, b"", measurements=M)
    v = led.build_vertex("alice", ALICE, VertexKind.ATTESTATION, ok)
    rules.check_kind(led, v, v.id, ok)


def test_evidence_and_slash_notices(ledger: Ledger) -> None:
    a = ledger.build_vertex("alice", ALICE, VertexKind.ROUTE, route("x"))
    b = ledger.build_vertex("bob", BOB, VertexKind.ROUTE, route("y"))
    bogus = SlashingEvidence.of(a, b)  # two authors: proves nothing
    v = ledger.build_vertex("bob", BOB, VertexKind.SLASHING_EVIDENCE, bogus)
    with pytest.raises(InvalidPayload):
        rules.check_kind(ledger, v, v.id, bogus)
    notice = SlashNotice("bob", "grudge", 1).to_record()
    v = ledger.build_vertex("alice", ALICE, VertexKind.GOVERNANCE_DIRECTIVE, notice)
    with pytest.raises(InvalidPayload) as info:
        rules.check_kind(ledger, v, v.id, notice)
    assert info.value.vertex_id == v.id
    v = ledger.build_vertex("gov", GOV, VertexKind.GOVERNANCE_DIRECTIVE, notice)
    rules.check_kind(ledger, v, v.id, notice)


def test_registered_by_authority(world: World) -> None:
    led = world.ledger
    assert rules.registered_by_authority(led, "alice", 1)  # gov registered it
    assert rules.registered_by_authority(led, "gov", 1)  # genesis
    led.rotate_key("alice", ALICE, BOB.public_key)
    assert not rules.registered_by_authority(led, "alice", 2)  # a self-rotation
    assert not rules.registered_by_authority(led, "nobody", 1)


def test_the_rules_in_order_through_the_facade(world: World) -> None:
    """The first failing rule wins: a future, forged vertex is refused for the time."""
    led = world.ledger
    v = led.build_vertex("alice", BOB, VertexKind.ROUTE, route(),
                         timestamp_ms=int(time.time() * 1000) + 3_600_000)
    with pytest.raises(TimestampSkew):
        led.verify_and_anchor(v)
