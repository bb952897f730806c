"""Evidence → proposal → slash, run by the node runtime on a timer.

:class:`SlashingPipeline` joins the :class:`~pqcnet.mesh.slashing.SlashingIndexer` (what the
QS-DAG proves) to a node's :class:`~pqcnet.mesh.agent.ControlPlaneAgent` (how the mesh
hears about it). Each :meth:`~SlashingPipeline.run_once`:

1. **reads the evidence**: the indexer's findings in this node's ledger (equivocation
   evidence, attestation counter regressions, measurements outside policy), relay
   reports heard on the mesh that contradict the vertex they name (``volume_mismatch``),
   and any extra :data:`EvidenceRule` (e.g. over-reporting checked against
   client-signed counters, whose format belongs to the relayer);
2. **reports** equivocation evidence this node detected as a ``SLASHING_EVIDENCE``
   vertex, so it reaches every ledger by DAG sync (a node that only ever saw one side
   of a fork could not prove it otherwise);
3. **proposes**: publishes each new finding as a signed ``SLASHING_PROPOSAL`` — advice
   that changes nothing by itself;
4. on **governance nodes** (constructed with governance signing keys): a finding is
   *accepted* when this node derived it itself from its own ledger or from a report it
   heard itself — never on another node's word. It signs the slash directive
   (:func:`~pqcnet.mesh.slashing.to_directive`); with at least ``threshold`` keys it issues it,
   with fewer it publishes it under threshold, and the other governance nodes' pipelines
   cosign it when they accepted the same evidence themselves; whoever completes the
   threshold issues it. When two governance nodes initiate at once, each yields to the
   partial whose first signer has the lower key id, so usually one directive is issued;
   and since the directive id is derived from the evidence, concurrent issuers still
   make one directive, applied once everywhere (a second copy is refused as a replay).

Each proposal and each slash is made once, also across restarts: done ids are kept
in an :class:`~pqcnet.mesh.journal.IdJournal` (written after the act), and a slash
directive the node already applied (its anchored replay window) is not issued again.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from pqcnet.crypto.pqc import SigningKey
from pqcnet.errors import PqcnetError
from pqcnet.mesh.agent import ControlPlaneAgent
from pqcnet.mesh.directives import SignedDirective, SlashNotice, cosign
from pqcnet.mesh.envelope import MessageType
from pqcnet.mesh.errors import ConfigError, MeshError
from pqcnet.mesh.journal import IdJournal
from pqcnet.mesh.messages import RelayReport, SlashingProposal
from pqcnet.mesh.slashing import (
    SlashingIndexer,
    proposal_digest,
    slash_directive_id,
    to_directive,
)
from pqcnet.qsdag import Ledger

log = logging.getLogger("pqcnet.mesh.pipeline")

#: An extra source of findings read from the ledger (each finding must be a pure
#: function of ledger content, so every node derives the same proposal).
EvidenceRule = Callable[[Ledger], Iterable[SlashingProposal]]
#: Findings kept for acceptance and cosigning; relay-report findings waiting for the
#: next run; under-threshold directives waiting for evidence this node has not seen
#: yet. Each bounds what a flood of reports or partial directives can make us hold.
MAX_ACCEPTED = 10_000
MAX_REPORT_FINDINGS = 1_000
MAX_WAITING_PARTIALS = 256
#: Lifetime of the slash directives this pipeline signs.
DEFAULT_SLASH_TTL_MS = 24 * 3_600_000


class SlashingPipeline:
    """One node's evidence → proposal → (governance) slash loop."""

    def __init__(self, agent: ControlPlaneAgent, ledger: Ledger, *,
                 journal: Path | IdJournal | None = None,
                 governance_keys: Sequence[SigningKey] = (),
                 indexer: SlashingIndexer | None = None,
                 rules: Sequence[EvidenceRule] = (),
                 report_evidence: bool = True,
                 slash_ttl_ms: int = DEFAULT_SLASH_TTL_MS) -> None:
        self.agent = agent
        self.ledger = ledger
        self.indexer = indexer or SlashingIndexer(ledger)
        self.rules = list(rules)
        self.report_evidence = report_evidence
        self.slash_ttl_ms = slash_ttl_ms
        self.journal = journal if isinstance(journal, IdJournal) else IdJournal(journal)
        self.keys = list(governance_keys)
        policy = agent.governance
        if self.keys and (policy is None or any(k.public_key.key_id not in policy.keys
                                                for k in self.keys)):
            raise ConfigError("governance_keys must be keys of the agent's governance policy")
        #: what happened, by event: proposed, reported, issued, cosigned, initiated, ...
        self.counts: Counter[str] = Counter()
        self._accepted: OrderedDict[bytes, SlashingProposal] = OrderedDict()  # by digest
        self._reports: list[SlashingProposal] = []
        self._rule_seen: OrderedDict[bytes, None] = OrderedDict()
        self._waiting: OrderedDict[bytes, SignedDirective] = OrderedDict()  # by digest
        self._initiated: OrderedDict[bytes, None] = OrderedDict()  # digests, this process
        self._first_key = min((k.public_key.key_id for k in self.keys), default=b"")
        agent.report_listeners.append(self._on_report)
        if self.keys:
            agent.partial_listeners.append(self._on_partial)

    # ------------------------------------------------------------------ timer

    async def run(self, interval_s: float) -> None:
        """Call :meth:`run_once` every ``interval_s`` seconds until cancelled."""
        while True:
            try:
                await self.run_once()
            except (MeshError, PqcnetError) as exc:
                self.counts["run_failed"] += 1
                log.warning("slashing pipeline run failed", extra={"error": str(exc)})
            await asyncio.sleep(interval_s)

    async def run_once(self) -> list[SlashingProposal]:
        """One pass; returns the findings that were new to this process."""
        if self.report_evidence:
            self._report_evidence()
        findings = self.indexer.scan()  # the indexer returns each of its findings once
        findings += self._reports
        self._reports = []
        for rule in self.rules:
            for f in rule(self.ledger):
                if f.proposal_id not in self._rule_seen:
                    self._rule_seen[f.proposal_id] = None
                    findings.append(f)
        while len(self._rule_seen) > MAX_ACCEPTED:
            self._rule_seen.popitem(last=False)
        for f in findings:
            self._accept(f)
            pid = b"p" + f.proposal_id
            if pid not in self.journal:
                await self.agent.propose_slashing(f)
                self.journal.add(pid)
                self.counts["proposed"] += 1
        if self.keys:
            for f in list(self._accepted.values()):
                await self._slash(f)
            for digest, partial in list(self._waiting.items()):
                if digest in self._accepted:
                    del self._waiting[digest]
                    await self._on_partial(partial, "waiting")
        return findings

    # ------------------------------------------------------------------ evidence

    def _report_evidence(self) -> None:
        me = self.agent.node_id
        for ev in self.ledger.evidence():
            done = b"e" + ev.digest
            if done in self.journal or ev.offender == me:
                continue
            try:
                self.ledger.report_evidence(ev, me, self.agent.keys.signing_key)
            except PqcnetError as exc:  # e.g. not registered yet: try again next run
                self.counts["report_failed"] += 1
                log.debug("evidence not anchored yet", extra={"error": str(exc)})
                continue
            self.journal.add(done)
            self.counts["reported"] += 1

    def _on_report(self, report: RelayReport, sender: str) -> None:
        if len(self._reports) < MAX_REPORT_FINDINGS:
            self._reports += self.indexer.check_report(report, sender)
        else:
            self.counts["report_findings_dropped"] += 1

    def _accept(self, f: SlashingProposal) -> None:
        digest = proposal_digest(f)
        self._accepted[digest] = f
        self._accepted.move_to_end(digest)
        while len(self._accepted) > MAX_ACCEPTED:
            self._accepted.popitem(last=False)

    # ------------------------------------------------------------------ governance

    def _done(self, f: SlashingProposal) -> bool:
        if b"s" + f.proposal_id in self.journal:
            return True
        # issued already (by us or another governance node), or the target is slashed
        # here for other evidence: one slash per node is enough
        if slash_directive_id(f) in self.agent.applied or self.agent.keyring.is_revoked(
                f.target):
            self.journal.add(b"s" + f.proposal_id)
            return True
        return False

    async def _slash(self, f: SlashingProposal) -> None:
        if self._done(f):
            return
        signed = to_directive(f, *sorted(self.keys, key=lambda k: k.public_key.key_id),
                              now_ms=self.agent.clock(), ttl_ms=self.slash_ttl_ms)
        self._initiated[proposal_digest(f)] = None
        while len(self._initiated) > MAX_ACCEPTED:
            self._initiated.popitem(last=False)
        await self._complete(f, signed, initiated=True)

    async def _complete(self, f: SlashingProposal, signed: SignedDirective, *,
                        initiated: bool) -> None:
        policy = self.agent.governance
        assert policy is not None  # checked at construction
        if len(policy.valid_signers(signed)) >= policy.threshold:
            await self.agent.issue_directive(signed)
            self.journal.add(b"s" + f.proposal_id)
            self.counts["issued"] += 1
            log.info("slash directive issued", extra={"target": f.target, "kind": f.kind})
            return
        await self.agent.publisher.publish(self.agent.topics["governance"],
                                           MessageType.GOVERNANCE_DIRECTIVE, signed.encode())
        self.counts["initiated" if initiated else "cosigned"] += 1

    async def _on_partial(self, signed: SignedDirective, via: str) -> None:
        """A directive under the threshold: cosign it if it slashes for evidence this
        node accepted itself (the same target, the same directive id)."""
        action = signed.directive.action
        if not isinstance(action, SlashNotice):
            self.counts["partial_not_a_slash"] += 1
            return
        f = self._accepted.get(action.evidence_digest)
        if f is None:  # evidence not seen here (yet): keep it for the next runs
            self._waiting[action.evidence_digest] = signed
            while len(self._waiting) > MAX_WAITING_PARTIALS:
                self._waiting.popitem(last=False)
            self.counts["partial_waiting"] += 1
            return
        if action.target != f.target or signed.directive.directive_id != slash_directive_id(f):
            self.counts["partial_refused"] += 1
            return
        if self._done(f):
            return
        first = signed.signatures[0][0] if signed.signatures else b""
        if action.evidence_digest in self._initiated and first > self._first_key:
            self.counts["partial_yielded"] += 1  # ours goes first; its signers complete it
            return
        policy = self.agent.governance
        assert policy is not None
        signers = policy.valid_signers(signed)
        mine = [k for k in self.keys if k.public_key.key_id not in signers]
        if not mine:
            return  # we signed it already; others will complete it
        for k in mine:
            signed = cosign(signed, k)
        await self._complete(f, signed, initiated=False)
