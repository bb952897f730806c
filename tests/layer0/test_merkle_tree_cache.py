"""``Tree``: the cached tree gives exactly the RFC 6962 root and audit paths."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pqcnet.layer0.merkle import Tree, inclusion_proof, merkle_root, verify_inclusion


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=8), min_size=1, max_size=80))
def test_tree_matches_the_uncached_paths(leaves: list[bytes]) -> None:
    tree = Tree(leaves)
    assert tree.root == merkle_root(leaves)
    for i, leaf in enumerate(leaves):
        proof = tree.proof(i)
        assert proof == inclusion_proof(leaves, i)
        verify_inclusion(leaf, proof, tree.root)
