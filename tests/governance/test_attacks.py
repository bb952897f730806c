"""Governance integrity, from the attacker's chair.

Four agents on the embedded control plane, each with its own QS-DAG: ``governance``
(the node governance publishes through), ``sentry-1``, ``relayer-1`` and ``mallory``,
an ordinary registered node that tries to claim an authority it does not have.
Directives need 2 of 3 governance keys. Every attempt must have no effect and be
counted by reason; genuine directives must keep working afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pqcnet.identity import MeshCA
from pqcnet.mesh.agent import ControlPlaneAgent
from pqcnet.mesh.crl import CrlGate
from pqcnet.mesh.directives import (
    Directive,
    GovernancePolicy,
    RateLimitUpdate,
    SignedDirective,
    SlashNotice,
    sign_directive,
)
from pqcnet.mesh.envelope import MessageType, NodeKeys
from pqcnet.mesh.errors import CrlRejected
from pqcnet.mesh.messages import SlashingProposal
from pqcnet.mesh.qsdag_port import QsdagPort
from pqcnet.mesh.transport import InProcessHub, InProcessTransport
from pqcnet.qsdag import Ledger, VertexKind
from pqcnet.qsdag.slashing import SlashNotice as LedgerSlash

from ..mesh.harness import (
    GOV,
    Recorder,
    attach_ledgers,
    bootstrap_ledgers,
    make_agent,
    make_agents,
    node_key,
    stop_all,
    until,
)

pytestmark = pytest.mark.timeout(90)

NAMES = ["governance", "sentry-1", "relayer-1", "mallory"]
GOV_KEYS = [GOV, node_key("governance-key-2"), node_key("governance-key-3")]
TD = "attack.test"


def policy() -> GovernancePolicy:
    return GovernancePolicy([k.public_key for k in GOV_KEYS], threshold=2)


@dataclasses.dataclass
class Mesh:
    hub: InProcessHub
    agents: list[ControlPlaneAgent]
    transports: list[InProcessTransport]
    ports: list[QsdagPort]
    recorders: dict[str, Recorder]
    ca: MeshCA

    def __getitem__(self, name: str) -> ControlPlaneAgent:
        return self.agents[NAMES.index(name)]


@contextlib.asynccontextmanager
async def mesh(tmp: Path) -> AsyncIterator[Mesh]:
    hub = InProcessHub()
    ts = [InProcessTransport(hub) for _ in NAMES]
    agents = make_agents(NAMES, list(ts), tmp)
    ca = MeshCA.create(TD)
    recorders = {}
    for a in agents:
        a.governance = policy()
        a.crl = CrlGate(ca.trust_bundle_pem())
        recorders[a.node_id] = rec = Recorder()
        a.handlers.append(rec)
    ports = attach_ledgers(agents, bootstrap_ledgers(NAMES, tmp))
    try:
        for a in agents:
            await a.start()
        await until(lambda: all(len(a.peers.live(a.clock())) == 3 for a in agents), 20, "mesh")
        yield Mesh(hub, agents, ts, ports, recorders, ca)
    finally:
        await stop_all(agents)


def _limit(rate: float, *keys: object, now: int) -> SignedDirective:
    return sign_directive(Directive.create(RateLimitUpdate("*", rate, 5), now_ms=now),
                          *keys)  # type: ignore[arg-type]


async def test_revocation_gossip_of_the_governance_sender_has_no_effect(tmp_path: Path) -> None:
    """Issue reproduction: one ordinary node gossips a revocation of the node governance
    publishes through; before the fix every receiver dropped later genuine directives."""
    async with mesh(tmp_path) as m:
        gov, sentry, relayer, mallory = m.agents
        await mallory.gossip("revocation", b"governance")
        await until(lambda: all(a.events["advisory_revocation"] == 1
                                for a in (gov, sentry, relayer)), 10, "revocation gossiped")
        for a in (gov, sentry, relayer):
            assert not a.keyring.is_revoked("governance")
        genuine = _limit(3.0, *GOV_KEYS[:2], now=gov.clock())
        await gov.issue_directive(genuine)
        await until(lambda: all(m.recorders[n].limits for n in ("sentry-1", "relayer-1")),
                    10, "genuine directive applied")
        assert sentry.drops["revoked"] == relayer.drops["revoked"] == 0
        assert m.recorders["sentry-1"].limits == [RateLimitUpdate("*", 3.0, 5)]


async def test_forged_and_under_threshold_slashes_have_no_effect(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        gov, sentry, relayer, mallory = m.agents
        now = mallory.clock()
        d = Directive.create(SlashNotice("sentry-1", "forged"), now_ms=now)
        raw = d.encode()
        attempts = [
            sign_directive(d, node_key("mallory")),         # a node key, not governance
            sign_directive(d, GOV_KEYS[0]),                  # k-1 governance keys
            sign_directive(d, GOV_KEYS[1], GOV_KEYS[1]),     # one key twice is still one
            SignedDirective(d, raw, ((GOV_KEYS[0].public_key.key_id, b"\x01" * 3309),
                                     (GOV_KEYS[1].public_key.key_id, b"\x02" * 3309))),
        ]
        for forged in attempts:
            await mallory.publisher.publish(mallory.topics["governance"],
                                            MessageType.GOVERNANCE_DIRECTIVE, forged.encode())
        # ... the same through the ledger: mallory anchors a k-1 slash in its own QS-DAG,
        # which DAG sync carries to every node (directives found there are verified too)
        m.ports[3].anchor_directive(attempts[1].encode(), "sentry-1")
        # ... a ledger-level slash notice by a node that is no registrar authority
        own = m.ports[3].ledger
        notice = own.build_vertex("mallory", node_key("mallory"),
                                  VertexKind.GOVERNANCE_DIRECTIVE,
                                  LedgerSlash("sentry-1", "forged", 1).to_record())
        # ... and a slashing proposal, which is advice for governance, nothing more
        await mallory.propose_slashing(SlashingProposal("sentry-1", "equivocation", "trust me"))
        # 4 published + 1 synced, refused and counted by reason on every honest node
        await until(lambda: all(a.directives.rejections["under_threshold"] >= 5
                                and a.events["directive_rejected"] >= 5
                                for a in (gov, sentry, relayer)), 15, "forgeries refused")
        for p in m.ports[:3]:
            assert p.import_vertices([notice.encode()]) == 0
            assert p.refused["InvalidPayload"] >= 1
        await until(lambda: relayer.proposals, 5, "proposal recorded")
        for a, p in zip(m.agents[:3], m.ports[:3]):
            assert not a.keyring.is_revoked("sentry-1")
            assert not p.is_disabled("sentry-1") and not p.ledger.is_slashed("sentry-1")
            assert "sentry-1" not in [s.target for s in m.recorders[a.node_id].slashes]
        assert sentry.peers.is_live("relayer-1", sentry.clock())
        assert relayer.peers.is_live("sentry-1", relayer.clock())
        # a genuine 2-of-3 directive still works
        await gov.issue_directive(_limit(4.0, GOV_KEYS[0], GOV_KEYS[2], now=gov.clock()))
        await until(lambda: m.recorders["relayer-1"].limits, 10, "genuine directive")


async def test_forged_and_stale_crls_are_refused(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        gov, sentry, relayer, mallory = m.agents
        node = m.ca.issue(f"spiffe://{TD}/acme/sidecar/victim")
        m.ca.revoke(node)
        older = m.ca.crl_pem()
        newer = m.ca.crl_pem()
        number = m.ca.crl_number
        swapped: list[int] = []
        relayer.crl.listeners.append(lambda crl: swapped.append(crl.number))  # type: ignore[union-attr]
        await gov.publish_crl(newer)
        await until(lambda: all(a.crl is not None and a.crl.current is not None
                                for a in m.agents), 10, "CRL gossiped")
        assert swapped == [number] and relayer.crl.current.is_revoked(node.serial)  # type: ignore[union-attr]
        # a CRL signed by a rogue CA with the same name, and yesterday's genuine CRL
        rogue = MeshCA.create(TD)
        with pytest.raises(CrlRejected) as err:
            await mallory.publish_crl(rogue.crl_pem())
        assert err.value.reason == "crl_untrusted"
        for dest in ("governance", "sentry-1", "relayer-1"):  # refused CRLs are not forwarded
            await mallory.gossip("crl", rogue.crl_pem(), destination=dest)
            await mallory.gossip("crl", older, destination=dest)
        await until(lambda: all(a.drops["crl_untrusted"] >= 1 and a.drops["crl_stale"] >= 1
                                for a in (gov, sentry, relayer)), 10, "bad CRLs dropped")
        for a in (gov, sentry, relayer):
            assert a.crl is not None and a.crl.current is not None
            assert a.crl.current.number == number
        assert swapped == [number]


async def test_replayed_directive_has_no_effect_also_after_a_restart(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        gov, sentry = m["governance"], m["sentry-1"]
        d = _limit(2.0, *GOV_KEYS[1:], now=gov.clock())
        await gov.issue_directive(d)
        await until(lambda: m.recorders["sentry-1"].limits, 10, "applied")
        captured = gov.signer.wire(MessageType.GOVERNANCE_DIRECTIVE, d.encode(),
                                   now_ms=gov.clock())
        await gov.issue_directive(d)                          # same directive, new envelope
        for _ in range(2):                                    # the same envelope twice
            await gov.transport.publish(gov.topics["governance"], captured)
        await until(lambda: sentry.directives.rejections["replay"] >= 2
                    and sentry.drops["replay"] >= 1, 10, "replays refused")
        assert m.recorders["sentry-1"].limits == [RateLimitUpdate("*", 2.0, 5)]
        # restart the sentry: new process state, same ledger on disk
        await sentry.stop()
        assert sentry.bundles is not None
        sentry.bundles.close()
        path = tmp_path / "ledger-sentry-1"
        m.ports[1].ledger.close()
        back = make_agent(NodeKeys("sentry-1", node_key("sentry-1")), NAMES,
                          InProcessTransport(m.hub), tmp_path)
        back.governance = policy()
        back.ledger = QsdagPort(Ledger.open(path), back.keys)
        assert d.directive.directive_id in back.applied    # the window came from the ledger
        rec = Recorder()
        back.handlers.append(rec)
        m.agents[1] = back
        await back.start()
        await until(lambda: back.peers.is_live("governance", back.clock()), 10, "back")
        # the captured envelope is fresh for the new verifier; the directive is not
        await gov.transport.publish(gov.topics["governance"], captured)
        await gov.issue_directive(d)
        await until(lambda: back.directives.rejections["replay"] >= 2, 10, "replay refused")
        assert rec.limits == []
        # a new directive is applied as usual
        await gov.issue_directive(_limit(9.0, *GOV_KEYS[:2], now=gov.clock()))
        await until(lambda: rec.limits == [RateLimitUpdate("*", 9.0, 5)], 10, "new one")
