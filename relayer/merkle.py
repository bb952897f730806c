"""Binary Merkle tree over volume records, with inclusion proofs.

Written here because neither ``qsdag`` nor ``layer0`` exposes one yet; if one lands,
this module should become a re-export. Domain-separated hashing (RFC 6962 style:
``0x00`` before leaves, ``0x01`` before inner nodes) so a leaf can never be passed
off as an inner node. An odd node at the end of a level is carried up unchanged, so
a proof needs the leaf ``index`` and the leaf ``count`` to know where siblings are.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from relayer.errors import ProofError

#: SHA3-256 output size
HASH_SIZE = 32
#: leaves one tree may hold (bounds proof length and build memory)
MAX_LEAVES = 1 << 24


def leaf_hash(data: bytes) -> bytes:
    """Hash of one leaf's canonical bytes."""
    return hashlib.sha3_256(b"\x00" + data).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha3_256(b"\x01" + left + right).digest()


def _levels(leaves: Sequence[bytes]) -> list[list[bytes]]:
    if len(leaves) > MAX_LEAVES:
        raise ProofError(f"{len(leaves)} leaves over {MAX_LEAVES}")
    levels = [list(leaves)]
    while len(levels[-1]) > 1:
        cur = levels[-1]
        nxt = [_node(cur[i], cur[i + 1]) for i in range(0, len(cur) - 1, 2)]
        if len(cur) % 2:
            nxt.append(cur[-1])
        levels.append(nxt)
    return levels


def root(leaves: Sequence[bytes]) -> bytes:
    """Root over leaf *hashes*; the empty tree's root is ``sha3_256(b"")``."""
    if not leaves:
        return hashlib.sha3_256(b"").digest()
    return _levels(leaves)[-1][0]


def prove(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """Sibling hashes, bottom-up, proving leaf ``index``."""
    if not 0 <= index < len(leaves):
        raise ProofError(f"leaf index {index} outside 0..{len(leaves) - 1}")
    out = []
    for level in _levels(leaves)[:-1]:
        sib = index ^ 1
        if sib < len(level):
            out.append(level[sib])
        index //= 2
    return out


def verify(leaf: bytes, index: int, count: int, siblings: Sequence[bytes], expected: bytes) -> None:
    """Raise :class:`ProofError` unless leaf hash ``leaf`` sits at ``index`` under ``expected``."""
    if not 0 <= index < count:
        raise ProofError(f"leaf index {index} outside 0..{count - 1}")
    h, width, it = leaf, count, iter(siblings)
    try:
        while width > 1:
            if index % 2:
                h = _node(next(it), h)
            elif index + 1 < width:
                h = _node(h, next(it))
            index //= 2
            width = (width + 1) // 2
    except StopIteration:
        raise ProofError("inclusion proof too short") from None
    if next(it, None) is not None:
        raise ProofError("inclusion proof too long")
    if h != expected:
        raise ProofError("inclusion proof does not lead to the anchored root")
