"""Node ids: NUL / control characters / over-long ids get a typed error at every door."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pqcnet.qsdag import (
    InvalidNodeId,
    InvalidPayload,
    KeyRecord,
    Ledger,
    MalformedVertex,
    OpaqueRecord,
    RelayRecord,
    Route,
    VertexKind,
    build_attestation,
    decode,
    decode_payload,
    encode_payload,
    sign_vertex,
)
from pqcnet.qsdag.vertex import MAX_AUTHOR, check_node_id, to_proto
from tests.qsdag.conftest import ALICE, GOV, make_ledger

pytestmark = pytest.mark.timeout(180)

BAD_CHARS = st.sampled_from(["\x00", "\x01", "\n", "\r", "\t", "\x1b", "\x7f", "\x85",
                             "\u200e", "\u202e", "\u2028", "\u2029", "\ufeff", "\ud800"])
GOOD = st.text(st.characters(codec="utf-8", exclude_categories=("C", "Z")),
               min_size=1, max_size=30)


@st.composite
def bad_ids(draw: st.DrawFn) -> str:
    """A valid id with a control/format/separator character spliced in, or too long."""
    base = draw(GOOD)
    if draw(st.booleans()):
        at = draw(st.integers(0, len(base)))
        return base[:at] + draw(BAD_CHARS) + base[at:]
    return base + "x" * (MAX_AUTHOR + 1 - len(base.encode()) + draw(st.integers(0, 5)))


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ledger]:
    led = make_ledger(tmp_path_factory.mktemp("ids") / "l")
    yield led
    led.close()


@given(st.text(max_size=200))
def test_check_node_id_accepts_exactly_printable_bounded_ids(value: str) -> None:
    try:
        ok = value.isprintable() and 1 <= len(value.encode()) <= MAX_AUTHOR
    except UnicodeEncodeError:
        ok = False
    if ok:
        check_node_id(value)
        assert "\x00" not in value
    else:
        with pytest.raises(InvalidNodeId):
            check_node_id(value)


@given(GOOD, GOOD)
def test_valid_ids_cannot_alias_each_others_key_prefixes(a: str, b: str) -> None:
    if a != b:
        assert not (b.encode() + b"\x00").startswith(a.encode() + b"\x00")


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad=bad_ids())
def test_bad_ids_are_refused_at_every_door(ledger: Ledger, bad: str) -> None:
    n = len(ledger)
    # API calls that take node ids
    for call in (lambda: ledger.register_author(bad, ALICE.public_key, registrar="gov",
                                                signer=GOV),
                 lambda: ledger.register_author("carol", ALICE.public_key, registrar=bad,
                                                signer=GOV),
                 lambda: ledger.rotate_key(bad, ALICE, ALICE.public_key),
                 lambda: ledger.enrol(bad, ALICE),
                 lambda: ledger.slash(bad, "r", "gov", GOV),
                 lambda: ledger.append(VertexKind.ROUTE, Route("t", "alice"), bad, ALICE),
                 lambda: ledger.next_counter(bad), lambda: ledger.by_author(bad, 0),
                 lambda: ledger.is_slashed(bad), lambda: ledger.views.relay.get(bad),
                 lambda: ledger.views.key_versions.current(bad),
                 lambda: ledger.views.key_versions.history(bad),
                 lambda: ledger.views.attestations.history(bad),
                 lambda: ledger.views.slashes.get(bad)):
        with pytest.raises(InvalidNodeId):
            call()
    # a vertex whose author is bad cannot be built, and its wire form does not decode
    with pytest.raises(MalformedVertex):
        sign_vertex(ALICE, kind=VertexKind.ROUTE, author=bad, counter=1, timestamp_ms=1,
                    key_version=1, parents=[os.urandom(32)], payload=b"")
    good = sign_vertex(ALICE, kind=VertexKind.ROUTE, author="alice", counter=1,
                       timestamp_ms=1, key_version=1, parents=[os.urandom(32)],
                       payload=encode_payload(Route("t", "alice")))
    msg = to_proto(good)
    msg.author = bad if "\ud800" not in bad else "x" * (MAX_AUTHOR + 1)
    with pytest.raises(MalformedVertex):
        decode(msg.SerializeToString())
    # payload fields that name nodes
    if "\ud800" not in bad:  # protobuf cannot even carry a lone surrogate
        for kind, payload in (
                (VertexKind.KEY_VERSION, KeyRecord(bad, 1, ALICE.algorithm,
                                                   ALICE.public_key.raw)),
                (VertexKind.ROUTE, Route("t", bad)),
                (VertexKind.RELAY_RECORD, RelayRecord(bad, 1)),
                (VertexKind.GOVERNANCE_DIRECTIVE, OpaqueRecord("c", bad, b"x")),
                (VertexKind.ATTESTATION, build_attestation(bad, "r", ALICE, 1, b""))):
            with pytest.raises(InvalidPayload):
                decode_payload(kind, encode_payload(payload))
    assert len(ledger) == n


def test_ordinary_ids_still_work(tmp_path: Path) -> None:
    led = make_ledger(tmp_path / "l")
    for node in ("relayer-1", "sentry.eu-west/7", "ノード 1", "spiffe://pqcnet/node/x"):
        led.register_author(node, ALICE.public_key, registrar="gov", signer=GOV)
        led.append(VertexKind.ROUTE, Route("t", node), node, ALICE)
    assert led.verify().ok
    led.close()
