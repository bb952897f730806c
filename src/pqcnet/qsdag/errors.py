"""The QS-DAG error tree. Every rejection says *why* in a type a caller can branch on.

::

    PqcnetError
    └── LedgerError                     anything the ledger refuses or cannot do
        ├── Rejection                   a vertex was refused (nothing was stored)
        │   ├── MalformedVertex         cannot decode / violates a bound or layout
        │   ├── InvalidPayload          payload does not match its kind's schema
        │   ├── InvalidNodeId           node id empty, over-long, or with control chars
        │   ├── UnknownAuthor           no registered key for the author
        │   ├── AuthorSlashed           author disabled by a slash in the vertex's ancestry
        │   ├── KeyVersionMismatch      vertex names a key version not in force
        │   ├── BadSignature            ML-DSA signature does not verify
        │   ├── TimestampSkew           too far in the future / before its parents
        │   ├── AttestationRejected     attestation signature/counter/policy fails
        │   ├── Equivocation            same (author, counter), different vertex;
        │   │                           carries signed-by-author ``evidence``
        │   └── OrphanPoolFull          parked set at its bound (retriable later)
        ├── VertexParked                not a failure: waiting for parents/counters
        ├── NotFound                    no such vertex id
        ├── CorruptRecord               a stored value failed its checksum
        ├── InvalidEvidence             slashing evidence does not prove anything
        └── LedgerStateError            wrong state (no genesis, already initialised)

Every rejection carries ``vertex_id`` (hex, when it could be computed) so callers
and ``pqcnet ledger verify`` can report which vertex failed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pqcnet.errors import PqcnetError

if TYPE_CHECKING:
    from pqcnet.qsdag.evidence import SlashingEvidence


class LedgerError(PqcnetError):
    """Root of all QS-DAG errors."""


class Rejection(LedgerError):
    """A vertex was refused; the ledger is unchanged."""

    retriable: bool = False

    def __init__(self, message: str, *, vertex_id: bytes | None = None) -> None:
        super().__init__(message)
        self.vertex_id = vertex_id


class MalformedVertex(Rejection):
    """The vertex cannot be decoded or breaks a layout rule or bound."""


class InvalidPayload(Rejection):
    """The payload does not match the schema declared by the vertex kind."""


class UnknownAuthor(Rejection):
    """No key is registered for the vertex author."""


class InvalidNodeId(Rejection):
    """A node id is empty, longer than ``MAX_AUTHOR`` bytes, or contains control /
    format characters (ids are storage key prefixes and appear in logs)."""


class AuthorSlashed(Rejection):
    """The author is disabled by a slash that is an ancestor of the vertex and has not
    been lifted (re-registration by a registrar plus a re-attestation)."""

    def __init__(self, message: str, *, vertex_id: bytes | None = None, author: str,
                 slash_ids: tuple[bytes, ...]) -> None:
        super().__init__(message, vertex_id=vertex_id)
        self.author = author
        self.slash_ids = slash_ids


class KeyVersionMismatch(Rejection):
    """The vertex names a key version other than the author's version in force."""


class BadSignature(Rejection):
    """The ML-DSA signature does not verify under the author's key."""


class TimestampSkew(Rejection):
    """The timestamp is beyond the allowed skew (future, or before its parents)."""


class AttestationRejected(Rejection):
    """An attestation event fails its signature, counter or measurement policy."""


class Equivocation(Rejection):
    """A second, different vertex for an (author, counter) already anchored."""

    def __init__(
        self, message: str, *, vertex_id: bytes | None = None, evidence: SlashingEvidence
    ) -> None:
        super().__init__(message, vertex_id=vertex_id)
        self.evidence = evidence


class OrphanPoolFull(Rejection):
    """The orphan pool is at its bound; retry after missing vertices arrive."""

    retriable = True


class VertexParked(LedgerError):
    """Not an error for the sender: the vertex is valid so far but waits for
    missing parents or earlier counters of its author. It is anchored
    automatically when they arrive."""

    def __init__(
        self,
        message: str,
        *,
        vertex_id: bytes,
        missing_parents: tuple[bytes, ...] = (),
        waiting_counter: int | None = None,
    ) -> None:
        super().__init__(message)
        self.vertex_id = vertex_id
        self.missing_parents = missing_parents
        self.waiting_counter = waiting_counter


class NotFound(LedgerError):
    """No vertex with that id is anchored."""


class CorruptRecord(LedgerError):
    """A stored value failed its integrity check; it is not served."""


class InvalidEvidence(LedgerError):
    """Slashing evidence that does not prove misbehaviour."""


class LedgerStateError(LedgerError):
    """The ledger is in the wrong state for the call (e.g. no genesis yet)."""
