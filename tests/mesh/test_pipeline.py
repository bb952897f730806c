"""Evidence → proposal → slash with real ledgers and agents on the in-process transport.

* equivocation: ``relayer-1`` signs two vertices with one counter; only ``sentry-1``
  ever sees the second. Its pipeline anchors the evidence, proposes; the two
  governance nodes (2-of-2 keys, one each) accept it from their own ledgers, one
  initiates, the other cosigns, and the slash reaches every node. Each proposal and
  the slash are made once, also after the pipelines restart.
* a relay report that contradicts its anchored vertex, and an extra evidence rule
  (the hook over-reporting checks plug into), with a governance node holding enough
  keys to issue alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path

import pytest

from pqcnet.mesh.agent import ControlPlaneAgent
from pqcnet.mesh.directives import GovernancePolicy
from pqcnet.mesh.errors import ConfigError
from pqcnet.mesh.journal import IdJournal
from pqcnet.mesh.messages import RelayReport, SlashingProposal
from pqcnet.mesh.pipeline import SlashingPipeline
from pqcnet.mesh.qsdag_port import QsdagPort
from pqcnet.mesh.transport import InProcessHub, InProcessTransport
from pqcnet.qsdag import Ledger, OpaqueRecord, VertexKind
from pqcnet.qsdag.errors import Equivocation
from pqcnet.qsdag.payloads import encode_payload
from pqcnet.qsdag.vertex import sign_vertex

from .harness import (
    GOV,
    attach_ledgers,
    bootstrap_ledgers,
    make_agents,
    node_key,
    stop_all,
    until,
)

pytestmark = pytest.mark.timeout(120)

GA, GB = GOV, node_key("governance-key-2")


async def _mesh(names: list[str], tmp: Path, policy: GovernancePolicy
                ) -> tuple[list[ControlPlaneAgent], list[QsdagPort]]:
    hub = InProcessHub()
    agents = make_agents(names, [InProcessTransport(hub) for _ in names], tmp)
    for a in agents:
        a.governance = policy
    ports = attach_ledgers(agents, bootstrap_ledgers(names, tmp))
    for a in agents:
        await a.start()
    await until(lambda: all(len(a.peers.live(a.clock())) == len(names) - 1 for a in agents),
                10, "mesh")
    return agents, ports


def _twin(led: Ledger, vid: bytes, author: str, body: bytes):  # type: ignore[no-untyped-def]
    v = led.get(vid)
    return sign_vertex(node_key(author), kind=v.kind, author=author, counter=v.counter,
                       timestamp_ms=v.timestamp_ms, key_version=v.key_version,
                       parents=v.parents, payload=encode_payload(OpaqueRecord(
                           "pqcnet.relayer.VolumeRecord", author, body)))


async def _drive(pipes: list[SlashingPipeline], cond: object, what: str,
                 limit_s: float = 30) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + limit_s
    while not (callable(cond) and cond()):
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        for p in pipes:
            await p.run_once()
        await asyncio.sleep(0.1)


async def test_equivocation_is_proposed_then_slashed_once_by_2_of_2_governance(
        tmp_path: Path) -> None:
    names = ["gov-a", "gov-b", "relayer-1", "sentry-1"]
    policy = GovernancePolicy([GA.public_key, GB.public_key], threshold=2)
    agents, ports = await _mesh(names, tmp_path, policy)
    gov_a, gov_b, _relayer, sentry = agents
    try:
        with pytest.raises(ConfigError):  # a key outside the policy cannot slash
            SlashingPipeline(gov_a, ports[0].ledger, governance_keys=[node_key("gov-a")])

        def pipelines() -> list[SlashingPipeline]:
            return [SlashingPipeline(gov_a, ports[0].ledger, governance_keys=[GA],
                                     journal=tmp_path / "j-gov-a"),
                    SlashingPipeline(gov_b, ports[1].ledger, governance_keys=[GB],
                                     journal=tmp_path / "j-gov-b"),
                    SlashingPipeline(sentry, ports[3].ledger, journal=tmp_path / "j-sentry")]

        pipes = pipelines()
        first = ports[2].ledger.append(VertexKind.VOLUME_PROOF, OpaqueRecord(
            "pqcnet.relayer.VolumeRecord", "relayer-1", b"bytes=100"), "relayer-1",
            node_key("relayer-1")).id
        await until(lambda: ports[3].knows(first), 10, "honest vertex synced")
        with pytest.raises(Equivocation):   # the fork only the sentry ever sees
            ports[3].ledger.verify_and_anchor(_twin(ports[2].ledger, first, "relayer-1",
                                                    b"bytes=999999"))
        for p in pipes[:2]:
            assert await p.run_once() == []  # governance has no evidence of its own yet
        honest = [*agents[:2], sentry]
        await _drive(pipes, lambda: all(a.keyring.is_revoked("relayer-1") for a in honest),
                     "slash applied everywhere")
        for p in [*ports[:2], *ports[3:]]:
            assert p.is_disabled("relayer-1")
        assert pipes[2].counts["reported"] == 1 and pipes[2].counts["proposed"] == 1
        # one governance node initiated under threshold, the other completed it
        counts = pipes[0].counts + pipes[1].counts
        assert counts["issued"] == 1 and counts["initiated"] >= 1
        await until(lambda: any(p.kind == "equivocation" for p, _ in gov_a.proposals), 5,
                    "proposal heard")
        # everyone applied exactly one slash directive
        for a in honest:
            assert a.directives.outcomes[("slash", "mesh", "applied")] == 1, a.node_id
        # more runs, then a restart of every pipeline: nothing is proposed or slashed again
        for p in pipes:
            await p.run_once()
        before = {a.node_id: len(a.directives.applied) for a in honest}
        pipes = pipelines()
        for _ in range(3):
            for p in pipes:
                await p.run_once()
        for p in pipes:
            assert p.counts["proposed"] == p.counts["issued"] == p.counts["reported"] == 0
        await asyncio.sleep(0.3)
        assert {a.node_id: len(a.directives.applied) for a in honest} == before
    finally:
        await stop_all(agents)


async def test_report_mismatch_and_custom_rule_are_slashed_by_one_governance_node(
        tmp_path: Path) -> None:
    names = ["gov", "relayer-1", "relayer-2", "sentry-1"]
    agents, ports = await _mesh(names, tmp_path, GovernancePolicy([GA.public_key]))
    gov, r1, _r2, sentry = agents
    try:
        anchored = ports[1].ledger.append(VertexKind.VOLUME_PROOF, OpaqueRecord(
            "pqcnet.relayer.VolumeRecord", "relayer-1", b"bytes=100"), "relayer-1",
            node_key("relayer-1")).id
        await until(lambda: all(p.knows(anchored) for p in ports), 10, "proof synced")

        def over_reported(led: Ledger) -> Iterable[SlashingProposal]:
            """Stands for an over-reporting check: any volume proof claiming > 10^6 bytes."""
            for vid in led.ids():
                v = led.get(vid)
                rec = led.payload(vid)
                if (v.kind == VertexKind.VOLUME_PROOF and isinstance(rec, OpaqueRecord)
                        and rec.body.startswith(b"bytes=")
                        and int(rec.body[6:]) > 10**6):
                    yield SlashingProposal(v.author, "over_report", rec.body.decode(),
                                           (vid,), vid[:16])

        journal = IdJournal(tmp_path / "j-gov")
        pipe = SlashingPipeline(gov, ports[0].ledger, governance_keys=[GA], journal=journal,
                                rules=[over_reported])
        timer = asyncio.create_task(pipe.run(0.05))  # as the node runtime runs it
        try:
            # relayer-1 publishes a report that does not match the vertex it names
            await r1.publish_report(RelayReport("volume_proof", b"bytes=5000", anchored))
            await until(lambda: sentry.keyring.is_revoked("relayer-1"), 15, "mismatch slashed")
            # relayer-2 anchors an absurd claim: the extra rule finds it
            ports[2].ledger.append(VertexKind.VOLUME_PROOF, OpaqueRecord(
                "pqcnet.relayer.VolumeRecord", "relayer-2", b"bytes=99999999"), "relayer-2",
                node_key("relayer-2"))
            await until(lambda: sentry.keyring.is_revoked("relayer-2"), 15, "rule slashed")
        finally:
            timer.cancel()
            await asyncio.gather(timer, return_exceptions=True)
        assert pipe.counts["issued"] == 2 and pipe.counts["proposed"] == 2
        assert pipe.counts["run_failed"] == 0
        kinds = sorted(d.action.reason.split(":")[0] for d in sentry.applied.values()
                       if d.action_name == "slash")
        assert kinds == ["over_report", "volume_mismatch"]
        # restart: the journal on disk remembers both
        again = SlashingPipeline(gov, ports[0].ledger, governance_keys=[GA],
                                 journal=tmp_path / "j-gov", rules=[over_reported])
        await again.run_once()
        assert again.counts["proposed"] == again.counts["issued"] == 0
    finally:
        await stop_all(agents)
