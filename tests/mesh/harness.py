"""Shared set-up for agent tests: N agents on one transport factory, fast timers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from mesh.agent import AgentConfig, ControlPlaneAgent
from mesh.directives import GovernancePolicy
from mesh.dtn import BundleStore
from mesh.envelope import Keyring, NodeKeys
from mesh.ledger import LedgerPort
from mesh.transport import Transport
from qstp.pqc import SigningKey

FAST = AgentConfig(announce_interval_ms=150, peer_expiry_ms=500, tick_ms=40,
                   dag_sync_interval_ms=200, gossip_fanout=2)

_KEYS: dict[str, SigningKey] = {}


def node_key(name: str) -> SigningKey:
    """Deterministic per-name ML-DSA key (cached: keygen is the slow part)."""
    if name not in _KEYS:
        seed = (name.encode() * 32)[:32]
        _KEYS[name] = SigningKey.from_seed(seed)
    return _KEYS[name]


GOV = node_key("governance-key")


async def until(cond: Callable[[], bool], limit_s: float = 10.0, what: str = "") -> None:
    """Poll ``cond`` until true; fail with ``what`` after ``limit_s`` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit_s
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await asyncio.sleep(0.02)


def make_agents(names: list[str], transports: list[Transport], tmp: Path, *,
                config: AgentConfig = FAST,
                ledgers: list[LedgerPort] | None = None) -> list[ControlPlaneAgent]:
    keys = [NodeKeys(n, node_key(n)) for n in names]
    agents = []
    for i, (k, t) in enumerate(zip(keys, transports)):
        ring = Keyring()
        for other in keys:
            ring.add(other.node_id, other.signing_key.public_key, other.key_version)
        agents.append(ControlPlaneAgent(
            NodeKeys(k.node_id, k.signing_key), t, ring, config=config,
            governance=GovernancePolicy([GOV.public_key]),
            ledger=ledgers[i] if ledgers else None,
            bundles=BundleStore(tmp / f"bundles-{k.node_id}", sync=False),
        ))
    return agents


async def stop_all(agents: list[ControlPlaneAgent]) -> None:
    for a in agents:
        await a.stop()
        if a.bundles is not None:
            a.bundles.close()
