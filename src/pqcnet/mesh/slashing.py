"""The slashing indexer: read the QS-DAG, flag misbehaviour, propose slashing.

Sans-IO over a ``pqcnet.qsdag.Ledger``: :meth:`SlashingIndexer.scan` returns new
:class:`~pqcnet.mesh.messages.SlashingProposal` s (each finding once), which the node
publishes signed with :meth:`~pqcnet.mesh.agent.ControlPlaneAgent.propose_slashing`;
governance turns an accepted proposal into a directive with :func:`to_directive`. The
:class:`~pqcnet.mesh.pipeline.SlashingPipeline` runs all of that on a timer.

A proposal is a pure function of the evidence (its id, detail and evidence list are
derived from the ledger), so every node that sees the same evidence makes the same
proposal, and :func:`to_directive` gives it the same directive id everywhere
(:func:`slash_directive_id`): independent governance nodes that slash for the same
evidence make one directive, applied once.

Findings:

* ``equivocation`` — the ledger's stored equivocation evidence (two vertices, same
  author counter, both validly signed);
* ``counter_regression`` — an attestation history whose counters do not strictly
  increase in timestamp order;
* ``measurement`` — a node's latest attestation names a package hash (or config
  hash) outside the measurement policy;
* ``volume_mismatch`` — a relay report published on the mesh whose payload differs
  from the VOLUME_PROOF / PERFORMANCE_REPORT vertex it claims as its anchor.
"""

from __future__ import annotations

import hashlib
import itertools

from pqcnet.crypto.pqc import SigningKey
from pqcnet.mesh.directives import Directive, SignedDirective, SlashNotice, sign_directive
from pqcnet.mesh.messages import RelayReport, SlashingProposal
from pqcnet.qsdag import Ledger, OpaqueRecord, VertexKind
from pqcnet.qsdag.errors import LedgerError


def _pid(*parts: bytes) -> bytes:
    return hashlib.sha256(b"pqcnet/mesh/slashing/v1" + b"".join(parts)).digest()[:16]


class SlashingIndexer:
    """Scans one ledger; remembers what it has already proposed."""

    def __init__(self, ledger: Ledger, *, allowed_package_hashes: frozenset[bytes] | None = None,
                 allowed_config_hashes: frozenset[bytes] | None = None) -> None:
        self.ledger = ledger
        self.allowed_package_hashes = allowed_package_hashes
        self.allowed_config_hashes = allowed_config_hashes
        self._proposed: set[bytes] = set()
        #: ledger position scanned up to (each scan reads only what was anchored since)
        self._position = 0

    def _new(self, p: SlashingProposal) -> list[SlashingProposal]:
        if p.proposal_id in self._proposed:
            return []
        self._proposed.add(p.proposal_id)
        return [p]

    def scan(self) -> list[SlashingProposal]:
        """Every finding not proposed before. Attestation histories are re-checked only
        for nodes with attestations anchored since the previous scan (cheap on a timer)."""
        out: list[SlashingProposal] = []
        for ev in self.ledger.evidence():
            out += self._new(SlashingProposal(
                ev.offender, "equivocation", f"two vertices at counter {ev.counter}",
                (ev.first.id, ev.second.id), _pid(ev.digest)))
        end = len(self.ledger)
        nodes = set()
        for vid in self.ledger.ids_range(self._position, end):
            v = self.ledger.get(vid)
            if v.kind == VertexKind.ATTESTATION:
                nodes.add(v.author)
        self._position = end
        for node in sorted(nodes):
            out += self._check_attestations(node)
        return out

    def _check_attestations(self, node: str) -> list[SlashingProposal]:
        hist = self.ledger.views.attestations.history(node)
        out: list[SlashingProposal] = []
        by_time = sorted(hist, key=lambda h: (h["timestamp_ms"], h["counter"]))
        for prev, cur in itertools.pairwise(by_time):
            if cur["counter"] <= prev["counter"]:
                out += self._new(SlashingProposal(
                    node, "counter_regression",
                    f"counter {cur['counter']} after {prev['counter']}",
                    (bytes.fromhex(prev["vertex"]), bytes.fromhex(cur["vertex"])),
                    _pid(b"cr", bytes.fromhex(cur["vertex"]))))
        latest = hist[-1] if hist else None
        if latest is not None:
            pkg = bytes.fromhex(latest["package_hash"])
            cfg = bytes.fromhex(latest["config_hash"])
            bad = []
            if self.allowed_package_hashes is not None and pkg not in self.allowed_package_hashes:
                bad.append(f"package hash {pkg.hex()[:16]}")
            if self.allowed_config_hashes is not None and cfg not in self.allowed_config_hashes:
                bad.append(f"config hash {cfg.hex()[:16]}")
            if bad:
                vid = bytes.fromhex(latest["vertex"])
                out += self._new(SlashingProposal(
                    node, "measurement", "outside policy: " + ", ".join(bad), (vid,),
                    _pid(b"m", vid)))
        return out

    def check_report(self, report: RelayReport, sender: str) -> list[SlashingProposal]:
        """A relay report must match the ledger vertex it names as its anchor."""
        if not report.anchor_id:
            return []
        try:
            v = self.ledger.get(report.anchor_id)
            payload = self.ledger.payload(report.anchor_id)
        except LedgerError:
            detail = "anchor vertex unknown"
        else:
            if (v.kind in (VertexKind.VOLUME_PROOF, VertexKind.PERFORMANCE_REPORT)
                    and isinstance(payload, OpaqueRecord) and v.author == sender
                    and payload.body == report.payload):
                return []
            detail = "report does not match its anchored record"
        return self._new(SlashingProposal(
            sender, "volume_mismatch", detail,
            (report.anchor_id, hashlib.sha256(report.payload).digest()),
            _pid(b"vm", report.anchor_id, hashlib.sha256(report.payload).digest())))


def proposal_digest(proposal: SlashingProposal) -> bytes:
    """What a slash directive names as its evidence (``SlashNotice.evidence_digest``)."""
    return hashlib.sha256(proposal.encode()).digest()


def slash_directive_id(proposal: SlashingProposal) -> bytes:
    """The directive id of the slash for ``proposal`` (the same on every node)."""
    return _pid(b"slash", proposal.proposal_id or proposal_digest(proposal))


def to_directive(proposal: SlashingProposal, *governance_keys: SigningKey,
                 now_ms: int, ttl_ms: int = 3_600_000) -> SignedDirective:
    """Governance's answer to an accepted proposal: a slash directive signed by
    ``governance_keys`` (possibly fewer than the threshold: others :func:`cosign`)."""
    return sign_directive(Directive.create(
        SlashNotice(proposal.target, f"{proposal.kind}: {proposal.detail}",
                    proposal_digest(proposal)),
        now_ms=now_ms, ttl_ms=ttl_ms, directive_id=slash_directive_id(proposal)),
        *governance_keys)
