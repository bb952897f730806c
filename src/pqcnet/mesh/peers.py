"""Mesh membership: a peer table with liveness, and the sentries' routing cache.

Both are sans-IO: every call takes ``now_ms``. A peer is *live* while its last
announcement is younger than ``max(expiry_ms, 3 * its announce interval)``; expired
peers stay in the table (their seal key is still needed to hold DTN bundles for
them) until ``forget_after_ms``. :meth:`PeerTable.observe` reports whether an
announcement brought a peer (back) to life — the trigger for flushing DTN bundles.

The routing cache is the lightweight topic → shard-owner map sentries keep; it is
updated incrementally from route advertisements (per-advertiser versions make stale
or reordered advertisements harmless) and mirrors the QS-DAG meta-routing view.
"""

from __future__ import annotations

from dataclasses import dataclass

from pqcnet.mesh.errors import ConfigError
from pqcnet.mesh.messages import Announcement, RouteAdvertisement, RouteEntry

#: Peers remembered at most; bounds memory against announcement floods.
DEFAULT_MAX_PEERS = 10_000
#: Topics cached at most.
DEFAULT_MAX_ROUTES = 100_000


@dataclass(slots=True)
class PeerState:
    announcement: Announcement
    last_seen_ms: int
    live: bool = True


class PeerTable:
    """Who is in the mesh and who is alive."""

    def __init__(self, *, expiry_ms: int = 30_000, forget_after_ms: int = 86_400_000,
                 max_peers: int = DEFAULT_MAX_PEERS) -> None:
        if expiry_ms <= 0 or forget_after_ms < expiry_ms or max_peers < 1:
            raise ConfigError("peer expiry must be > 0, forget >= expiry, max_peers >= 1")
        self.expiry_ms = expiry_ms
        self.forget_after_ms = forget_after_ms
        self.max_peers = max_peers
        self._peers: dict[str, PeerState] = {}

    def _deadline(self, p: PeerState) -> int:
        return p.last_seen_ms + max(self.expiry_ms, 3 * p.announcement.interval_ms)

    def observe(self, ann: Announcement, now_ms: int) -> bool:
        """Record an announcement; True if the peer is new or was expired (came back)."""
        prev = self._peers.get(ann.node_id)
        if prev is None and len(self._peers) >= self.max_peers:
            self.expire(now_ms)
            if len(self._peers) >= self.max_peers:
                oldest = min(self._peers.values(), key=lambda p: p.last_seen_ms)
                del self._peers[oldest.announcement.node_id]
        came_back = prev is None or not prev.live
        self._peers[ann.node_id] = PeerState(ann, max(now_ms, prev.last_seen_ms if prev else 0))
        return came_back

    def expire(self, now_ms: int) -> list[str]:
        """Mark silent peers dead (returned), forget long-dead ones."""
        expired = []
        for node_id, p in list(self._peers.items()):
            if p.live and now_ms > self._deadline(p):
                p.live = False
                expired.append(node_id)
            elif not p.live and now_ms > p.last_seen_ms + self.forget_after_ms:
                del self._peers[node_id]
        return expired

    def get(self, node_id: str) -> PeerState | None:
        return self._peers.get(node_id)

    def is_live(self, node_id: str, now_ms: int) -> bool:
        p = self._peers.get(node_id)
        return p is not None and p.live and now_ms <= self._deadline(p)

    def live(self, now_ms: int) -> list[PeerState]:
        return [p for p in self._peers.values()
                if p.live and now_ms <= self._deadline(p)]

    def all(self) -> list[PeerState]:
        return list(self._peers.values())

    def remove(self, node_id: str) -> None:
        self._peers.pop(node_id, None)


@dataclass(frozen=True, slots=True)
class Route:
    topic: str
    shard: int
    owner: str
    advertiser: str
    version: int


class RoutingCache:
    """topic → (shard, owner), updated incrementally from advertisements."""

    def __init__(self, max_routes: int = DEFAULT_MAX_ROUTES) -> None:
        self.max_routes = max_routes
        self._routes: dict[str, Route] = {}
        self._versions: dict[str, int] = {}

    def apply(self, ad: RouteAdvertisement) -> list[RouteEntry]:
        """Apply one advertisement; returns the entries that changed the cache
        (an older or repeated version changes nothing)."""
        if ad.version <= self._versions.get(ad.node_id, -1):
            return []
        self._versions[ad.node_id] = ad.version
        changed = []
        for entry in ad.routes:
            cur = self._routes.get(entry.topic)
            if entry.withdrawn:
                if cur is not None and cur.advertiser == ad.node_id:
                    del self._routes[entry.topic]
                    changed.append(entry)
                continue
            new = Route(entry.topic, entry.shard, entry.owner, ad.node_id, ad.version)
            if cur is not None and (cur.shard, cur.owner) == (new.shard, new.owner):
                self._routes[entry.topic] = new
                continue
            if cur is None and len(self._routes) >= self.max_routes:
                continue
            self._routes[entry.topic] = new
            changed.append(entry)
        return changed

    def lookup(self, topic: str) -> Route | None:
        return self._routes.get(topic)

    def drop_advertiser(self, node_id: str) -> int:
        """Forget every route a (slashed) node advertised; returns how many."""
        gone = [t for t, r in self._routes.items() if r.advertiser == node_id]
        for t in gone:
            del self._routes[t]
        return len(gone)

    def __len__(self) -> int:
        return len(self._routes)
