"""Attackers, written from the attacker's chair, on the real wire formats.

* **Forger** — publishes governance directives it has no right to: (a) a well-signed
  envelope from itself carrying a directive signed with its own key instead of the
  governance key (the agent's ``GovernancePolicy`` must refuse it), and (b) an envelope
  that claims to come from the governance node but is signed with the forger's key (the
  verifier must drop it as a bad signature). Each forged action is unique, so any node
  applying one shows up in the record.
* **Replayer** — captures every directive governance publishes and republishes the
  exact bytes twice: 5 s later (inside the skew bound: the per-sender replay window
  must catch it) and 45 s later (past the 30 s skew bound: stale).
* **Equivocator** — a registered validator that signs two different vertices with the
  same counter and hands one to half of the honest validators and the other to the
  rest (sealed DAG_VERTICES to their inboxes); DAG sync then brings both to someone.
* Over-reporting relayers live in :mod:`pqcnet.sim.dataplane` (they inflate proofs).
"""

from __future__ import annotations

from pqcnet.mesh.directives import Directive, SlashNotice, sign_directive
from pqcnet.mesh.envelope import EnvelopeSigner, MessageType, NodeKeys
from pqcnet.mesh.messages import DagVertices
from pqcnet.mesh.transport import inbox_topic
from pqcnet.qsdag import OpaqueRecord, VertexKind
from pqcnet.sim.gossipsub import RelayMessage
from pqcnet.sim.node import SimNode
from pqcnet.sim.world import DIRECTIVE_TTL_MS, NAMESPACE, World

FORGE_EVERY_S = 20.0
REPLAY_DELAYS_S = (5.0, 45.0)
FORGED_KINDS = ("forged", "replayed")


class Adversaries:
    def __init__(self, world: World, start_s: float) -> None:
        self.world = world
        self.start_s = start_s
        self.forgers = world.by_role.get("forger", [])
        self.replayers = world.by_role.get("replayer", [])
        sc = world.sc.adversaries
        validators = world.by_role.get("validator", [])
        self.equivocators = validators[:sc.equivocators]
        self.forged = 0
        self.replays = 0
        self.equivocations: dict[str, float] = {}
        self._captured: set[int] = set()
        world.on_handled.append(self._count)

    def start(self, stop_s: float) -> None:
        eng = self.world.engine
        for k, f in enumerate(self.forgers):
            eng.at(self.start_s + k, self._forge, f, stop_s)
        if self.replayers:
            self.world.relay_hooks.append(self._capture)
        for k, e in enumerate(self.equivocators):
            eng.at(self.start_s + 10.0 + 5.0 * k, self._equivocate, e)

    # ------------------------------------------------------------------ forgers

    def _forge(self, f: int, stop_s: float) -> None:
        world = self.world
        if world.engine.now >= stop_s:
            return
        world.engine.after(FORGE_EVERY_S, self._forge, f, stop_s)
        node = world.nodes[f]
        if node.agent is None:
            return
        honest = world.population(("relayer",)) or world.population()
        target = world.nodes[honest[world.streams["forge"].randrange(len(honest))]].name
        now = world.engine.now_ms()
        rng = world.streams["forge"]
        for variant in ("own-key", "spoofed-governance"):
            self.forged += 1
            action = SlashNotice(target, f"forged-{self.forged}")
            world.label(action, "forged")
            directive = Directive(rng.randbytes(16), now, now + DIRECTIVE_TTL_MS, action)
            signed = sign_directive(directive, node.keys.signing_key)
            if variant == "own-key":
                signer = node.agent.signer
            else:
                gov = world.nodes[world.gov].name
                signer = EnvelopeSigner(NodeKeys(gov, node.keys.signing_key),
                                        start_counter=now * 1000)
            wire = signer.wire(MessageType.GOVERNANCE_DIRECTIVE, signed.encode(), now_ms=now)
            world.publish_from(f, world.topics["governance"], wire, kind="forged")

    # ------------------------------------------------------------------ replayers

    def _capture(self, msg: RelayMessage) -> None:
        if msg.kind != "governance" or msg.origin != self.world.gov or msg.mid in self._captured:
            return
        self._captured.add(msg.mid)
        for k, r in enumerate(self.replayers):
            for delay in REPLAY_DELAYS_S:
                self.world.engine.after(delay + 0.01 * k, self._replay, r, msg.content_topic,
                                        msg.payload)

    def _replay(self, r: int, topic: str, payload: bytes) -> None:
        if self.world.net.online[r]:
            self.replays += 1
            self.world.publish_from(r, topic, payload, kind="replayed")

    # ------------------------------------------------------------------ equivocators

    def _equivocate(self, e: int) -> None:
        world = self.world
        node = world.nodes[e]
        ledger = node.ledger
        if ledger is None or node.agent is None:
            return
        node.persistent["equivocating"] = True
        twins = [ledger.build_vertex(node.name, node.keys.signing_key,
                                     VertexKind.PERFORMANCE_REPORT,
                                     OpaqueRecord("pqcnet.sim.Uptime", node.name, body))
                 for body in (b"version-a", b"version-b")]
        self.equivocations[node.name] = world.engine.now
        honest = [v for v in [*world.by_role.get("validator", []), world.gov]
                  if v not in self.equivocators]
        now = world.engine.now_ms()
        for k, v in enumerate(honest):
            dest = world.nodes[v]
            body = DagVertices(dest.name, (twins[k % 2].encode(),)).encode()
            wire = node.agent.signer.wire(MessageType.DAG_VERTICES, body, now_ms=now,
                                          to=dest.keys.recipient_key.public)
            world.publish_from(e, inbox_topic(dest.name, NAMESPACE), wire,
                               kind="equivocation")

    # ------------------------------------------------------------------ accounting

    def _count(self, node: SimNode, msg: RelayMessage, dropped: bool) -> None:
        if (msg.kind in FORGED_KINDS and node.role not in ("forger", "replayer")
                and node.idx != self.world.gov):
            self.world.adversarial[f"{msg.kind}:{'dropped' if dropped else 'accepted'}"] += 1

    def summary(self) -> dict[str, object]:
        adv = self.world.adversarial
        forged_applied = len(self.world.rec.applied.get("forged", {}))
        double = sum(1 for (label, _), n in self.world.applications.items() if n > 1)
        return {
            "forged_published": self.forged,
            "forged_dropped": adv["forged:dropped"],
            "forged_accepted": adv["forged:accepted"],
            "forged_applied_nodes": forged_applied,
            "replays_published": self.replays,
            "replayed_dropped": adv["replayed:dropped"],
            "replayed_accepted": adv["replayed:accepted"],
            "directives_applied_twice": double,
            "equivocators": sorted(self.equivocations),
        }
