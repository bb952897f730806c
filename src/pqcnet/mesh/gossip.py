"""Gossip with DTN store-and-forward: the part of the agent that spreads items.

Items are origin-signed envelopes sealed to each recipient's inbox, deduplicated by
message id (the verifier remembers ids), forwarded to ``gossip_fanout`` live peers
while ``hops_left`` lasts. A peer that is not live, or whose publish fails, gets a
DTN bundle in the RocksDB :class:`~pqcnet.mesh.dtn.BundleStore`, flushed when its
announcements resume; expired bundles are never sent.

Gossip carries no authority of its own. A ``revocation`` item is *advisory*: it is
counted (``pqcnet_mesh_advisories_total``) and listeners see it with its sender, but
nothing is revoked — revocations take effect only through a CA-signed CRL or a
governance-signed slash directive. A ``crl`` item is the CA's signed CRL: it is applied
through the :class:`~pqcnet.mesh.crl.CrlGate` (which checks the CA signature and that it
is newer), and a refused one is dropped (counted by reason) and not forwarded.

:class:`Gossip` is owned by :class:`~pqcnet.mesh.agent.ControlPlaneAgent`, which hands
it everything it uses in its constructor (the publisher it sends through, the peer
table, the verifier that dedups, the bundle store, the CRL gate, the config, the clock
and the shared event counters) and calls it for GOSSIP messages and
when a peer comes back.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable

from pqcnet.mesh import metrics
from pqcnet.mesh._aio import maybe_await
from pqcnet.mesh.config import AgentConfig
from pqcnet.mesh.crl import CRL_GOSSIP_KIND, CrlGate
from pqcnet.mesh.dtn import BundleStore
from pqcnet.mesh.envelope import ControlMessage, EnvelopeVerifier, MessageType
from pqcnet.mesh.errors import BundleStoreError, CrlRejected, StaleMessage, WakuError
from pqcnet.mesh.messages import GossipItem
from pqcnet.mesh.peers import PeerTable
from pqcnet.mesh.publisher import Publisher

log = logging.getLogger("pqcnet.mesh.agent")

GossipListener = Callable[[GossipItem, str], Awaitable[None] | None]
#: Gossip kinds that claim an authority a peer does not have: recorded, never applied.
ADVISORY_KINDS = frozenset({"revocation"})


class Gossip:
    """Gossip origination, forwarding, DTN hold and flush."""

    def __init__(self, publisher: Publisher, peers: PeerTable, verifier: EnvelopeVerifier,
                 bundles: BundleStore | None, config: AgentConfig,
                 clock: Callable[[], int], events: Counter[str], *,
                 crl: CrlGate | None = None, rng: random.Random | None = None) -> None:
        self.publisher = publisher
        self.peers = peers
        self.verifier = verifier
        self.bundles = bundles
        self.crl = crl
        self.config = config
        self.clock = clock
        self.events = events
        self.rng = rng or random.Random()
        #: called with (item, sender) for every fresh item received
        self.listeners: list[GossipListener] = []

    async def originate(self, kind: str, payload: bytes, *, ttl_ms: int | None = None,
                        destination: str = "") -> bytes:
        """Originate a gossip item; returns its message id."""
        now = self.clock()
        item = GossipItem(kind, payload, now + (ttl_ms or self.config.gossip_ttl_ms), destination)
        signed = await self.publisher.sign(MessageType.GOSSIP, item.encode())
        message_id = self.verifier.mark_seen(signed)
        if destination:
            await self._send_or_hold(destination, signed, item.expires_ms, hops=0)
        else:
            await self._spread(signed, item.expires_ms, self.config.gossip_hops,
                               exclude={self.publisher.node_id}, hold_for_absent=True)
        return message_id

    async def on_message(self, msg: ControlMessage) -> None:
        """A verified GOSSIP message: act on it, tell listeners, forward it."""
        item = GossipItem.decode(msg.body)
        if item.expires_ms <= self.clock():
            raise StaleMessage("gossip item expired")
        if item.kind in ADVISORY_KINDS:
            self.events[f"advisory_{item.kind}"] += 1
            metrics.ADVISORIES.labels(item.kind).inc()
        elif item.kind == CRL_GOSSIP_KIND:
            if self.crl is None:
                raise CrlRejected("no trust bundle to check a CRL against",
                                  reason="crl_unverifiable")
            await self.crl.offer(item.payload, msg.sender)  # CrlRejected: dropped, counted
        for gl in self.listeners:
            await maybe_await(gl(item, msg.sender))
        if msg.hops_left > 0 and not item.destination:
            await self._spread(msg.signed, item.expires_ms, msg.hops_left - 1,
                               exclude={self.publisher.node_id, msg.sender},
                               hold_for_absent=False)

    async def flush(self, dest: str) -> int:
        """Forward every unexpired bundle held for ``dest``; returns how many went out."""
        if self.bundles is None:
            return 0
        peer = self.peers.get(dest)
        if peer is None or peer.announcement.seal_key is None:
            return 0
        sent = 0
        for b in self.bundles.pending(dest, self.clock()):
            try:
                await self.publisher.forward(dest, peer.announcement.seal_key, b.payload, hops=0)
            except WakuError:
                self.events["publish_failed"] += 1
                break
            self.bundles.remove(b)
            sent += 1
        return sent

    async def _spread(self, signed: bytes, expires_ms: int, hops: int, *,
                      exclude: set[str], hold_for_absent: bool) -> None:
        now = self.clock()
        live = [p.announcement.node_id for p in self.peers.live(now)
                if p.announcement.node_id not in exclude]
        targets = self.rng.sample(live, min(self.config.gossip_fanout, len(live)))
        for dest in targets:
            await self._send_or_hold(dest, signed, expires_ms, hops=hops)
        if hold_for_absent:
            for p in self.peers.all():
                node = p.announcement.node_id
                if node not in exclude and not self.peers.is_live(node, now):
                    self._hold(node, signed, expires_ms)

    async def _send_or_hold(self, dest: str, signed: bytes, expires_ms: int, *,
                            hops: int) -> None:
        peer = self.peers.get(dest)
        now = self.clock()
        if peer is None or peer.announcement.seal_key is None or not self.peers.is_live(dest, now):
            self._hold(dest, signed, expires_ms)
            return
        try:
            await self.publisher.forward(dest, peer.announcement.seal_key, signed, hops=hops)
        except WakuError:
            self.events["publish_failed"] += 1
            self._hold(dest, signed, expires_ms)

    def _hold(self, dest: str, signed: bytes, expires_ms: int) -> None:
        if self.bundles is None:
            self.events["undeliverable"] += 1
            return
        try:
            self.bundles.put(dest, signed, created_ms=self.clock(), expires_ms=expires_ms)
        except BundleStoreError as exc:
            self.events["bundle_rejected"] += 1
            log.warning("bundle not stored", extra={"peer": dest, "error": str(exc)})
