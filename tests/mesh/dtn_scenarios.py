"""DTN store-and-forward across restarts, run on both transports (in-process, go-waku).

``n2`` goes away (its agent stops; its stores stay on disk). ``n0`` gossips a
long-lived item, a short-lived one and a CA-signed CRL update; the live peer gets
them at once, ``n0`` holds bundles for ``n2``. Then ``n0`` itself restarts — what it
holds is on disk — and the short-lived item expires. When ``n2`` returns it gets the
long-lived item exactly once and the CRL (applied: newer, CA-signed), never the
expired one; the holder's store no longer holds anything for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from pqcnet.identity import MeshCA
from pqcnet.mesh.agent import AgentConfig, ControlPlaneAgent
from pqcnet.mesh.crl import CrlGate
from pqcnet.mesh.envelope import NodeKeys
from pqcnet.mesh.transport import Transport

from .harness import make_agent, node_key, until

NAMES = ["n0", "n1", "n2"]


async def offline_peer_gets_bundles_on_return(
        transport_for: Callable[[int], Transport], tmp: Path, *, config: AgentConfig,
        limit_s: float = 10.0) -> None:
    """``transport_for(i)``: a fresh transport for node ``i`` (called at each (re)start)."""
    ca = MeshCA.create("dtn.test")
    got: dict[str, list[bytes]] = {n: [] for n in NAMES}

    def agent(i: int) -> ControlPlaneAgent:
        name = NAMES[i]
        a = make_agent(NodeKeys(name, node_key(name)), NAMES, transport_for(i), tmp,
                       config=config)
        a.crl = CrlGate(ca.trust_bundle_pem(), path=tmp / f"crl-{name}.pem")
        a.gossip_listeners.append(lambda item, sender: got[name].append(item.payload))
        return a

    stopped: set[int] = set()

    async def stop(a: ControlPlaneAgent) -> None:
        if id(a) in stopped:
            return
        stopped.add(id(a))
        await a.stop()
        assert a.bundles is not None
        a.bundles.close()

    agents = [agent(i) for i in range(3)]
    try:
        for a in agents:
            await a.start()
        await until(lambda: all(len(a.peers.live(a.clock())) == 2 for a in agents), limit_s,
                    "mesh")
        await stop(agents[2])
        await until(lambda: not agents[0].peers.is_live("n2", agents[0].clock()), limit_s,
                    "n2 seen away")
        victim = ca.issue("spiffe://dtn.test/acme/sidecar/victim")
        ca.revoke(victim)
        crl = ca.crl_pem()
        await agents[0].gossip("anomaly", b"keep", ttl_ms=120_000)
        await agents[0].gossip("anomaly", b"short", ttl_ms=400)
        await agents[0].publish_crl(crl)
        await until(lambda: b"keep" in got["n1"] and b"short" in got["n1"] and crl in got["n1"],
                    limit_s, "live peer got everything")
        holder = agents[0].bundles
        assert holder is not None and len(holder.pending("n2", agents[0].clock())) == 3
        # the holder restarts; the short-lived item expires meanwhile
        await stop(agents[0])
        agents[0] = agent(0)
        await agents[0].start()
        await asyncio.sleep(0.6)
        # n2 returns with the identity, bundle store and CRL file it had
        agents[2] = agent(2)
        await agents[2].start()
        back = agents[2]
        await until(lambda: b"keep" in got["n2"] and back.crl is not None
                    and back.crl.current is not None, limit_s * 3, "bundles after return")
        assert back.crl is not None and back.crl.current is not None
        assert back.crl.current.is_revoked(victim.serial)
        await asyncio.sleep(0.5)
        assert got["n2"].count(b"keep") == 1 and b"short" not in got["n2"]
        assert agents[0].bundles is not None
        assert agents[0].bundles.pending("n2", agents[0].clock()) == []
    finally:
        for a in agents:
            await stop(a)
