"""The ``pqcnet mesh demo`` scenario: three agents on the in-process transport.

Each node keeps its own QS-DAG (the governance node makes the genesis and registers the
others), because a directive takes effect only once anchored in the node's own ledger.
A governance directive lowers a rate limit on a sentry and a relayer; a peer's
"revocation" gossip is shown to be advisory (no authority travels in gossip); an anomaly
report is gossiped while one node is offline, and that node receives it from the DTN
bundle store when it returns. Returns a summary dict (printed as JSON by the command).
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from tqdm import tqdm

from pqcnet.crypto.pqc import SigningKey
from pqcnet.mesh.agent import AgentConfig, ControlPlaneAgent
from pqcnet.mesh.directives import (
    Directive,
    ForceRekey,
    GovernancePolicy,
    Outcome,
    RateLimitUpdate,
    SlashNotice,
    sign_directive,
)
from pqcnet.mesh.dtn import BundleStore
from pqcnet.mesh.envelope import Keyring, NodeKeys
from pqcnet.mesh.messages import GossipItem
from pqcnet.mesh.qsdag_port import QsdagPort
from pqcnet.mesh.transport import InProcessHub, InProcessTransport
from pqcnet.qsdag import Ledger

_CFG = AgentConfig(announce_interval_ms=100, peer_expiry_ms=400, tick_ms=30)


class _Limits:
    def __init__(self) -> None:
        self.current: RateLimitUpdate | None = None

    def on_rate_limit(self, update: RateLimitUpdate) -> Outcome:
        self.current = update
        return Outcome.APPLIED

    def on_force_rekey(self, target: ForceRekey) -> Outcome:
        return Outcome.IGNORED

    def on_slash(self, target: SlashNotice) -> Outcome:
        return Outcome.IGNORED


def _ledgers(keys: list[NodeKeys], tmp: Path) -> list[Ledger]:
    """The first node makes the genesis and registers the others, who start from a copy."""
    first = Ledger.open(tmp / f"ledger-{keys[0].node_id}", sync=False)
    first.init_genesis("pqcnet-mesh-demo", keys[0].node_id, keys[0].signing_key)
    for k in keys[1:]:
        first.register_author(k.node_id, k.signing_key.public_key,
                              registrar=keys[0].node_id, signer=keys[0].signing_key)
    out = [first]
    for k in keys[1:]:
        led = Ledger.open(tmp / f"ledger-{k.node_id}", sync=False)
        led.import_(first.export(first.tips()))
        out.append(led)
    return out


async def _wait(cond: object, limit_s: float = 10.0) -> bool:
    for _ in range(int(limit_s / 0.02)):
        if callable(cond) and cond():
            return True
        await asyncio.sleep(0.02)
    return False


async def run_demo() -> dict[str, object]:
    gov_key = SigningKey.generate()
    names = ["governance", "sentry-1", "relayer-1"]
    keys = [NodeKeys.generate(n) for n in names]
    hub = InProcessHub()
    transports = [InProcessTransport(hub) for _ in names]
    with tempfile.TemporaryDirectory() as tmp:
        ledgers = _ledgers(keys, Path(tmp))
        agents = []
        for k, t, led in zip(keys, transports, ledgers):
            ring = Keyring()
            for other in keys:
                ring.add(other.node_id, other.signing_key.public_key, 1)
            agents.append(ControlPlaneAgent(
                k, t, ring, config=_CFG, governance=GovernancePolicy([gov_key.public_key]),
                ledger=QsdagPort(led, k),
                bundles=BundleStore(Path(tmp) / k.node_id, sync=False)))
        gov, _sentry, relayer = agents
        limits = {a.node_id: _Limits() for a in agents[1:]}
        for a in agents[1:]:
            a.handlers.append(limits[a.node_id])
        got: list[str] = []

        def _record(item: GossipItem, sender: str) -> None:
            got.append(item.payload.decode())

        relayer.gossip_listeners.append(_record)
        steps = tqdm(total=4, desc="mesh demo", unit="step")
        try:
            for a in agents:
                await a.start()
            formed = await _wait(lambda: all(len(a.peers.live(a.clock())) == 2 for a in agents))
            steps.update()
            d = sign_directive(Directive.create(RateLimitUpdate("*", 5.0, 10),
                                                now_ms=gov.clock()), gov_key)
            await gov.issue_directive(d)
            applied = await _wait(lambda: all(x.current for x in limits.values()))
            steps.update()
            transports[2].online = False
            await _wait(lambda: not gov.peers.is_live("relayer-1", gov.clock()))
            await gov.gossip("anomaly", b"node-x: volume claims above its clients' counters")
            bundled = len(gov.bundles or [])
            steps.update()
            transports[2].online = True
            delivered = await _wait(lambda: any(g.startswith("node-x") for g in got))
            # a peer (not the CA, not governance) claims a revocation: advisory only
            await _sentry.gossip("revocation", b"governance")
            advisory = await _wait(lambda: relayer.events["advisory_revocation"] > 0, 3.0)
            steps.update()
        finally:
            steps.close()
            for a in agents:
                await a.stop()
                if a.bundles is not None:
                    a.bundles.close()
            for led in ledgers:
                led.close()
    return {
        "mesh_formed": formed,
        "rate_limit_applied": {n: (x.current.rate_per_s if x.current else None)
                               for n, x in limits.items()},
        "directive_applied_everywhere": applied,
        "bundles_held_while_offline": bundled,
        "anomaly_delivered_after_reconnect": delivered,
        "peer_revocation_was_advisory": advisory,
        "relayer_revoked_governance": relayer.keyring.is_revoked("governance"),
    }
