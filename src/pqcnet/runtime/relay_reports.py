"""A relayer's volume proofs published on the control plane (composition root).

The relayer proves each closed metering epoch and anchors the proof header in its
QS-DAG (``pqcnet.relayer.proof.LedgerAnchor``); this publisher then announces each anchored
proof on the mesh's ``relay-reports`` topic as a :class:`~pqcnet.mesh.messages.RelayReport`
whose payload is *exactly* the anchored body and whose ``anchor_id`` is the vertex.
Anyone whose ledger has synced that vertex can check the two match
(:meth:`pqcnet.mesh.slashing.SlashingIndexer.check_report`) — a relayer that reports one
thing on the mesh and anchors another is proposed for slashing.

It lives in ``pqcnet`` because it joins the relayer and the mesh, which must not know
each other.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from pqcnet.mesh.agent import ControlPlaneAgent
from pqcnet.mesh.errors import MeshError
from pqcnet.mesh.messages import RelayReport
from pqcnet.relayer.proof import proof_to_pb

if TYPE_CHECKING:  # the relayer's bus clients are not installed in a sentry image
    from pqcnet.relayer.node import RelayerNode

log = logging.getLogger("pqcnet.relay_reports")

#: RelayReport.kind of a volume proof header
VOLUME_PROOF_KIND = "volume_proof"
#: Most proofs published per round (bounds the burst after a long mesh outage).
MAX_PER_ROUND = 64


class RelayReportPublisher:
    """Publishes every anchored, not yet published volume proof of ``node``, in epoch order."""

    def __init__(self, node: RelayerNode, agent: ControlPlaneAgent, *,
                 interval_s: float = 1.0, max_per_round: int = MAX_PER_ROUND) -> None:
        self.node = node
        self.agent = agent
        self.interval_s = interval_s
        self.max_per_round = max_per_round
        #: highest epoch published (epochs only grow, so this is all we remember)
        self.last_epoch = -1
        self.published = 0
        self.failures = 0

    async def publish_new(self) -> int:
        """One round; returns how many reports went out. A failed publish is retried
        next round (the epoch is not marked published)."""
        sent = 0
        for epoch in sorted(e for e in self.node.proofs if e > self.last_epoch):
            parts = self.node.proof_parts(epoch) or (self.node.proofs[epoch],)
            anchors = [self.node.anchor.part_receipts.get((epoch, p.part)) for p in parts]
            if None in anchors or sent >= self.max_per_round:
                break
            try:  # every part of a split epoch; a retry resends the epoch whole
                for proof, anchor in zip(parts, anchors, strict=True):
                    body = proof_to_pb(proof.header()).SerializeToString()
                    assert anchor is not None
                    await self.agent.publish_report(
                        RelayReport(VOLUME_PROOF_KIND, body, anchor))
            except MeshError as exc:
                self.failures += 1
                log.info("relay report not published; will retry",
                         extra={"epoch": epoch, "error": str(exc)})
                break
            self.last_epoch = epoch
            self.published += 1
            sent += 1
        return sent

    async def run(self) -> None:
        """Publish forever, every ``interval_s``."""
        while True:
            await self.publish_new()
            await asyncio.sleep(self.interval_s)


__all__ = ["MAX_PER_ROUND", "VOLUME_PROOF_KIND", "RelayReportPublisher"]
