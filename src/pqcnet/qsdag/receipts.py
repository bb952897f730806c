"""What the ledger hands back: an anchoring receipt, an import report, an audit report.

Plain values with no behaviour, kept apart so the parts that produce them (the
ledger, :mod:`~pqcnet.qsdag.sync`, :mod:`~pqcnet.qsdag.audit`) share them without
importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pqcnet.qsdag.errors import Rejection


@dataclass(frozen=True, slots=True)
class AnchorReceipt:
    """Proof of anchoring in *this* ledger."""

    #: vertex id (SHA3-256 of its canonical encoding)
    id: bytes
    #: longest path from genesis (genesis: 0)
    depth: int
    #: anchoring order in this ledger (genesis: 0); differs between ledgers
    position: int
    #: orphans that this vertex released and that were anchored with it
    released: tuple[AnchorReceipt, ...] = ()


@dataclass(slots=True)
class ImportReport:
    """Outcome of :meth:`Ledger.import_ <pqcnet.qsdag.ledger.Ledger.import_>`."""

    anchored: list[bytes] = field(default_factory=list)
    duplicates: list[bytes] = field(default_factory=list)
    parked: list[bytes] = field(default_factory=list)
    rejected: list[tuple[bytes | None, Rejection]] = field(default_factory=list)


@dataclass(slots=True)
class VerifyReport:
    """Outcome of :meth:`Ledger.verify <pqcnet.qsdag.ledger.Ledger.verify>`: every
    invalid vertex with its reason."""

    checked: int = 0
    invalid: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.invalid
