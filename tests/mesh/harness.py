"""Shared set-up for agent tests: N agents on one transport factory, fast timers.

Directives are applied only after they are anchored in the receiving node's QS-DAG, so
agents that must obey directives get a ledger: :func:`bootstrap_ledgers` makes one per
node, all holding the same genesis (``names[0]`` the registrar) and every node's key.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from pqcnet.crypto.pqc import SigningKey
from pqcnet.mesh.agent import AgentConfig, ControlPlaneAgent
from pqcnet.mesh.directives import (
    Action,
    ForceRekey,
    GovernancePolicy,
    Outcome,
    RateLimitUpdate,
    SignedDirective,
    SlashNotice,
)
from pqcnet.mesh.dtn import BundleStore
from pqcnet.mesh.envelope import Keyring, NodeKeys, now_ms
from pqcnet.mesh.ledger import LedgerPort
from pqcnet.mesh.qsdag_port import QsdagPort, directive_body
from pqcnet.mesh.transport import Transport
from pqcnet.qsdag import Ledger

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


class Recorder:
    """A DirectiveHandler that records what it is told and reports ``applied`` for the
    actions in ``applies`` (``ignored`` for the rest): a stand-in consumer for dispatch
    tests (the real sentry limiter and QSTP bindings run in tests/governance)."""

    def __init__(self, applies: frozenset[str] = frozenset({"rate_limit", "force_rekey",
                                                           "slash"})) -> None:
        self.applies = applies
        self.limits: list[RateLimitUpdate] = []
        self.rekeys: list[ForceRekey] = []
        self.slashes: list[SlashNotice] = []

    def _say(self, action: str) -> Outcome:
        return Outcome.APPLIED if action in self.applies else Outcome.IGNORED

    def on_rate_limit(self, update: RateLimitUpdate) -> Outcome:
        self.limits.append(update)
        return self._say("rate_limit")

    async def on_force_rekey(self, target: ForceRekey) -> Outcome:
        self.rekeys.append(target)
        return self._say("force_rekey")

    def on_slash(self, target: SlashNotice) -> Outcome:
        self.slashes.append(target)
        return self._say("slash")


async def until(cond: Callable[[], bool], limit_s: float = 10.0, what: str = "") -> None:
    """Poll ``cond`` until true; fail with ``what`` after ``limit_s`` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit_s
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await asyncio.sleep(0.02)


def make_agent(keys: NodeKeys, members: list[str], transport: Transport, tmp: Path, *,
               config: AgentConfig = FAST,
               ledger: LedgerPort | None = None,
               clock: Callable[[], int] = now_ms) -> ControlPlaneAgent:
    """One agent whose keyring holds every member's bootstrap key; its bundle store
    lives at ``tmp/bundles-<node>`` (so a restarted agent finds its bundles)."""
    ring = Keyring()
    for n in members:
        ring.add(n, node_key(n).public_key, 1)
    return ControlPlaneAgent(
        keys, transport, ring, config=config, governance=GovernancePolicy([GOV.public_key]),
        ledger=ledger, bundles=BundleStore(tmp / f"bundles-{keys.node_id}", sync=False),
        clock=clock)


def make_agents(names: list[str], transports: list[Transport], tmp: Path, *,
                config: AgentConfig = FAST,
                ledgers: list[LedgerPort] | None = None) -> list[ControlPlaneAgent]:
    return [make_agent(NodeKeys(n, node_key(n)), names, t, tmp, config=config,
                       ledger=ledgers[i] if ledgers else None)
            for i, (n, t) in enumerate(zip(names, transports))]


def bootstrap_ledgers(names: list[str], tmp: Path, *, registrar_only: bool = False,
                      prefix: str = "ledger") -> list[Ledger]:
    """One RocksDB ledger per node at ``tmp/<prefix>-<node>``; ``names[0]`` makes the
    genesis and registers every other node. The others start with a copy of it, or
    (``registrar_only``) empty, learning it by DAG sync."""
    first = Ledger.open(tmp / f"{prefix}-{names[0]}")
    first.init_genesis("pqcnet-test", names[0], node_key(names[0]))
    for n in names[1:]:
        first.register_author(n, node_key(n).public_key, registrar=names[0],
                              signer=node_key(names[0]))
    out = [first]
    for n in names[1:]:
        led = Ledger.open(tmp / f"{prefix}-{n}")
        if not registrar_only:
            led.import_(first.export(first.tips()))
        out.append(led)
    return out


def attach_ledgers(agents: list[ControlPlaneAgent], ledgers: list[Ledger]) -> list[QsdagPort]:
    """Give each agent its ledger (through the real port); returns the ports."""
    ports = []
    for a, led in zip(agents, ledgers):
        port = QsdagPort(led, a.keys)
        a.ledger = port
        ports.append(port)
    return ports


def anchored_by_itself(port: QsdagPort, action: Action) -> bool:
    """Has the port's node anchored, in a vertex of its own, a directive with ``action``?"""
    led, me = port.ledger, port.keys.node_id
    for counter in range(led.next_counter(me)):
        vid = led.by_author(me, counter)
        body = directive_body(led.get(vid)) if vid is not None else None
        if body is not None and SignedDirective.decode(body).directive.action == action:
            return True
    return False


async def stop_all(agents: list[ControlPlaneAgent]) -> None:
    """Stop every agent and close what it owns (bundle store, ledger)."""
    for a in agents:
        await a.stop()
        if a.bundles is not None:
            a.bundles.close()
        if isinstance(a.ledger, QsdagPort):
            a.ledger.ledger.close()
