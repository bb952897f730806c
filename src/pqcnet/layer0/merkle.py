"""RFC 6962 / RFC 9162 Merkle trees over vertex ids (SHA-256).

``leaf = SHA-256(0x00 ‖ id)``, ``node = SHA-256(0x01 ‖ left ‖ right)``; a tree of n
leaves splits at the largest power of two below n (so no leaf is duplicated and
second-preimage tricks between leaves and nodes are impossible). Using the
Certificate Transparency construction means any CT/RFC 9162 verifier can check our
inclusion proofs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from pqcnet.layer0.errors import ProofInvalid

#: Largest epoch a tree is built over (bounds memory and proof work per epoch).
#: 2**20: the relayer's volume proofs share this tree and hold one leaf per active
#: (customer, channel, QoS) per epoch, which can pass 65,536 on a busy relayer; a
#: million leaves is ~32 MiB of leaf hashes and about a second of hashing, still a
#: fine per-epoch cost. ``pqcnet.layer0.anchor`` keeps its own smaller ``epoch_size``.
MAX_LEAVES = 1 << 20


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    k = 1
    while k << 1 < n:
        k <<= 1
    return k


def _root(hashes: Sequence[bytes]) -> bytes:
    if len(hashes) == 1:
        return hashes[0]
    k = _split(len(hashes))
    return node_hash(_root(hashes[:k]), _root(hashes[k:]))


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """Root over ``leaves`` (the empty tree's root is SHA-256 of nothing)."""
    if len(leaves) > MAX_LEAVES:
        raise ProofInvalid(f"{len(leaves)} leaves; at most {MAX_LEAVES} per tree")
    return root_of_leaf_hashes([leaf_hash(x) for x in leaves])


def root_of_leaf_hashes(hashes: Sequence[bytes]) -> bytes:
    """:func:`merkle_root` from the leaves' :func:`leaf_hash` es: a caller that encodes
    each leaf on the fly never holds every encoded leaf at once (a relayer's epoch can
    have a million)."""
    if len(hashes) > MAX_LEAVES:
        raise ProofInvalid(f"{len(hashes)} leaves; at most {MAX_LEAVES} per tree")
    if not hashes:
        return hashlib.sha256(b"").digest()
    return _root(hashes)


@dataclass(frozen=True, slots=True)
class InclusionProof:
    """Audit path for leaf ``index`` in a tree of ``size`` leaves."""

    index: int
    size: int
    path: tuple[bytes, ...]

    def to_json(self) -> dict[str, object]:
        return {"index": self.index, "size": self.size, "path": [p.hex() for p in self.path]}

    @classmethod
    def from_json(cls, obj: dict[str, object]) -> InclusionProof:
        try:
            path = tuple(bytes.fromhex(str(p)) for p in obj["path"])  # type: ignore[attr-defined]
            return cls(int(obj["index"]), int(obj["size"]), path)  # type: ignore[call-overload]
        except (KeyError, TypeError, ValueError) as exc:
            raise ProofInvalid(f"malformed proof: {exc}") from None


def inclusion_proof(leaves: Sequence[bytes], index: int) -> InclusionProof:
    """The RFC 6962 audit path of ``leaves[index]``."""
    if not 0 <= index < len(leaves):
        raise ProofInvalid(f"leaf {index} outside a tree of {len(leaves)}")
    hashes = [leaf_hash(x) for x in leaves]
    path: list[bytes] = []

    def walk(m: int, sub: Sequence[bytes]) -> None:
        if len(sub) <= 1:
            return
        k = _split(len(sub))
        if m < k:
            walk(m, sub[:k])
            path.append(_root(sub[k:]))
        else:
            walk(m - k, sub[k:])
            path.append(_root(sub[:k]))

    walk(index, hashes)
    return InclusionProof(index, len(leaves), tuple(path))


class Tree:
    """One tree for many audit paths: leaf hashes and subtree roots computed once
    (O(n) for the tree, O(log n) per path), where :func:`inclusion_proof` rehashes the
    whole tree for each. Same paths, same root."""

    def __init__(self, leaves: Sequence[bytes]) -> None:
        if len(leaves) > MAX_LEAVES:
            raise ProofInvalid(f"{len(leaves)} leaves; at most {MAX_LEAVES} per tree")
        self._hashes = [leaf_hash(x) for x in leaves]
        self._roots: dict[tuple[int, int], bytes] = {}

    def _sub(self, lo: int, hi: int) -> bytes:
        got = self._roots.get((lo, hi))
        if got is None:
            if hi - lo == 1:
                got = self._hashes[lo]
            else:
                k = lo + _split(hi - lo)
                got = node_hash(self._sub(lo, k), self._sub(k, hi))
            self._roots[(lo, hi)] = got
        return got

    @property
    def root(self) -> bytes:
        return self._sub(0, len(self._hashes)) if self._hashes else hashlib.sha256(b"").digest()

    def proof(self, index: int) -> InclusionProof:
        n = len(self._hashes)
        if not 0 <= index < n:
            raise ProofInvalid(f"leaf {index} outside a tree of {n}")
        path: list[bytes] = []
        lo, hi = 0, n
        while hi - lo > 1:  # top-down; RFC 6962 paths are bottom-up
            k = lo + _split(hi - lo)
            if index < k:
                path.append(self._sub(k, hi))
                hi = k
            else:
                path.append(self._sub(lo, k))
                lo = k
        return InclusionProof(index, n, tuple(reversed(path)))


def verify_inclusion(leaf: bytes, proof: InclusionProof, root: bytes) -> None:
    """RFC 9162 §2.1.3.2; raises :class:`ProofInvalid` unless ``leaf`` is in the tree."""
    if not 0 <= proof.index < proof.size or any(len(p) != 32 for p in proof.path):
        raise ProofInvalid("proof index or path malformed")
    fn, sn, r = proof.index, proof.size - 1, leaf_hash(leaf)
    for p in proof.path:
        if sn == 0:
            raise ProofInvalid("proof path too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0 or r != root:
        raise ProofInvalid("inclusion proof does not reach the root")
