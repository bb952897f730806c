"""Peer table liveness and the incremental routing cache."""

from __future__ import annotations

import pytest

from pqcnet.crypto.pqc import RecipientKey
from pqcnet.mesh.errors import MalformedMessage
from pqcnet.mesh.messages import Announcement, Endpoint, RouteAdvertisement, RouteEntry
from pqcnet.mesh.peers import PeerTable, RoutingCache


def _ann(node: str, interval_ms: int = 1000) -> Announcement:
    return Announcement(node, "sentry", ("rpc",), b"\x01" * 32, "stake1", (
        Endpoint("qstp", "127.0.0.1:9000"),), 1, RecipientKey.generate().public, interval_ms)


def test_announcement_codec_roundtrip() -> None:
    ann = _ann("n1")
    assert Announcement.decode(ann.encode()) == ann
    with pytest.raises(MalformedMessage):
        Announcement.decode(b"\xff\x01garbage")


def test_liveness_expiry_and_return() -> None:
    table = PeerTable(expiry_ms=1000, forget_after_ms=10_000)
    assert table.observe(_ann("a", 100), 0) is True
    assert table.observe(_ann("a", 100), 500) is False          # already live
    assert table.observe(_ann("b", 100), 600) is True
    assert table.expire(1400) == []
    assert table.expire(1501) == ["a"]                           # silent for > 1000 ms
    assert [p.announcement.node_id for p in table.live(1501)] == ["b"]
    assert table.observe(_ann("a", 100), 1600) is True           # came back
    assert table.is_live("a", 1600)
    table.expire(3000)
    table.expire(20_000)                                         # long dead: forgotten
    assert table.get("a") is None


def test_peer_table_is_bounded() -> None:
    table = PeerTable(expiry_ms=1000, max_peers=3)
    for i in range(10):
        table.observe(_ann(f"n{i}"), i)
    assert len(table.all()) == 3
    assert {p.announcement.node_id for p in table.all()} == {"n7", "n8", "n9"}


def test_routing_cache_incremental() -> None:
    cache = RoutingCache()
    ad1 = RouteAdvertisement("r1", 1, (RouteEntry("orders", 0, "r1"),
                                       RouteEntry("trades", 1, "r1")))
    assert len(cache.apply(ad1)) == 2
    assert cache.apply(ad1) == []                                # same version: no change
    ad2 = RouteAdvertisement("r1", 2, (RouteEntry("orders", 0, "r1"),
                                       RouteEntry("trades", 1, "r1", withdrawn=True),
                                       RouteEntry("quotes", 2, "r1")))
    changed = cache.apply(ad2)
    assert {e.topic for e in changed} == {"trades", "quotes"}
    assert cache.lookup("trades") is None and cache.lookup("quotes").shard == 2  # type: ignore[union-attr]
    # an older advertisement arriving late is ignored
    assert cache.apply(RouteAdvertisement("r1", 1, (RouteEntry("zzz", 9, "r1"),))) == []
    # another node cannot withdraw r1's route
    cache.apply(RouteAdvertisement("r2", 1, (RouteEntry("orders", 0, "r1", withdrawn=True),)))
    assert cache.lookup("orders") is not None
    assert RouteAdvertisement.decode(ad2.encode()) == ad2
    assert cache.drop_advertiser("r1") == 2 and len(cache) == 0
