"""A simulated node: the real control-plane agent plus the real objects it steers.

Each node holds, exactly as a deployed one would:

* a :class:`~pqcnet.mesh.agent.ControlPlaneAgent` (envelopes signed, sealed, verified
  with replay windows, skew and revocation; directives verified against the governance
  threshold, anchored, then applied) on a :class:`~pqcnet.sim.transport.SimTransport`;
* directive effects on a real sentry :class:`~pqcnet.sentry.limiter.RateLimiter` and a
  real QSTP :class:`~pqcnet.qstp.tls.PeerGate` (:class:`Effects`);
* a real :class:`~pqcnet.qsdag.Ledger` on a :class:`~pqcnet.sim.memstore.MemoryStore`
  behind the mesh's own ``QsdagPort``, on **every** node: the mesh applies a directive
  only after the node anchored it in its own ledger (anchor-before-effect), so a node
  without one applies nothing. Every store is a copy-on-write layer over the shared
  onboarding state (genesis + every node's registration). Only validators and
  governance (``syncs``) DAG-sync and announce on the topic; the other nodes' ledgers
  hold the onboarding state plus what they anchor themselves.

What survives a crash is what a node keeps on disk: its keys, its ledger store, its
relayer bundle store and a subscriber's delivered-sequence marks (``persistent``).
Everything else — the agent with its replay windows and peer table, the relay state —
is rebuilt by :meth:`SimNode.boot`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pqcnet.crypto.pqc import VerifyKey
from pqcnet.mesh.agent import AgentConfig, ControlPlaneAgent
from pqcnet.mesh.directives import ForceRekey, Outcome, RateLimitUpdate, SlashNotice
from pqcnet.mesh.envelope import Keyring, NodeKeys, VerifierConfig
from pqcnet.mesh.qsdag_port import QsdagPort
from pqcnet.qsdag import DEFAULT_SKEW, Ledger
from pqcnet.qstp.tls import PeerGate
from pqcnet.sentry.limiter import Plan, RateLimiter
from pqcnet.sim.crypto import recipient_key, signing_key
from pqcnet.sim.memstore import MemoryStore
from pqcnet.sim.transport import SimTransport

if TYPE_CHECKING:
    from pqcnet.sim.world import World

#: The sentry plan every node starts with (a rate-limit directive replaces it).
INITIAL_PLAN = Plan(rate=100.0, burst=200.0)
#: Orphans a simulated ledger parks at most (validators sync small DAGs).
SIM_MAX_ORPHANS = 4096


def node_name(idx: int) -> str:
    return f"n{idx:05d}"


class Effects:
    """The node's :class:`~pqcnet.mesh.directives.DirectiveHandler`: real limiter, real gate."""

    def __init__(self, node: SimNode, world: World) -> None:
        self.node = node
        self.world = world
        self.limiter = RateLimiter({}, INITIAL_PLAN)
        self.gate = PeerGate()

    def on_rate_limit(self, update: RateLimitUpdate) -> Outcome:
        now = self.world.engine.now
        self.limiter.set_plans({}, Plan(update.rate_per_s, float(update.burst)), now)
        if self.limiter.plan_for("any-tenant").rate != update.rate_per_s:
            return Outcome.FAILED
        self.world.applied(update, self.node.idx)
        return Outcome.APPLIED

    def on_force_rekey(self, target: ForceRekey) -> Outcome:
        return Outcome.IGNORED

    def on_slash(self, notice: SlashNotice) -> Outcome:
        if notice.target == self.node.name:
            return Outcome.IGNORED
        self.gate.deny(notice.target, notice.reason or "slashed")
        self.world.applied(notice, self.node.idx)
        return Outcome.APPLIED


class SimNode:
    """One simulated node (its index is its network address)."""

    def __init__(self, idx: int, role: str, seed: int, *, syncs: bool) -> None:
        self.idx = idx
        self.role = role
        self.name = node_name(idx)
        self.keys = NodeKeys(self.name, signing_key(seed, self.name), 1,
                             recipient_key(seed, self.name))
        #: does this node DAG-sync (and announce on the topic for seal keys)?
        self.syncs = syncs
        #: the node's disk: survives crashes (set by the world: a layer over onboarding)
        self.store: MemoryStore | None = None
        self.persistent: dict[str, Any] = {}
        self.agent: ControlPlaneAgent | None = None
        self.port: QsdagPort | None = None
        self.effects: Effects | None = None
        self.topics: frozenset[str] = frozenset()
        self.boots = 0

    @property
    def ledger(self) -> Ledger | None:
        return self.port.ledger if self.port is not None else None

    def boot(self, world: World, config: AgentConfig,
             directory: Callable[[str, int], VerifyKey | None]) -> None:
        """(Re)build the node's in-memory runtime on its persistent state."""
        self.boots += 1
        keyring = Keyring()
        transport = SimTransport(self.idx, world.publish_from)
        self.port = None
        if self.store is not None:
            ledger = Ledger(self.store, clock=world.engine.now_s, max_orphans=SIM_MAX_ORPHANS,
                            skew=DEFAULT_SKEW)
            self.port = QsdagPort(ledger, self.keys)
        self.agent = ControlPlaneAgent(self.keys, transport, keyring, config=config,
                                       governance=world.policy, ledger=self.port,
                                       clock=world.engine.now_ms)
        port = self.port

        def lookup(node_id: str, version: int) -> VerifyKey | None:
            # the bootstrap config's key list first, then the ledger's key-version view
            # (rotations). Both hold the same version-1 keys (onboarding registered
            # exactly those), but the directory's are one shared object per node, while
            # each ledger decodes its own copy: N ledgers x N senders native ML-DSA
            # keys, which doubled peak RSS at 1000 nodes.
            found = directory(node_id, version)
            return found if found is not None or port is None else port.key_for(node_id,
                                                                                 version)

        keyring.lookup = lookup
        self.effects = Effects(self, world)
        self.agent.handlers.append(self.effects)
        topics = dict(self.agent.topics)
        if not self.syncs:  # see the module docstring and simulations/README.md
            topics.pop("dagsync", None)
        self.topics = frozenset([*topics.values(), self.agent.my_inbox])

    def halt(self) -> None:
        """Lose everything in memory (crash or leave); the disk stays."""
        self.agent = None
        self.port = None
        self.effects = None


def agent_config(namespace: str, role: str, *, announce_interval_s: float,
                 dag_sync_interval_s: float, tick_s: float) -> AgentConfig:
    """The agent settings of a simulated node."""
    return AgentConfig(
        role=role, namespace=namespace,
        announce_interval_ms=int(announce_interval_s * 1000),
        peer_expiry_ms=int(3 * announce_interval_s * 1000),
        tick_ms=int(tick_s * 1000),
        dag_sync_interval_ms=int(dag_sync_interval_s * 1000),
        verifier=VerifierConfig(),
    )
