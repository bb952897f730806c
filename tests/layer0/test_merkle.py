"""RFC 6962 Merkle trees: property tests of roots and inclusion proofs."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pqcnet.layer0 import (
    InclusionProof,
    ProofInvalid,
    inclusion_proof,
    merkle_root,
    verify_inclusion,
)

leaves_st = st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=70)


def _pairwise_root(leaves: list[bytes]) -> bytes:
    """Independent construction for power-of-two sizes: hash level by level."""
    level = [hashlib.sha256(b"\x00" + x).digest() for x in leaves]
    while len(level) > 1:
        level = [hashlib.sha256(b"\x01" + a + b).digest() for a, b in zip(level[::2], level[1::2])]
    return level[0]


@pytest.mark.parametrize("n", [1, 2, 4, 8, 64])
def test_power_of_two_roots_match_level_by_level_hashing(n: int) -> None:
    leaves = [bytes([i]) * 32 for i in range(n)]
    assert merkle_root(leaves) == _pairwise_root(leaves)


def test_odd_tree_splits_at_largest_power_of_two() -> None:
    a, b, c = (bytes([i]) * 32 for i in range(3))
    h = lambda *p: hashlib.sha256(b"".join(p)).digest()  # noqa: E731
    expected = h(b"\x01", h(b"\x01", h(b"\x00", a), h(b"\x00", b)), h(b"\x00", c))
    assert merkle_root([a, b, c]) == expected


@settings(max_examples=150, deadline=None)
@given(leaves_st, st.data())
def test_every_leaf_proves_and_nothing_else_does(leaves: list[bytes], data: st.DataObject) -> None:
    root = merkle_root(leaves)
    i = data.draw(st.integers(0, len(leaves) - 1))
    proof = inclusion_proof(leaves, i)
    verify_inclusion(leaves[i], proof, root)
    with pytest.raises(ProofInvalid):
        verify_inclusion(b"\xff" * 33, proof, root)
    if proof.path:
        j = data.draw(st.integers(0, len(proof.path) - 1))
        bad_path = list(proof.path)
        bad_path[j] = bytes([bad_path[j][0] ^ 1]) + bad_path[j][1:]
        with pytest.raises(ProofInvalid):
            verify_inclusion(leaves[i], replace(proof, path=tuple(bad_path)), root)
        with pytest.raises(ProofInvalid):
            verify_inclusion(leaves[i], replace(proof, path=proof.path[:-1]), root)
    other = data.draw(st.integers(0, len(leaves) - 1))
    if leaves[other] != leaves[i]:
        with pytest.raises(ProofInvalid):
            verify_inclusion(leaves[other], proof, root)
    assert InclusionProof.from_json(proof.to_json()) == proof


@settings(max_examples=100, deadline=None)
@given(leaves_st, st.integers(0, 200), st.integers(1, 200))
def test_wrong_index_or_size_fails(leaves: list[bytes], index: int, size: int) -> None:
    root = merkle_root(leaves)
    proof = inclusion_proof(leaves, 0)
    forged = InclusionProof(index, size, proof.path)
    if (index, size) != (0, len(leaves)):
        try:
            verify_inclusion(leaves[0], forged, root)
        except ProofInvalid:
            return
        # only acceptable if the forged position is genuinely equivalent: same leaf there
        assert index < len(leaves) and leaves[index] == leaves[0]
