"""The six scenario workloads: what happens in the world, and what it is judged on.

Each workload schedules its events on a built :class:`~pqcnet.sim.world.World`, samples
its state once per simulated second (``sample``), and reports its section of the
summary (``results``). The shared relay/bandwidth section comes from
:func:`pqcnet.sim.report_data.relay_section`.

=============  =================================================================
formation      joins over a window; relayers advertise their shards; time until each
               node's mesh degree is in [D_lo, D_hi], its peer table within bounds and
               its routing cache covers every shard owner
directive      a rate-limit update, then a slash of a relayer; application times at
               50/99/100 %; the slashed relayer's control messages and tunnel dials
               refused by every node that applied the slash
churn          nodes leave/crash at a rate per hour while publishers' frames flow
               through relayers to subscribers (DTN replay); relay and frame delivery
partition      validators append and DAG-sync; the network splits and heals; time
               until every validator's ledger has the same tips
adversaries    forgers, replayers, equivocating validators, over-reporting relayers;
               drops, detection, time to slashing, precision/recall
scale          10 kB messages at a fixed rate: propagation latency against Waku's
               Shadow figures, cost per node
=============  =================================================================
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from pqcnet.identity.spiffe import SpiffeId
from pqcnet.mesh.messages import RouteEntry
from pqcnet.mesh.transport import content_topic
from pqcnet.qsdag import OpaqueRecord, VertexKind
from pqcnet.sim.adversary import Adversaries
from pqcnet.sim.audit import Auditor
from pqcnet.sim.dataplane import DataPlane
from pqcnet.sim.metrics import summary
from pqcnet.sim.node import SimNode
from pqcnet.sim.transport import drive
from pqcnet.sim.world import NAMESPACE, World

APP_TOPIC = content_topic(f"{NAMESPACE}.app")
#: Tunnel dials a slashed relayer attempts per round after its slash, and how often.
SLASHED_DIALS = 20
SLASHED_DIAL_EVERY_S = 5.0
TRUST_DOMAIN = "pqcnet.sim"


class Workload:
    """Shared scheduling: joins, background relay traffic, route advertisements."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.w = world.sc.workload
        self.timeline: list[dict[str, Any]] = []
        self._shard = {r: k for k, r in enumerate(world.by_role.get("relayer", []))}
        world.on_boot.append(self._booted)

    def schedule(self) -> None:
        self.world.schedule_joins(self.w.join_window_s)
        stop = self.world.sc.duration_s - self.w.drain_s
        if self.w.msg_rate > 0:
            self.world.engine.at(self.w.start_s, self._background, stop)

    def _booted(self, node: SimNode) -> None:
        if node.idx in self._shard:
            self.world.engine.after(1.0, self._advertise, node.idx, node.boots)

    def _advertise(self, i: int, boot: int) -> None:
        node = self.world.nodes[i]
        if node.agent is None or node.boots != boot:
            return
        k = self._shard[i]
        drive(node.agent.advertise_routes([RouteEntry(f"shard-{k}", k, node.name)]))
        every = self.world.sc.agent.route_interval_s
        if every > 0:
            self.world.engine.after(every, self._advertise, i, boot)

    def _background(self, stop: float) -> None:
        world = self.world
        if world.engine.now >= stop:
            return
        rng = world.streams["background"]
        world.engine.after(rng.expovariate(self.w.msg_rate), self._background, stop)
        pool = world.population()
        src = pool[rng.randrange(len(pool))]
        if world.net.online[src]:
            world.publish_from(src, APP_TOPIC, bytes(self.w.msg_bytes), kind="data")

    def sample(self, now: float) -> None:
        online = sum(self.world.net.online)
        self.timeline.append({"t": round(now, 3), "online": online})

    def results(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        return None


# ---------------------------------------------------------------------- formation


class Formation(Workload):
    def __init__(self, world: World) -> None:
        super().__init__(world)
        self.formed: dict[int, float] = {}

    def _is_formed(self, i: int) -> bool:
        world, gs = self.world, self.world.sc.gossipsub
        node = world.nodes[i]
        if node.agent is None:
            return False
        degree = world.relay.mesh_degree(i)
        covered = all(node.agent.routes.lookup(f"shard-{k}") is not None
                      for k in self._shard.values())
        return (gs.D_lo <= degree <= gs.D_hi and world.relay.peer_count(i) <= gs.max_peers
                and covered)

    def sample(self, now: float) -> None:
        super().sample(now)
        for i in range(self.world.sc.nodes):
            if i not in self.formed and self.world.net.online[i] and self._is_formed(i):
                self.formed[i] = now
        self.timeline[-1]["formed"] = len(self.formed) / self.world.sc.nodes

    def results(self) -> dict[str, Any]:
        world, n = self.world, self.world.sc.nodes
        since_join = [self.formed[i] - world.joined[i] for i in sorted(self.formed)]
        at = sorted(self.formed.values())

        def when(q: float) -> float | None:
            k = max(1, int(q * n + 0.999999))
            return round(at[k - 1], 3) if len(at) >= k else None

        peers = [world.relay.peer_count(i) for i in range(n)]
        degrees = [world.relay.mesh_degree(i) for i in range(n)]
        tables = [len(node.agent.peers.all()) for node in world.nodes if node.agent]
        bk = world.relay.bytes_by_kind
        return {"formation": {
            "formed_nodes": len(self.formed), "nodes": n,
            "all_formed_at_s": when(1.0), "p50_formed_at_s": when(0.5),
            "p99_formed_at_s": when(0.99),
            "since_join_s": summary(since_join),
            "mesh_degree": summary([float(d) for d in degrees]),
            "connections": summary([float(p) for p in peers]),
            "agent_peer_table": summary([float(t) for t in tables]),
            "routes_covering_all_shards": sum(
                1 for node in world.nodes if node.agent is not None and all(
                    node.agent.routes.lookup(f"shard-{k}") for k in self._shard.values())),
            "announce_bytes_per_node": round(
                (bk.get("announce", 0) + world.direct_bytes["announce"]) / n, 1),
            "route_update_bytes_per_node": round(bk.get("routes", 0) / n, 1),
            "announce_scope": world.sc.agent.announce,
        }}


# ---------------------------------------------------------------------- directive


class DirectiveWorkload(Workload):
    def __init__(self, world: World) -> None:
        super().__init__(world)
        relayers = world.by_role.get("relayer", [])
        self.target = relayers[0] if relayers else None
        self.dials: Counter[str] = Counter()
        self.slashed_msgs: Counter[str] = Counter()
        world.on_handled.append(self._watch)

    def schedule(self) -> None:
        super().schedule()
        eng = self.world.engine
        eng.at(self.w.rate_limit_at_s, self.world.rate_limit, 5.0, 10, "rate_limit")
        if self.target is not None:
            eng.at(self.w.slash_at_s, self.world.slash, self.target, "governance test",
                   "slash")
            eng.at(self.w.slash_at_s + 1.0, self._slashed_traffic)

    def _slashed_traffic(self) -> None:
        """The slashed relayer keeps talking: route ads and tunnel dials."""
        world = self.world
        if world.engine.now >= world.sc.duration_s - 1 or self.target is None:
            return
        world.engine.after(SLASHED_DIAL_EVERY_S, self._slashed_traffic)
        node = world.nodes[self.target]
        if node.agent is None:
            return
        drive(node.agent.advertise_routes([RouteEntry("shard-slashed", 0, node.name)]))
        me = SpiffeId(TRUST_DOMAIN, "operators", "relayer", node.name)
        rng = world.streams["slashed-dials"]
        pool = world.population()
        applied = world.rec.applied.get("slash", {})
        for _ in range(SLASHED_DIALS):
            j = pool[rng.randrange(len(pool))]
            peer = world.nodes[j]
            if j == self.target or peer.effects is None or j not in applied:
                continue
            refused = peer.effects.gate.reason_for(me) is not None
            self.dials["refused" if refused else "accepted"] += 1

    def _watch(self, node: SimNode, msg: Any, dropped: bool) -> None:
        if (self.target is not None and msg.origin == self.target and msg.kind == "routes"
                and node.idx in self.world.rec.applied.get("slash", {})):
            self.slashed_msgs["dropped" if dropped else "accepted"] += 1

    def results(self) -> dict[str, Any]:
        world = self.world
        out: dict[str, Any] = {}
        for label in ("rate_limit", "slash"):
            t0 = world.rec.issued.get(label)
            if t0 is None:
                continue
            pop = [i for i in world.honest_online(t0, world.sc.duration_s) if i != self.target]
            out[label] = world.rec.application_times(label, pop)
        out["slashed_relayer"] = {
            "control_messages_after_apply": dict(self.slashed_msgs),
            "tunnel_dials_after_apply": dict(self.dials),
        }
        return {"directive": out}


# ---------------------------------------------------------------------- churn


class Churn(Workload):
    def __init__(self, world: World) -> None:
        super().__init__(world)
        self.data = DataPlane(world)
        world.on_boot.append(lambda node: self.data.on_join(node.idx))
        world.on_down.append(self.data.on_leave)

    def schedule(self) -> None:
        super().schedule()
        stop = self.world.sc.duration_s - self.w.drain_s
        self.data.start(self.w.start_s, stop)
        self.world.schedule_churn(self.w.start_s)

    def results(self) -> dict[str, Any]:
        down = self.world.rec.downtime
        subs = set(self.data.subscribers)
        return {"churn": {"frames": self.data.summary(),
                          "down_events": sum(len(v) for v in down.values()),
                          "subscriber_down_events": sum(len(v) for i, v in down.items()
                                                        if i in subs)}}

    def close(self) -> None:
        self.data.close()


# ---------------------------------------------------------------------- partition


class Validators(Workload):
    """Validators append a record every ``ledger_append_s`` and DAG-sync."""

    def __init__(self, world: World) -> None:
        super().__init__(world)
        self.validators = [world.gov, *world.by_role.get("validator", [])]
        self.appended = 0
        self.converged_at: list[float] = []

    def schedule(self) -> None:
        super().schedule()
        rng = self.world.streams["appends"]
        for v in self.validators:
            self.world.engine.at(self.w.start_s + rng.random() * self.w.ledger_append_s,
                                 self._append, v)

    def _append(self, v: int) -> None:
        world = self.world
        world.engine.after(self.w.ledger_append_s, self._append, v)
        stop = world.sc.partition.heal_s or world.sc.duration_s
        node = world.nodes[v]
        if (node.ledger is None or node.persistent.get("equivocating")
                or world.engine.now > max(stop, world.sc.duration_s - self.w.drain_s)):
            return
        self.appended += 1
        body = self.appended.to_bytes(8, "big")
        node.ledger.append(VertexKind.PERFORMANCE_REPORT,
                           OpaqueRecord("pqcnet.sim.Uptime", node.name, body),
                           node.name, node.keys.signing_key)

    def agreement(self) -> float:
        """Share of online validators holding the most common (tips, size) view."""
        views: Counter[tuple[int, tuple[bytes, ...]]] = Counter()
        for v in self.validators:
            ledger = self.world.nodes[v].ledger
            if ledger is not None and self.world.net.online[v]:
                views[(len(ledger), tuple(sorted(ledger.tips())))] += 1
        total = sum(views.values())
        return views.most_common(1)[0][1] / total if total else 0.0

    def sample(self, now: float) -> None:
        super().sample(now)
        agree = self.agreement()
        self.timeline[-1]["agreement"] = agree
        if agree == 1.0:
            self.converged_at.append(now)

    def ledger_summary(self) -> dict[str, Any]:
        world = self.world
        evidence: Counter[str] = Counter()
        sizes = []
        for v in self.validators:
            ledger = world.nodes[v].ledger
            if ledger is None:
                continue
            sizes.append(float(len(ledger)))
            for ev in ledger.evidence():
                evidence[ev.offender] += 1
        return {"validators": len(self.validators), "records_appended": self.appended,
                "ledger_vertices": summary(sizes), "evidence_by_offender": dict(evidence)}


class Partition(Validators):
    def schedule(self) -> None:
        super().schedule()
        self.minority = self.world.schedule_partition()

    def results(self) -> dict[str, Any]:
        world, p = self.world, self.world.sc.partition
        after = [t for t in self.converged_at if t >= p.heal_s]
        # converged for good: the first sample after heal from which agreement held
        stable = None
        for row in self.timeline:
            if row["t"] >= p.heal_s and row.get("agreement") == 1.0:
                stable = row["t"] if stable is None else stable
            elif row["t"] >= p.heal_s:
                stable = None
        out = self.ledger_summary()
        out.update({
            "split_at_s": p.at_s, "heal_at_s": p.heal_s,
            "minority_nodes": len(getattr(self, "minority", [])),
            "converged_after_heal_s": round(stable - p.heal_s, 3) if stable is not None else None,
            "first_agreement_after_heal_s": round(after[0] - p.heal_s, 3) if after else None,
            "equivocation_false_positives": sum(out["evidence_by_offender"].values()),
            "dropped_across_partition": world.net.dropped["partition"],
        })
        return {"partition": out}


# ---------------------------------------------------------------------- adversaries


class AdversaryWorkload(Validators):
    def __init__(self, world: World) -> None:
        super().__init__(world)
        relayers = world.by_role.get("relayer", [])
        self.over = set(relayers[:world.sc.adversaries.over_reporters])
        self.data = DataPlane(world, over_reporters=self.over)
        self.adv = Adversaries(world, self.w.start_s)
        self.audit = Auditor(world, self.data)

    def schedule(self) -> None:
        super().schedule()
        stop = self.world.sc.duration_s - self.w.drain_s
        self.data.start(self.w.start_s, stop)
        self.adv.start(stop)
        # legitimate directives for the replayers to capture (and every node to apply once)
        eng = self.world.engine
        eng.at(self.w.rate_limit_at_s, self.world.rate_limit, 5.0, 10, "rate_limit")
        eng.at(self.w.rate_limit_at_s + 60.0, self.world.rate_limit, 8.0, 16, "rate_limit_2")

    def results(self) -> dict[str, Any]:
        world = self.world
        guilty = {world.nodes[i].name for i in self.over} | set(
            world.nodes[i].name for i in self.adv.equivocators)
        honest = {world.nodes[i].name for i in world.population()} - guilty
        verdicts = self.audit.summary(guilty, honest)
        detect = {}
        for name in sorted(guilty):
            flagged = self.audit.flagged.get(name)
            start = self.adv.equivocations.get(name, self.w.start_s)
            label = f"slash:{name}"
            applied = world.rec.applied.get(label, {})
            pop = [i for i in world.honest_online(0, world.sc.duration_s)
                   if world.nodes[i].name != name]
            detect[name] = {
                "detected": flagged is not None,
                "time_to_slash_directive_s": round(flagged[1] - start, 3) if flagged else None,
                "applied_by": f"{sum(1 for i in pop if i in applied)}/{len(pop)}",
            }
        legit = {}
        for label in ("rate_limit", "rate_limit_2"):
            t0 = world.rec.issued.get(label)
            if t0 is not None:
                legit[label] = world.rec.application_times(
                    label, world.honest_online(t0, world.sc.duration_s))
        out = {"attacks": self.adv.summary(), "slashing": verdicts, "detection": detect,
               "legitimate_directives": legit,
               "ledger": self.ledger_summary(), "frames": self.data.summary()}
        return {"adversaries": out}

    def close(self) -> None:
        self.data.close()


# ---------------------------------------------------------------------- scale


class Scale(Workload):
    """Relay traffic only: the Waku comparison and the cost curve."""


WORKLOADS: dict[str, type[Workload]] = {
    "formation": Formation, "directive": DirectiveWorkload, "churn": Churn,
    "partition": Partition, "adversaries": AdversaryWorkload, "scale": Scale,
}
