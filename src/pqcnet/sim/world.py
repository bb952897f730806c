"""The simulated world: clock, network, relay layer, nodes, governance, faults.

A :class:`World` is built from a :class:`~pqcnet.sim.config.Scenario`; a workload
(:mod:`pqcnet.sim.workloads`) schedules what happens in it and reads the outcome. The
world owns the plumbing every workload shares: roles, joins, churn, partitions,
publication and delivery (recorded in the :class:`~pqcnet.sim.metrics.Recorder`),
governance directives, and the base summary (bytes, relay counters, verification
counts).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import Any

from pqcnet.crypto.pqc import VerifyKey
from pqcnet.mesh.directives import (
    Action,
    Directive,
    GovernancePolicy,
    RateLimitUpdate,
    SlashNotice,
    sign_directive,
)
from pqcnet.mesh.envelope import MessageType
from pqcnet.mesh.messages import Announcement
from pqcnet.mesh.transport import WakuMessage, topic_map
from pqcnet.qsdag import Ledger
from pqcnet.sim.config import Scenario
from pqcnet.sim.crypto import VerifyStats, signing_key
from pqcnet.sim.engine import Engine, Streams
from pqcnet.sim.gossipsub import Relay, RelayMessage
from pqcnet.sim.memstore import MemoryStore
from pqcnet.sim.metrics import Recorder
from pqcnet.sim.network import Network
from pqcnet.sim.node import SimNode, agent_config
from pqcnet.sim.transport import drive

NAMESPACE = "sim"
NETWORK_NAME = "pqcnet-sim"
#: Directive lifetime in the simulation.
DIRECTIVE_TTL_MS = 3_600_000

ROLE_ORDER = ("governance", "relayer", "validator", "publisher", "subscriber", "forger",
              "replayer")


class World:
    """Everything one run simulates."""

    def __init__(self, scenario: Scenario, verify_stats: VerifyStats | None = None) -> None:
        self.sc = scenario
        self.seed = scenario.seed
        self.engine = Engine()
        self.streams = Streams(scenario.seed)
        n = scenario.nodes
        self.net = Network(self.engine, scenario.network, n, self.streams)
        self.relay = Relay(self.engine, self.net, scenario.gossipsub, self.streams,
                           self.deliver)
        self.rec = Recorder(n, max_records=scenario.max_records)
        self.verify_stats = verify_stats or VerifyStats()
        self.topics = topic_map(NAMESPACE)
        self._kind_of_topic = {t: name for name, t in self.topics.items()}
        self.roles = self._assign_roles()
        sync_roles = {"governance", "validator"}
        self.nodes = [SimNode(i, self.roles[i], self.seed, syncs=self.roles[i] in sync_roles)
                      for i in range(n)]
        self.by_role: dict[str, list[int]] = {}
        for i, role in enumerate(self.roles):
            self.by_role.setdefault(role, []).append(i)
        self.gov = self.by_role["governance"][0]
        self.gov_key = signing_key(self.seed, "governance-key")
        self.policy = GovernancePolicy([self.gov_key.public_key], 1)
        self._directory = {node.name: node.keys.signing_key.public_key for node in self.nodes}
        self._labels: dict[Action, str] = {}
        self.joined = [math.inf] * n
        self.handled: Counter[str] = Counter()
        #: bytes sent outside the relay (direct announcements), by kind
        self.direct_bytes: Counter[str] = Counter()
        #: (kind, node) results of handling adversarial messages: "dropped" / "accepted"
        self.adversarial: Counter[str] = Counter()
        self.on_handled: list[Callable[[SimNode, RelayMessage, bool], None]] = []
        #: called after a node (re)boots / before it goes down (workload hooks)
        self.on_boot: list[Callable[[SimNode], None]] = []
        self.on_down: list[Callable[[int, bool], None]] = []
        #: (label, node) -> times a directive's effect was applied (must stay 1)
        self.applications: Counter[tuple[str, int]] = Counter()
        #: called with every published relay message (adversaries capture here)
        self.relay_hooks: list[Callable[[RelayMessage], None]] = []
        self._make_genesis()

    # ------------------------------------------------------------------ setup

    def _assign_roles(self) -> list[str]:
        sc = self.sc
        counts = {"governance": sc.roles.governance, "relayer": sc.roles.relayers,
                  "validator": sc.roles.validators, "publisher": sc.roles.publishers,
                  "subscriber": sc.roles.subscribers, "forger": sc.adversaries.forgers,
                  "replayer": sc.adversaries.replayers}
        order = list(range(sc.nodes))
        self.streams["roles"].shuffle(order)
        roles = ["sentry"] * sc.nodes
        k = 0
        for role in ROLE_ORDER:
            for _ in range(counts[role]):
                roles[order[k]] = role
                k += 1
        return roles

    def directory(self, node_id: str, version: int) -> VerifyKey | None:
        """The bootstrap config's key list (every node's version-1 key)."""
        return self._directory.get(node_id) if version == 1 else None

    def _make_genesis(self) -> None:
        """Governance writes genesis and registers every node's key (what onboarding
        does); every node's store is a copy-on-write layer over that shared state, so
        each can anchor the directives it applies (anchor-before-effect)."""
        gov = self.nodes[self.gov]
        base = MemoryStore()
        ledger = Ledger(base, clock=self.engine.now_s, max_orphans=64, skew=30.0)
        ledger.init_genesis(NETWORK_NAME, gov.name, gov.keys.signing_key)
        for node in self.nodes:
            if node.idx != self.gov:
                ledger.register_author(node.name, node.keys.signing_key.public_key,
                                       registrar=gov.name, signer=gov.keys.signing_key)
        self.base_store = base
        for node in self.nodes:
            node.store = MemoryStore(base=base)

    def config_for(self, node: SimNode) -> Any:
        a = self.sc.agent
        return agent_config(NAMESPACE, node.role, announce_interval_s=a.announce_interval_s,
                            dag_sync_interval_s=a.dag_sync_interval_s if node.syncs else 0.0,
                            tick_s=a.tick_s)

    # ------------------------------------------------------------------ membership

    def join(self, i: int) -> None:
        """Node ``i`` comes up (first join or restart)."""
        node = self.nodes[i]
        if self.net.online[i]:
            return
        if self.joined[i] == math.inf:
            self.joined[i] = self.engine.now
        else:
            self.rec.node_up(i, self.engine.now)
        node.boot(self, self.config_for(node), self.directory)
        self.relay.start_node(i)
        for fn in self.on_boot:
            fn(node)
        if self._ticks(node):
            self.engine.after(self.streams["ticks"].random() * self.sc.agent.tick_s,
                              self._tick, i, node.boots)

    def leave(self, i: int, *, crash: bool) -> None:
        if not self.net.online[i]:
            return
        for fn in self.on_down:
            fn(i, crash)
        self.relay.stop_node(i, crash=crash)
        self.nodes[i].halt()
        self.rec.node_down(i, self.engine.now)

    def _ticks(self, node: SimNode) -> bool:
        return node.syncs or self.sc.agent.announce != "none"

    def _tick(self, i: int, boot: int) -> None:
        node = self.nodes[i]
        if node.agent is None or node.boots != boot:
            return
        self.engine.after(self.sc.agent.tick_s, self._tick, i, boot)
        if self.sc.agent.announce == "peers":
            self._announce_to_peers(node)
        # agent.tick announces on the topic: only where the scenario wants that, and on
        # ledger nodes, which need each other's seal keys for DAG sync
        if self.sc.agent.announce != "topic" and not node.syncs:
            return
        drive(node.agent.tick())

    def _announce_to_peers(self, node: SimNode) -> None:
        """Partial view: send our announcement to the peers we hold connections to."""
        agent = node.agent
        assert agent is not None
        now = self.engine.now_ms()
        last = node.persistent.get("announced_ms", -math.inf)
        if now - last < self.sc.agent.announce_interval_s * 1000:
            return
        node.persistent["announced_ms"] = now
        wire = agent.signer.wire(MessageType.NODE_ANNOUNCEMENT, agent.announcement().encode(),
                                 now_ms=now)
        r = self.relay.routers[node.idx]
        if r is None:
            return
        size = len(wire) + self.sc.gossipsub.rpc_overhead
        for p in list(r.peers):
            if self.net.send(node.idx, p, size, self._direct_announcement, p, wire):
                self.direct_bytes["announce"] += size

    def _direct_announcement(self, i: int, wire: bytes) -> None:
        node = self.nodes[i]
        if node.agent is not None:
            self.handled["announce"] += 1
            drive(node.agent.handle(WakuMessage(self.topics["announce"], wire)))

    # ------------------------------------------------------------------ relay plumbing

    def publish_from(self, i: int, content_topic: str, payload: bytes,
                     kind: str | None = None) -> int:
        k = kind or self._kind_of_topic.get(content_topic, "inbox")
        mid = self.relay.publish(i, content_topic, payload, k)
        if mid >= 0:
            msg = self.relay.messages[mid]
            self.rec.published(mid, k, i, msg.t0, msg.size)
            for fn in self.relay_hooks:
                fn(msg)
        return mid

    def deliver(self, i: int, msg: RelayMessage, hops: int) -> None:
        self.rec.received(i, msg.mid, msg.kind, msg.t0, self.engine.now, hops)
        node = self.nodes[i]
        if node.agent is None or msg.content_topic not in node.topics:
            return
        self.handled[msg.kind] += 1
        before = sum(node.agent.drops.values()) + node.agent.events["directive_rejected"]
        drive(node.agent.handle(WakuMessage(msg.content_topic, msg.payload,
                                            int(msg.t0 * 1e9))))
        dropped = (sum(node.agent.drops.values())
                   + node.agent.events["directive_rejected"]) > before
        for fn in self.on_handled:
            fn(node, msg, dropped)

    # ------------------------------------------------------------------ governance

    def label(self, action: Action, label: str) -> None:
        self._labels[action] = label

    def applied(self, action: Action, idx: int) -> None:
        label = self._labels.get(action)
        if label is not None:
            self.applications[(label, idx)] += 1
            self.rec.apply(label, idx, self.engine.now)

    def issue(self, action: Action, label: str) -> None:
        """Governance signs ``action`` and publishes it from its node."""
        node = self.nodes[self.gov]
        if node.agent is None:
            return
        self.label(action, label)
        rng = self.streams["directive-ids"]
        now = self.engine.now_ms()
        directive = Directive(rng.randbytes(16), now, now + DIRECTIVE_TTL_MS, action)
        self.rec.issue(label, self.engine.now)
        drive(node.agent.issue_directive(sign_directive(directive, self.gov_key)))

    def rate_limit(self, rate: float, burst: int, label: str) -> None:
        self.issue(RateLimitUpdate("*", rate, burst), label)

    def slash(self, target: int, reason: str, label: str) -> None:
        self.issue(SlashNotice(self.nodes[target].name, reason), label)

    # ------------------------------------------------------------------ faults

    def schedule_joins(self, window_s: float) -> None:
        rng = self.streams["joins"]
        for i in range(self.sc.nodes):
            t = rng.random() * window_s if window_s else 0.0
            if i == self.gov:
                t = 0.0
            self.engine.at(t, self.join, i)

    def schedule_churn(self, start_s: float) -> None:
        """Poisson churn at ``rate_per_hour`` of the (non-exempt) nodes."""
        c = self.sc.churn
        if c.rate_per_hour <= 0:
            return
        pool = [i for i, r in enumerate(self.roles) if r not in c.exempt]
        if not pool:
            return
        rng = self.streams["churn"]
        rate = c.rate_per_hour * len(pool) / 3600.0
        end = self.sc.duration_s - c.settle_s
        t = start_s
        while True:
            t += rng.expovariate(rate)
            if t >= end:
                break
            i = pool[rng.randrange(len(pool))]
            crash = rng.random() < c.crash_share
            down = rng.uniform(c.min_down_s, c.max_down_s)
            self.engine.at(t, self._churn_down, i, crash, min(t + down, end))

    def _churn_down(self, i: int, crash: bool, up_at: float) -> None:
        if not self.net.online[i]:
            return
        self.leave(i, crash=crash)
        self.engine.at(max(up_at, self.engine.now), self.join, i)

    def schedule_partition(self) -> list[int]:
        p = self.sc.partition
        if not p.heal_s:
            return []
        order = [i for i in range(self.sc.nodes) if i != self.gov]
        self.streams["partition"].shuffle(order)
        minority = sorted(order[:int(p.fraction * self.sc.nodes)])
        self.engine.at(p.at_s, self._split, minority)
        self.engine.at(p.heal_s, self._heal)
        return minority

    def _split(self, minority: list[int]) -> None:
        self.net.split(minority)
        self.rec.partitions.append([self.engine.now, math.inf])
        self.relay.cut_partition()

    def _heal(self) -> None:
        self.net.heal()
        if self.rec.partitions:
            self.rec.partitions[-1][1] = self.engine.now

    # ------------------------------------------------------------------ reporting

    def population(self, roles: tuple[str, ...] = ("sentry", "relayer", "validator",
                                                   "publisher", "subscriber")) -> list[int]:
        return [i for i, r in enumerate(self.roles) if r in roles]

    def honest_online(self, t0: float, t1: float) -> list[int]:
        """Honest nodes (not adversaries) up for the whole of [t0, t1]."""
        return [i for i in self.population() if self.joined[i] <= t0
                and self.rec.up_throughout(i, t0, t1)]

    def announcement_of(self, idx: int) -> Announcement:
        agent = self.nodes[idx].agent
        assert agent is not None
        return agent.announcement()
