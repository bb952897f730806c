"""Over-claim evidence (decision 0014) through the real slashing pipeline.

``relayer-1`` signs a volume proof claiming 60 frames for acme/c in epoch 7; acme's
subscriber signed a final ack counter of 10. An auditor anchors the evidence in its
QS-DAG; it syncs to the governance node, whose pipeline (with
:func:`~pqcnet.relayer.counters.overclaim_rule`) verifies it and slashes relayer-1 on
every node. ``relayer-2`` claims 10 against the same counter: "evidence" against it
(an auditor's lie) is anchored too, is refused by the rule, and nobody slashes it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pqcnet.mesh.directives import GovernancePolicy
from pqcnet.mesh.pipeline import SlashingPipeline
from pqcnet.mesh.transport import InProcessHub, InProcessTransport
from pqcnet.relayer.counters import (
    AckCounter,
    CounterBook,
    Tolerance,
    VolumeOverclaim,
    ca_trust,
    find_overclaims,
    overclaim_rule,
    report_overclaim,
    sign_counter,
)
from pqcnet.relayer.metering import VolumeRecord
from pqcnet.relayer.proof import build_volume_proof, inclusion_proof
from pqcnet.relayer.receipts import ReceiptEntry
from tests.relayer.e2e import identities

from .harness import GOV, attach_ledgers, bootstrap_ledgers, make_agents, node_key, stop_all, until

pytestmark = pytest.mark.timeout(120)


def _proof(relayer: str, frames: int):  # type: ignore[no-untyped-def]
    records = [VolumeRecord("acme", "c", frames * 10, frames, 1, 7),
               VolumeRecord("globex", "d", 50, 5, 1, 7)]
    return build_volume_proof(relayer, 7, records, node_key(relayer))


async def test_overclaim_evidence_is_slashed_and_a_false_one_is_not(tmp_path: Path) -> None:
    names = ["gov", "relayer-1", "relayer-2", "auditor"]
    hub = InProcessHub()
    agents = make_agents(names, [InProcessTransport(hub) for _ in names], tmp_path)
    policy = GovernancePolicy([GOV.public_key])
    for a in agents:
        a.governance = policy
    ports = attach_ledgers(agents, bootstrap_ledgers(names, tmp_path))
    for a in agents:
        await a.start()
    gov, _r1, _r2, auditor = agents
    trust = ca_trust(identities()[2].trust_anchors)
    try:
        await until(lambda: all(len(a.peers.live(a.clock())) == 3 for a in agents), 10, "mesh")
        counter = sign_counter(AckCounter("subscriber", "acme", "c", 7, 10, 100, True),
                               identities()[2])
        book = CounterBook(trust)
        assert book.add([counter]) == 1

        over = _proof("relayer-1", 60)
        [ev] = find_overclaims([over], book)
        honest = _proof("relayer-2", 10)
        assert find_overclaims([honest], book) == []
        lie = VolumeOverclaim(honest.header(), ReceiptEntry(honest.records[0], 0,
                                                            inclusion_proof(honest, 0)),
                              counter, Tolerance())
        led = ports[3].ledger
        real_vid = report_overclaim(led, ev, "auditor", node_key("auditor"))
        lie_vid = report_overclaim(led, lie, "auditor", node_key("auditor"))
        await until(lambda: ports[0].knows(real_vid) and ports[0].knows(lie_vid), 10,
                    "evidence synced to governance")

        pipe = SlashingPipeline(gov, ports[0].ledger, governance_keys=[GOV],
                                journal=tmp_path / "j-gov", rules=[overclaim_rule(trust)])
        timer = asyncio.create_task(pipe.run(0.05))
        try:
            await until(lambda: auditor.keyring.is_revoked("relayer-1"), 20,
                        "over-claiming relayer slashed")
            await asyncio.sleep(0.5)
        finally:
            timer.cancel()
            await asyncio.gather(timer, return_exceptions=True)
        assert not any(a.keyring.is_revoked("relayer-2") for a in agents)
        assert pipe.counts["issued"] == 1
        await until(lambda: any(p.kind == "volume_overclaim" for p, _ in auditor.proposals), 5,
                    "proposal heard")
        [proposal] = [p for p, _ in auditor.proposals if p.kind == "volume_overclaim"]
        assert proposal.target == "relayer-1" and proposal.evidence == (real_vid,)
        assert "claimed 60 frames, client signed 10" in proposal.detail
    finally:
        await stop_all(agents)
