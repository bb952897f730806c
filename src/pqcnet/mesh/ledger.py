"""What the control plane needs from a QS-DAG ledger: :class:`LedgerPort`.

The mesh anchors directives (and reads them back: its replay window, and directives
other nodes anchored), route tables and key versions, disables slashed authors, and
synchronises vertices between nodes; it needs nothing else from the ledger, so it
depends on this small protocol. :mod:`pqcnet.mesh.qsdag_port` adapts the real ``qsdag``
ledger to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from pqcnet.crypto.pqc import SigningKey, VerifyKey


class LedgerPort(Protocol):
    """Ledger operations used by :class:`~pqcnet.mesh.agent.ControlPlaneAgent`.

    Every method raises :class:`~pqcnet.mesh.errors.LedgerRejected` when the ledger refuses.
    """

    def anchor_directive(self, signed_directive: bytes, subject: str) -> bytes:
        """Anchor a verified governance directive; returns the anchoring vertex id."""
        ...

    def anchored_directives(self, since_ms: int) -> list[bytes]:
        """Signed directives this node anchored at or after ``since_ms`` (its replay
        window, reloaded at start)."""
        ...

    def take_synced_directives(self) -> list[bytes]:
        """Signed directives anchored by other nodes that arrived by DAG sync since
        the last call (so an offline node still learns of them)."""
        ...

    def anchor_routes(self, advertisement: bytes) -> bytes:
        """Anchor this node's own route advertisement (meta-routing table)."""
        ...

    def record_key_version(self, new_key: VerifyKey, signer: SigningKey) -> int:
        """Record this node's next key, signed with its current key; returns the
        key version now in force (the ledger numbers versions)."""
        ...

    def disable_author(self, node_id: str, reason: str) -> None:
        """Refuse further vertices from ``node_id`` (slashed)."""
        ...

    def is_disabled(self, node_id: str) -> bool: ...

    def key_for(self, node_id: str, key_version: int) -> VerifyKey | None:
        """``node_id``'s key at ``key_version`` as recorded in the ledger, if any."""
        ...

    def tips(self) -> list[bytes]:
        """Current tip vertex ids."""
        ...

    def vertex_count(self) -> int: ...

    def genesis_id(self) -> bytes | None:
        """The ledger's genesis vertex id (None while it has none)."""
        ...

    def knows(self, vertex_id: bytes) -> bool: ...

    def export_for(self, their_tips: Sequence[bytes], limit: int) -> list[bytes]:
        """Encoded vertices the holder of ``their_tips`` lacks, parents first, at most ``limit``."""
        ...

    def import_vertices(self, blobs: Sequence[bytes]) -> int:
        """Verify and anchor received vertices; returns how many were new. Bad ones are
        skipped (counted by the ledger), never fatal."""
        ...
