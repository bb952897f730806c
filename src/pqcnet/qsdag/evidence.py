"""Slashing evidence: two author-signed vertices that cannot both be honest.

Every author's counter advances by exactly one per vertex, so two *different*
vertices with the same (author, counter) — a fork, or a counter that went backwards
onto a used value — are proof of misbehaviour. The evidence carries both vertices
whole (ordered by id, so the same pair always makes the same evidence); anyone
holding the author's key history can check it with :func:`verify_evidence`. The
ledger records it, and a reporter anchors it as a signed ``SLASHING_EVIDENCE``
vertex (``Ledger.report_evidence``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from pqcnet.crypto.errors import SignatureInvalid
from pqcnet.crypto.pqc import VerifyKey
from pqcnet.proto import qsdag_pb2
from pqcnet.qsdag.errors import InvalidEvidence, InvalidPayload, MalformedVertex
from pqcnet.qsdag.vertex import DOMAIN, Vertex, from_proto, to_proto

#: (node id, key version) -> key, or None when unknown
KeyLookup = Callable[[str, int], VerifyKey | None]


@dataclass(frozen=True, slots=True)
class SlashingEvidence:
    """Two different vertices signed by ``offender`` with the same ``counter``."""

    offender: str
    counter: int
    first: Vertex
    second: Vertex
    reason: str = "equivocation"

    @classmethod
    def of(cls, a: Vertex, b: Vertex, reason: str = "equivocation") -> SlashingEvidence:
        """Evidence from two vertices, in canonical (id) order."""
        first, second = sorted((a, b), key=lambda v: v.id)
        return cls(a.author, a.counter, first, second, reason)

    @property
    def digest(self) -> bytes:
        """SHA3-256 naming this evidence (over both vertex ids)."""
        return hashlib.sha3_256(b"pqcnet/qsdag/evidence/v1" + self.first.id
                                + self.second.id).digest()

    def to_proto(self) -> qsdag_pb2.SlashingEvidence:
        return qsdag_pb2.SlashingEvidence(offender=self.offender, counter=self.counter,
                                          first=to_proto(self.first),
                                          second=to_proto(self.second), reason=self.reason)

    @classmethod
    def from_proto(cls, m: qsdag_pb2.SlashingEvidence) -> SlashingEvidence:
        try:
            first, second = from_proto(m.first), from_proto(m.second)
        except MalformedVertex as exc:
            raise InvalidPayload(f"evidence vertex malformed: {exc}") from None
        if first.id >= second.id:
            raise InvalidPayload("evidence vertices must be distinct and ordered by id")
        return cls(m.offender, m.counter, first, second, m.reason or "equivocation")


def verify_evidence(ev: SlashingEvidence, keys: KeyLookup) -> None:
    """Raise :class:`InvalidEvidence` unless ``ev`` proves that its offender equivocated."""
    a, b = ev.first, ev.second
    if a.id == b.id:
        raise InvalidEvidence("the two vertices are the same vertex")
    if not (a.author == b.author == ev.offender):
        raise InvalidEvidence("vertices are not both by the offender")
    if not (a.counter == b.counter == ev.counter):
        raise InvalidEvidence("vertices do not share the offender's counter")
    for v in (a, b):
        key = keys(v.author, v.key_version)
        if key is None:
            raise InvalidEvidence(f"no key for {v.author} version {v.key_version}")
        try:
            key.verify(v.signature, v.canonical(), context=DOMAIN)
        except SignatureInvalid:
            raise InvalidEvidence("an evidence vertex is not signed by the offender") from None
