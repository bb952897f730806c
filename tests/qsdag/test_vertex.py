"""Canonical encoding: round-trips, determinism, and that every field is covered."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pqcnet.qsdag import MalformedVertex, Vertex, VertexKind, decode
from pqcnet.qsdag.vertex import DOMAIN, MAX_PARENTS, canonical_bytes

ids = st.binary(min_size=32, max_size=32)
vertices = st.builds(
    Vertex,
    kind=st.sampled_from([k for k in VertexKind if k != VertexKind.GENESIS]),
    # node ids are printable text (qsdag.vertex.check_node_id; see test_node_ids.py)
    author=st.text(min_size=1, max_size=40).filter(
        lambda s: s.isprintable() and 0 < len(s.encode("utf-8", "replace")) <= 128
        and not any(0xD800 <= ord(c) <= 0xDFFF for c in s)),
    counter=st.integers(0, 2**64 - 1),
    timestamp_ms=st.integers(0, 2**64 - 1),
    key_version=st.integers(1, 2**32 - 1),
    parents=st.lists(ids, min_size=1, max_size=MAX_PARENTS, unique=True).map(
        lambda p: tuple(sorted(p))),
    payload=st.binary(max_size=512),
    signature=st.binary(min_size=1, max_size=64),
)


@settings(max_examples=200, deadline=None)
@given(vertices)
def test_wire_round_trip_preserves_canonical_bytes_and_id(v: Vertex) -> None:
    back = decode(v.encode())
    assert back == v
    assert back.canonical() == v.canonical()
    assert back.id == hashlib.sha3_256(v.canonical()).digest()
    assert v.canonical().startswith(len(DOMAIN).to_bytes(4, "big") + DOMAIN)


@settings(max_examples=150, deadline=None)
@given(vertices, st.sampled_from(["author", "counter", "timestamp_ms", "key_version",
                                  "parents", "payload", "kind"]), st.data())
def test_every_signed_field_changes_the_id(v: Vertex, name: str, data: st.DataObject) -> None:
    other = data.draw(vertices)
    changed = replace(v, **{name: getattr(other, name)})
    if getattr(other, name) == getattr(v, name):
        assert changed.id == v.id
    else:
        assert changed.id != v.id


@settings(max_examples=150, deadline=None)
@given(vertices)
def test_signature_is_not_part_of_the_id(v: Vertex) -> None:
    assert replace(v, signature=b"\x01" * 10).id == v.id


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_decode_of_arbitrary_bytes_is_vertex_or_typed_error(data: bytes) -> None:
    try:
        v = decode(data)
    except MalformedVertex:
        return
    assert decode(v.encode()) == v


def test_layout_rules_are_enforced() -> None:
    p1, p2 = b"\x01" * 32, b"\x02" * 32
    args = dict(kind=VertexKind.ROUTE, author="a", counter=1, timestamp_ms=1, key_version=1,
                payload=b"")
    assert canonical_bytes(parents=(p1, p2), **args)  # type: ignore[arg-type]
    for bad in [(p2, p1), (p1, p1), (), (b"short",), tuple(bytes([i]) * 32 for i in range(17))]:
        with pytest.raises(MalformedVertex):
            canonical_bytes(parents=bad, **args)  # type: ignore[arg-type]
    with pytest.raises(MalformedVertex):
        canonical_bytes(VertexKind.GENESIS, "a", 0, 1, 1, (p1,), b"")
    with pytest.raises(MalformedVertex):
        canonical_bytes(VertexKind.ROUTE, "", 0, 1, 1, (p1,), b"")
    with pytest.raises(MalformedVertex):
        canonical_bytes(VertexKind.ROUTE, "a", 0, 1, 0, (p1,), b"")
    with pytest.raises(MalformedVertex):
        canonical_bytes(99, "a", 0, 1, 1, (p1,), b"")
