"""One pull round of DAG sync, with no I/O: the transport (mesh over Waku) carries
the three messages — the remote's tips, the ids we ask for, the exported vertices.

A round: ``need = local.missing(remote.tips())``; the remote answers
``remote.export(need, known_tips=local.tips())`` — everything ``need`` depends on
that is not already below our tips — and we ``import_`` it. Import tolerates any
order (orphans wait for their ancestry), so repeated rounds between any peers
converge to the same vertex set and tips.
"""

from __future__ import annotations

from pqcnet.qsdag.ledger import ImportReport, Ledger


def pull(local: Ledger, remote: Ledger) -> ImportReport:
    """Bring everything ``remote`` has into ``local`` (in-process convenience)."""
    need = local.missing(remote.tips())
    if not need:
        return ImportReport()
    return local.import_(remote.export(need, known_tips=local.tips()))
