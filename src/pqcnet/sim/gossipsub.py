"""The Waku relay layer as a GossipSub v1.1 model, with Waku's parameters.

Waku relay (11/WAKU2-RELAY) is GossipSub v1.1 on one pubsub topic per shard; every
pqcnet content topic rides it, so every relay node carries every control message and
the agent filters by content topic. This model follows the libp2p pubsub specs
(``pubsub/gossipsub/gossipsub-v1.0.md``, ``gossipsub-v1.1.md``) section by section:

* **Parameters** (v1.0 §"Parameters", 29/WAKU2-CONFIG): ``D=6, D_lo=4, D_hi=12,
  D_lazy=6``, heartbeat 1 s, ``mcache_len=5`` (history_length), ``mcache_gossip=3``,
  ``seen_ttl`` 2 min, ``gossip_factor=0.25`` (v1.1 §"Adaptive Gossip Dissemination"),
  ``prune_backoff`` 1 min (v1.1 §"PRUNE Backoff").
* **Message processing** (v1.0 §"Message Processing"): a message id is remembered in
  the *seen cache* for ``seen_ttl``; a duplicate is dropped before the application sees
  it; a new one is handed to the application, put in the *message cache* and forwarded
  to every mesh peer except the one it came from and its origin.
* **Publishing**: v1.1 §"Flood Publishing" — the origin sends to every connected peer
  (``flood_publish: true``, the v1.1 default), else to its mesh.
* **Control messages** (v1.0 §"Control Messages"): GRAFT adds the sender to our mesh
  unless it is in backoff (then PRUNE back, v1.1); PRUNE removes it and starts the
  backoff; IHAVE ids we have not seen (and not asked for in the last 3 s, the v1.1
  IWANT follow-up) are asked for with IWANT; IWANT is answered from the message cache.
* **Heartbeat** (v1.0 §"Heartbeat"): below ``D_lo`` graft up to ``D`` peers not in
  backoff; above ``D_hi`` prune down to ``D``; gossip IHAVE of the ids in the last
  ``history_gossip`` windows to ``max(D_lazy, gossip_factor x non-mesh peers)``
  non-mesh peers; shift the message cache.

Not modelled (said so in the report): peer scoring and its thresholds (v1.1 §"Peer
Scoring" — so no opportunistic grafting, ``D_score``, ``D_out``), peer exchange on
PRUNE, fanout (every publisher is subscribed), IDONTWANT (v1.2), RLN validation.
The relay layer does *not* validate pqcnet signatures — neither does the Waku adapter:
forged envelopes travel the mesh and are dropped by every receiving agent.

Message ids are the simulator's publication serials, not hashes of the (randomly
signed) payload, so nothing ordered here depends on signature bytes. Connections are
the bounded peer table (``max_peers``); nodes dial from the bootstrap list at join,
while below ``target_peers``, and explore one random node every ``explore_s`` (a
stand-in for discv5 / peer exchange, which is what re-knits the overlay after a
partition heals).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from pqcnet.sim.config import GossipSubSpec
from pqcnet.sim.engine import Engine, Streams
from pqcnet.sim.network import Network

#: A dial takes this many one-way latencies before the connection is usable
#: (TCP handshake + Noise/TLS + multistream negotiation).
DIAL_RTTS = 3
#: Bytes of a GRAFT / PRUNE control message on the wire.
CONTROL_BYTES = 48
#: The v1.1 IWANT follow-up: an id asked for is not asked for again this soon.
IWANT_FOLLOWUP_S = 3.0
#: Explore (discovery) dials happen this often per node.
EXPLORE_S = 30.0
#: A lost connection is redialled after this delay, doubling per attempt up to
#: :data:`REDIAL_MAX_S`, for at most :data:`REDIAL_ATTEMPTS` attempts (the peer store).
REDIAL_FIRST_S = 5.0
REDIAL_MAX_S = 60.0
REDIAL_ATTEMPTS = 10


@dataclass(slots=True)
class RelayMessage:
    """One published relay message."""

    mid: int
    origin: int
    content_topic: str
    payload: bytes
    #: PUBLISH bytes on the wire (payload + topic + RPC framing)
    size: int
    #: publish time, virtual seconds
    t0: float
    #: metrics label ("announce", "directive", "data", "forged", ...)
    kind: str


class Router:
    """One node's GossipSub state (lost when the node crashes)."""

    __slots__ = ("backoff", "gen", "idx", "lost", "mcache", "mesh", "peers", "requested",
                 "seen", "seen_q")

    def __init__(self, idx: int, gen: int) -> None:
        self.idx = idx
        self.gen = gen
        #: connected peers (the bounded peer table), insertion-ordered
        self.peers: dict[int, None] = {}
        self.mesh: set[int] = set()
        self.backoff: dict[int, float] = {}
        #: message cache: newest window first, each a list of ids
        self.mcache: deque[list[int]] = deque([[]])
        #: seen cache: id -> first-seen time
        self.seen: dict[int, float] = {}
        self.seen_q: deque[tuple[float, int]] = deque()
        self.requested: dict[int, float] = {}
        #: peer store of lost connections: peer -> (next redial time, attempts)
        self.lost: dict[int, tuple[float, int]] = {}


DeliverFn = Callable[[int, RelayMessage, int], None]


class Relay:
    """The relay layer of the whole simulated network."""

    def __init__(self, engine: Engine, network: Network, spec: GossipSubSpec,
                 streams: Streams, deliver: DeliverFn) -> None:
        self.engine = engine
        self.net = network
        self.spec = spec
        self.deliver = deliver
        self._rng = streams["gossipsub"]
        self._dial_rng = streams["dial"]
        self.routers: list[Router | None] = [None] * network.n
        self._gens = [0] * network.n
        self.messages: dict[int, RelayMessage] = {}
        self._next_mid = 0
        #: nodes a joining node may dial (the bootstrap list of the config)
        self.bootstrap: list[int] = list(range(network.n))
        self.stats = {"duplicates": 0, "ihave": 0, "iwant": 0, "graft": 0, "prune": 0,
                      "iwant_served": 0, "control_bytes": 0, "publish_msgs": 0,
                      "dials": 0, "dial_refused": 0}
        self.dup_per_node = [0] * network.n
        #: relay bytes sent per message kind (every copy, duplicates included)
        self.bytes_by_kind: dict[str, int] = {}

    # ------------------------------------------------------------------ membership

    def start_node(self, i: int) -> None:
        """Bring node ``i`` up with empty relay state and dial the bootstrap list."""
        self._gens[i] += 1
        self.routers[i] = Router(i, self._gens[i])
        self.net.online[i] = True
        offset = self._rng.random() * self.spec.heartbeat_s
        self.engine.after(offset, self._heartbeat, i, self._gens[i])
        self.engine.after(offset + self._rng.random() * EXPLORE_S, self._explore, i,
                          self._gens[i])
        for _ in range(self.spec.bootstrap_peers):
            self.dial(i)

    def stop_node(self, i: int, *, crash: bool) -> None:
        """Take node ``i`` down; peers notice at once (leave) or after the timeout (crash)."""
        router = self.routers[i]
        self.routers[i] = None
        self.net.online[i] = False
        if router is None:
            return
        delay = self.net.spec.conn_timeout_s if crash else 0.0
        for p in router.peers:
            if delay:
                self.engine.after(delay, self._drop, p, i)
            else:
                self.engine.after(self.net.link_latency(i, p), self._drop, p, i)

    def cut_partition(self) -> None:
        """After a split: every cross-side connection times out on both ends."""
        delay = self.net.spec.conn_timeout_s
        for r in self.routers:
            if r is None:
                continue
            for p in r.peers:
                if self.net.side[p] != self.net.side[r.idx]:
                    self.engine.after(delay, self._drop, r.idx, p)

    def dial(self, i: int) -> None:
        """Dial one random bootstrap node that ``i`` is not connected to."""
        r = self.routers[i]
        if r is None or len(r.peers) >= self.spec.max_peers:
            return
        j = self.bootstrap[self._dial_rng.randrange(len(self.bootstrap))]
        if j == i or j in r.peers:
            return
        self.stats["dials"] += 1
        if not self.net.reachable(i, j):
            return
        self.engine.after(DIAL_RTTS * self.net.link_latency(i, j), self._establish, i, j,
                          r.gen)

    def _establish(self, i: int, j: int, gen: int) -> None:
        ri, rj = self.routers[i], self.routers[j]
        if ri is None or ri.gen != gen or rj is None or not self.net.reachable(i, j):
            return
        if j in ri.peers:
            return
        if len(rj.peers) >= self.spec.max_peers or len(ri.peers) >= self.spec.max_peers:
            self.stats["dial_refused"] += 1
            return
        ri.peers[j] = None
        rj.peers[i] = None

    def _drop(self, i: int, p: int) -> None:
        r = self.routers[i]
        if r is not None and p in r.peers:
            del r.peers[p]
            r.mesh.discard(p)
            if len(r.lost) < self.spec.max_peers:
                r.lost[p] = (self.engine.now + REDIAL_FIRST_S, 0)

    def _redial(self, r: Router) -> None:
        """Retry lost connections whose time has come (the peer store)."""
        now = self.engine.now
        for p, (when, tries) in list(r.lost.items()):
            if when > now:
                continue
            if p in r.peers or tries >= REDIAL_ATTEMPTS:
                del r.lost[p]
                continue
            r.lost[p] = (now + min(REDIAL_MAX_S, REDIAL_FIRST_S * 2 ** (tries + 1)), tries + 1)
            if len(r.peers) < self.spec.max_peers and self.net.reachable(r.idx, p):
                self.stats["dials"] += 1
                self.engine.after(DIAL_RTTS * self.net.link_latency(r.idx, p), self._establish,
                                  r.idx, p, r.gen)

    # ------------------------------------------------------------------ publishing

    def publish(self, i: int, content_topic: str, payload: bytes, kind: str) -> int:
        """Publish from node ``i``; returns the message id (-1 if ``i`` is down)."""
        r = self.routers[i]
        if r is None:
            return -1
        mid = self._next_mid
        self._next_mid += 1
        size = len(payload) + len(content_topic) + self.spec.rpc_overhead
        msg = RelayMessage(mid, i, content_topic, payload, size, self.engine.now, kind)
        self.messages[mid] = msg
        self._mark_seen(r, mid)
        r.mcache[0].append(mid)
        self.stats["publish_msgs"] += 1
        targets = list(r.peers) if self.spec.flood_publish else sorted(r.mesh)
        for p in targets:
            self.net.send(i, p, size, self._on_publish, p, i, mid, 1)
        self.bytes_by_kind[kind] = self.bytes_by_kind.get(kind, 0) + size * len(targets)
        return mid

    def _mark_seen(self, r: Router, mid: int) -> None:
        now = self.engine.now
        r.seen[mid] = now
        r.seen_q.append((now + self.spec.seen_ttl_s, mid))
        while len(r.seen) > self.spec.max_seen:
            _, old = r.seen_q.popleft()
            r.seen.pop(old, None)

    def _on_publish(self, i: int, src: int, mid: int, hops: int) -> None:
        r = self.routers[i]
        if r is None or src not in r.peers:
            return
        if mid in r.seen:
            self.stats["duplicates"] += 1
            self.dup_per_node[i] += 1
            return
        self._mark_seen(r, mid)
        r.requested.pop(mid, None)
        if self.spec.validation_ms > 0:
            # the relay validates (decodes, checks RLN/signatures) before it forwards
            self.engine.after(self.spec.validation_ms / 1000, self._forward, i, src, mid, hops,
                              r.gen)
        else:
            self._forward(i, src, mid, hops, r.gen)

    def _forward(self, i: int, src: int, mid: int, hops: int, gen: int) -> None:
        r = self.routers[i]
        msg = self.messages.get(mid)
        if r is None or r.gen != gen or msg is None:
            return
        r.mcache[0].append(mid)
        sent = 0
        for p in sorted(r.mesh):
            if p != src and p != msg.origin:
                self.net.send(i, p, msg.size, self._on_publish, p, i, mid, hops + 1)
                sent += 1
        if sent:
            self.bytes_by_kind[msg.kind] = self.bytes_by_kind.get(msg.kind, 0) + msg.size * sent
        self.deliver(i, msg, hops)

    # ------------------------------------------------------------------ control

    def _control(self, i: int, p: int, size: int, fn: Callable[..., None], *args: object) -> None:
        self.stats["control_bytes"] += size
        self.net.send(i, p, size, fn, *args)

    def _on_graft(self, i: int, src: int) -> None:
        r = self.routers[i]
        if r is None or src not in r.peers:
            return
        if r.backoff.get(src, 0.0) > self.engine.now:
            self.stats["prune"] += 1
            self._control(i, src, CONTROL_BYTES, self._on_prune, src, i)
            return
        r.mesh.add(src)

    def _on_prune(self, i: int, src: int) -> None:
        r = self.routers[i]
        if r is None:
            return
        r.mesh.discard(src)
        r.backoff[src] = self.engine.now + self.spec.prune_backoff_s

    def _on_ihave(self, i: int, src: int, ids: tuple[int, ...]) -> None:
        r = self.routers[i]
        if r is None or src not in r.peers:
            return
        now = self.engine.now
        want = [m for m in ids if m not in r.seen and r.requested.get(m, -1e9) + IWANT_FOLLOWUP_S
                <= now]
        if not want:
            return
        for m in want:
            r.requested[m] = now
        self.stats["iwant"] += 1
        size = self.spec.rpc_overhead + self.spec.id_bytes * len(want)
        self._control(i, src, size, self._on_iwant, src, i, tuple(want))

    def _on_iwant(self, i: int, src: int, ids: tuple[int, ...]) -> None:
        r = self.routers[i]
        if r is None or src not in r.peers:
            return
        cached = {m for window in r.mcache for m in window}
        for m in ids:  # copies pulled by IWANT are recorded with hops = 0 ("via gossip")
            msg = self.messages.get(m)
            if m in cached and msg is not None:
                self.stats["iwant_served"] += 1
                self.bytes_by_kind[msg.kind] = self.bytes_by_kind.get(msg.kind, 0) + msg.size
                self.net.send(i, src, msg.size, self._on_publish, src, i, m, 0)

    # ------------------------------------------------------------------ heartbeat

    def _heartbeat(self, i: int, gen: int) -> None:
        r = self.routers[i]
        if r is None or r.gen != gen:
            return
        spec = self.spec
        now = self.engine.now
        self.engine.after(spec.heartbeat_s, self._heartbeat, i, gen)
        mesh = r.mesh
        if len(mesh) < spec.D_lo:
            cands = [p for p in r.peers if p not in mesh and r.backoff.get(p, 0.0) <= now]
            for p in self._rng.sample(cands, min(spec.D - len(mesh), len(cands))):
                mesh.add(p)
                self.stats["graft"] += 1
                self._control(i, p, CONTROL_BYTES, self._on_graft, p, i)
        elif len(mesh) > spec.D_hi:
            for p in self._rng.sample(sorted(mesh), len(mesh) - spec.D):
                mesh.discard(p)
                r.backoff[p] = now + spec.prune_backoff_s
                self.stats["prune"] += 1
                self._control(i, p, CONTROL_BYTES, self._on_prune, p, i)
        # IHAVE gossip about the last history_gossip windows
        ids = [m for k, window in enumerate(r.mcache) if k < spec.history_gossip for m in window]
        if ids:
            non_mesh = [p for p in r.peers if p not in mesh]
            n = max(spec.D_lazy, int(spec.gossip_factor * len(non_mesh)))
            batch = tuple(ids[-spec.max_ihave_length:])
            size = spec.rpc_overhead + spec.id_bytes * len(batch)
            for p in self._rng.sample(non_mesh, min(n, len(non_mesh))):
                self.stats["ihave"] += 1
                rp = self.routers[p]
                if rp is None or all(m in rp.seen for m in batch):
                    # the receiver is down or has seen every id: the IHAVE will ask for
                    # nothing when it lands (seen entries outlive it by ~2 min), so only
                    # its bytes and link time are simulated, not its arrival
                    self.stats["control_bytes"] += size
                    self.net.book(i, p, size)
                    continue
                self._control(i, p, size, self._on_ihave, p, i, batch)
        r.mcache.appendleft([])
        while len(r.mcache) > spec.history_length:
            r.mcache.pop()
        while r.seen_q and r.seen_q[0][0] <= now:
            _, m = r.seen_q.popleft()
            r.seen.pop(m, None)
        if r.requested and len(r.requested) > 1024:
            r.requested = {m: t for m, t in r.requested.items() if t + IWANT_FOLLOWUP_S > now}
        if r.lost:
            self._redial(r)
        if len(r.peers) < spec.target_peers:
            self.dial(i)

    def _explore(self, i: int, gen: int) -> None:
        r = self.routers[i]
        if r is None or r.gen != gen:
            return
        self.dial(i)
        self.engine.after(EXPLORE_S, self._explore, i, gen)

    # ------------------------------------------------------------------ views

    def mesh_degree(self, i: int) -> int:
        r = self.routers[i]
        return len(r.mesh) if r is not None else 0

    def peer_count(self, i: int) -> int:
        r = self.routers[i]
        return len(r.peers) if r is not None else 0

    def forget_payloads(self, older_than: float) -> None:
        """Drop payloads no cache can still serve (keeps memory flat on long runs)."""
        for mid in [m for m, msg in self.messages.items() if msg.t0 < older_than]:
            del self.messages[mid]
