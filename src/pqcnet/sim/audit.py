"""Governance's indexer: finds over-reporting relayers and equivocating ledger authors.

* **Over-reporting**: relayers' volume proofs arrive as real ``RelayReport`` messages on
  the governance node's agent (``report_listeners``); each is checked with
  :func:`pqcnet.relayer.proof.verify_volume_proof` against the relayer's key, and its
  per-customer bytes are added to the relayer's *claims*. Subscribers' signed epoch
  counters (:class:`~pqcnet.sim.dataplane.ClientAck`, checked against the subscriber's
  key) add to *acknowledged*. A relayer whose cumulative claims for a customer exceed
  what that customer acknowledged by more than ``tolerance`` (and ``slack_bytes``, the
  frames a crash can swallow in flight before the relayer notices) is flagged.
  Cumulative, not per epoch: a frame metered at the end of one epoch is counted by the
  client in the next, and one replayed after a crash is acknowledged epochs later.
* **Equivocation**: governance is a validator; its real ledger stores
  :class:`~pqcnet.qsdag.SlashingEvidence` when DAG sync brings it two vertices of one
  author with one counter. Each new offender is flagged.

A flag becomes a real ``SlashNotice`` directive from governance (label
``slash:<node>``), applied by every node like any other directive.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from pqcnet.crypto.errors import SignatureInvalid
from pqcnet.mesh.messages import RelayReport
from pqcnet.proto import relayer_pb2
from pqcnet.relayer.errors import ProofError
from pqcnet.relayer.proof import proof_from_pb, verify_volume_proof
from pqcnet.sim.dataplane import CLIENT_ACK_CONTEXT, PROOF_KIND, ClientAck, DataPlane
from pqcnet.sim.node import SimNode
from pqcnet.sim.world import World

#: Delay between a proof's arrival and the comparison (lets the epoch's acks land).
CHECK_DELAY_S = 5.0
#: How often governance scans its ledger for equivocation evidence.
EVIDENCE_SCAN_S = 2.0


def in_flight_slack(world: World, dataplane: DataPlane | None) -> int:
    """Bytes a crash can swallow between metering and receipt: what a customer's
    publishers send while the relayer has not yet noticed the subscriber is gone
    (``conn_timeout_s``), twice over for margin; at least 4 KiB."""
    w, per_customer = world.sc.workload, 1
    if dataplane is not None and dataplane.subscribers:
        per_customer = -(-len(dataplane.publishers) // len(dataplane.subscribers))
    window = world.sc.network.conn_timeout_s + 1.0
    return max(4096, int(2 * window * w.frame_rate * (w.frame_bytes + 64) * per_customer))


class Auditor:
    def __init__(self, world: World, dataplane: DataPlane | None, *,
                 tolerance: float = 0.1) -> None:
        self.world = world
        self.tolerance = tolerance
        self.slack_bytes = in_flight_slack(world, dataplane)
        self.claimed: dict[tuple[str, str], int] = defaultdict(int)
        self.acked: dict[tuple[str, str], int] = defaultdict(int)
        self.flagged: dict[str, tuple[str, float]] = {}
        self.bad_proofs = 0
        self.bad_acks = 0
        self._names = {node.name: node.idx for node in world.nodes}
        if dataplane is not None:
            dataplane.ack_listeners.append(self.on_ack)
        world.on_boot.append(self._attach)

    def _attach(self, node: SimNode) -> None:
        if node.idx == self.world.gov and node.agent is not None:
            node.agent.report_listeners.append(self.on_report)
            self.world.engine.after(EVIDENCE_SCAN_S, self._scan_evidence, node.boots)

    # ------------------------------------------------------------------ over-reporting

    def on_report(self, report: RelayReport, sender: str) -> None:
        if report.kind != PROOF_KIND:
            return
        key = self.world.directory(sender, 1)
        try:
            proof = proof_from_pb(relayer_pb2.VolumeProof.FromString(report.payload))
            if key is None or proof.relayer_id != sender:
                raise ProofError("proof from an unknown or different relayer")
            verify_volume_proof(proof, key)
        except (ProofError, ValueError):
            self.bad_proofs += 1
            return
        for rec in proof.records:
            self.claimed[(sender, rec.customer)] += rec.bytes
        self.world.engine.after(CHECK_DELAY_S, self._check, sender)

    def on_ack(self, ack: ClientAck) -> None:
        key = self.world.directory(ack.subscriber, 1)
        try:
            if key is None:
                raise SignatureInvalid("unknown subscriber")
            key.verify(ack.signature, ack.signed_bytes(), context=CLIENT_ACK_CONTEXT)
        except SignatureInvalid:
            self.bad_acks += 1
            return
        self.acked[(ack.relayer, ack.customer)] += ack.nbytes

    def _check(self, relayer: str) -> None:
        if relayer in self.flagged:
            return
        for (r, customer), claimed in sorted(self.claimed.items()):
            if r != relayer:
                continue
            excess = claimed - self.acked.get((r, customer), 0)
            if excess > max(self.tolerance * claimed, self.slack_bytes):
                self._flag(relayer, "over-reporting")
                return

    # ------------------------------------------------------------------ equivocation

    def _scan_evidence(self, boot: int) -> None:
        gov = self.world.nodes[self.world.gov]
        if gov.boots != boot or gov.ledger is None:
            return
        self.world.engine.after(EVIDENCE_SCAN_S, self._scan_evidence, boot)
        for ev in gov.ledger.evidence():
            if ev.offender not in self.flagged:
                self._flag(ev.offender, ev.reason or "equivocation")

    # ------------------------------------------------------------------ verdicts

    def _flag(self, name: str, reason: str) -> None:
        self.flagged[name] = (reason, self.world.engine.now)
        idx = self._names.get(name)
        if idx is not None:
            self.world.slash(idx, reason, f"slash:{name}")

    def summary(self, guilty: set[str], honest: set[str]) -> dict[str, Any]:
        flagged = set(self.flagged)
        tp = len(flagged & guilty)
        fp = len(flagged & honest)
        return {
            "flagged": {k: {"reason": v[0], "at_s": round(v[1], 3)}
                        for k, v in sorted(self.flagged.items())},
            "true_positives": tp, "false_positives": fp,
            "precision": round(tp / len(flagged), 6) if flagged else None,
            "recall": round(tp / len(guilty), 6) if guilty else None,
            "honest_slashed": sorted(flagged & honest),
            "bad_proofs": self.bad_proofs, "bad_acks": self.bad_acks,
        }
