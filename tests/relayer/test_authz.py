"""Data-plane authorization (issue 11, reproduction 3): a peer publishes to, subscribes
to and is billed as only the customers its SPIFFE identity is granted.

Attacker's chair: tenant ``mallory`` holds a valid mesh certificate and tries to
publish as ``acme`` (to be metered to acme) and to read acme's channel. Real relayer
node (embedded bus), real QSTP tunnels on loopback.
"""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path
from typing import Any

import pytest

from pqcnet.identity import NodeIdentity, dev_identities
from pqcnet.relayer.client import PublisherClient, RelayerRefused, SubscriberClient
from pqcnet.relayer.config import RelayerConfig
from pqcnet.relayer.frame import Frame
from pqcnet.relayer.node import RelayerNode
from tests.relayer.e2e import Collector
from tests.relayer.helpers import eventually

pytestmark = pytest.mark.timeout(90)

TD = "pqcnet.test"
NAMES = ("acme/relayer/r1", "acme/publisher/p1", "acme/subscriber/s1",
         "mallory/publisher/m1", "mallory/subscriber/m2", "partner/publisher/x1")


@functools.cache
def ids() -> dict[str, NodeIdentity]:
    _, nodes = dev_identities(TD, *(f"spiffe://{TD}/{n}" for n in NAMES))
    return {n.split("/")[-1]: node for n, node in zip(NAMES, nodes)}


async def start(tmp: Path, **kw: Any) -> RelayerNode:
    cfg = RelayerConfig(listen_port=0, data_dir=str(tmp / "relayer"), shards=4, **kw)
    node = RelayerNode(cfg, ids()["r1"])
    await node.start()
    return node


async def test_cross_customer_publish_is_refused_and_not_billed(tmp_path: Path) -> None:
    node = await start(tmp_path)
    mallory = await PublisherClient.connect("127.0.0.1", node.port, ids()["m1"])
    own = await PublisherClient.connect("127.0.0.1", node.port, ids()["p1"])
    try:
        res = await mallory.publish([Frame("acme", "orders", 1, b"forged"),
                                     Frame("mallory", "orders", 1, b"mine")])
        assert not res[0].accepted and res[0].code == 16, res[0]
        assert "not authorized" in res[0].reason
        assert res[1].accepted  # a tenant is its own customer
        assert (await own.publish([Frame("acme", "orders", 1, b"ok")]))[0].accepted
        assert node.ingress.stats.unauthorized == 1
        sub = Collector(await SubscriberClient.connect("127.0.0.1", node.port, ids()["s1"]))
        await sub.client.subscribe("acme")
        await sub.wait_for(1)
        await asyncio.sleep(0.3)
        assert [f.payload for f in sub.frames] == [b"ok"]  # mallory's frame never got in
        await eventually(lambda: node.meter.query())
        billed = {r.customer: r.frames for r in node.meter.query()}
        assert billed == {"acme": 1}, billed  # acme is billed only for its own frame
        await sub.close()
    finally:
        await mallory.close()
        await own.close()
        await node.stop()


async def test_cross_customer_subscribe_is_refused_with_a_typed_error(tmp_path: Path) -> None:
    node = await start(tmp_path)
    spy = await SubscriberClient.connect("127.0.0.1", node.port, ids()["m2"])
    try:
        await spy.subscribe("acme", ("orders",))
        with pytest.raises(RelayerRefused) as err:
            async for _batch in spy.batches():
                break
        assert err.value.code == 16 and "not authorized" in str(err.value)
        assert node.ingress.stats.unauthorized == 1
        assert node.hub.count() == 0
    finally:
        await spy.close()
        await node.stop()


async def test_explicit_grant_and_hot_reload(tmp_path: Path) -> None:
    grant = {"customers": {"acme": [{"from": [f"spiffe://{TD}/partner/publisher/*"],
                                     "methods": ["publish"], "channels": ["orders"]}]}}
    node = await start(tmp_path, authz=grant)
    partner = await PublisherClient.connect("127.0.0.1", node.port, ids()["x1"])
    try:
        ok, other = await partner.publish([Frame("acme", "orders", 1, b"granted"),
                                           Frame("acme", "payroll", 1, b"not granted")])
        assert ok.accepted and not other.accepted and other.code == 16
        node.reload(node.cfg.replace(authz={}))  # the grant is withdrawn while running
        (again,) = await partner.publish([Frame("acme", "orders", 2, b"now refused")])
        assert not again.accepted and again.code == 16
    finally:
        await partner.close()
        await node.stop()


async def test_customer_quota_frames_and_bytes(tmp_path: Path) -> None:
    quotas = {"customers": {"acme": {"frames_per_s": 0.001, "frames_burst": 3},
                            "mallory": {"bytes_per_s": 0.001, "bytes_burst": 10}}}
    node = await start(tmp_path, quotas=quotas)
    pub = await PublisherClient.connect("127.0.0.1", node.port, ids()["p1"])
    mal = await PublisherClient.connect("127.0.0.1", node.port, ids()["m1"])
    try:
        res = await pub.publish([Frame("acme", "q", s, b"x") for s in range(1, 6)])
        assert [r.accepted for r in res] == [True, True, True, False, False]
        assert res[3].code == 33 and res[3].retriable and "frames/s" in res[3].reason
        res = await mal.publish([Frame("mallory", "q", 1, b"x" * 8),
                                 Frame("mallory", "q", 2, b"x" * 8)])
        assert [r.accepted for r in res] == [True, False] and "bytes/s" in res[1].reason
        assert node.quotas.refused == 3 and node.ingress.stats.over_quota == 3
    finally:
        await pub.close()
        await mal.close()
        await node.stop()


async def test_other_spiffe_shapes_need_a_configured_layout(tmp_path: Path) -> None:
    """``spiffe://corp.test/ns/acme/sa/pub`` is a valid SPIFFE ID of another shape: with
    no layout it has no tenant (refused, fail closed); a layout makes it tenant acme."""
    _, (relayer, pub_id) = dev_identities("corp.test", "spiffe://corp.test/ops/relayer/r1",
                                          "spiffe://corp.test/ns/acme/sa/pub")
    for layouts, accepted in (([], False),
                              ([{"template": "spiffe://corp.test/ns/{tenant}/sa/{node}",
                                 "role": "publisher"}], True)):
        cfg = RelayerConfig(listen_port=0, data_dir=str(tmp_path / f"r{accepted}"), shards=2,
                            spiffe_layouts=layouts)
        node = RelayerNode(cfg, relayer)
        await node.start()
        pub = await PublisherClient.connect("127.0.0.1", node.port, pub_id)
        try:
            (res,) = await pub.publish([Frame("acme", "orders", 1, b"x")])
            assert res.accepted is accepted, res
            if not accepted:
                assert res.code == 16
        finally:
            await pub.close()
            await node.stop()
    with pytest.raises(Exception, match="spiffe_layouts"):
        RelayerConfig.from_mapping({"spiffe_layouts": [{"template": "spiffe://corp.test/{x}"}]})


async def test_a_denied_channel_is_never_delivered_to_an_all_channels_subscriber(
        tmp_path: Path) -> None:
    """Attacker's chair: s1 may read acme but is denied channel ``audit``; it subscribes
    to *all* channels hoping the deny only applies to named ones."""
    deny = {"customers": {"acme": [{"action": "deny", "from": [f"spiffe://{TD}/acme/subscriber/*"],
                                    "methods": ["subscribe"], "channels": ["audit"]}]}}
    node = await start(tmp_path, authz=deny)
    pub = await PublisherClient.connect("127.0.0.1", node.port, ids()["p1"])
    sub = Collector(await SubscriberClient.connect("127.0.0.1", node.port, ids()["s1"]))
    try:
        await sub.client.subscribe("acme")
        await eventually(lambda: node.hub.count() == 1)
        res = await pub.publish([Frame("acme", "audit", 1, b"secret"),
                                 Frame("acme", "orders", 1, b"public")])
        assert all(r.accepted for r in res)
        await sub.wait_for(1)
        await asyncio.sleep(0.5)
        assert [f.payload for f in sub.frames] == [b"public"]
        assert {r.channel for r in node.meter.query()} <= {"orders"}  # nothing billed for it
    finally:
        await sub.close()
        await pub.close()
        await node.stop()


async def test_withdrawn_grant_stops_delivery_on_a_live_subscription(tmp_path: Path) -> None:
    """A partner subscribed under a grant; the grant is withdrawn by a reload while its
    subscription stays open: nothing more is delivered to it."""
    grant = {"customers": {"acme": [{"from": [f"spiffe://{TD}/mallory/subscriber/*"],
                                     "methods": ["subscribe"], "channels": ["orders"]}]}}
    node = await start(tmp_path, authz=grant)
    pub = await PublisherClient.connect("127.0.0.1", node.port, ids()["p1"])
    spy = Collector(await SubscriberClient.connect("127.0.0.1", node.port, ids()["m2"]))
    try:
        await spy.client.subscribe("acme", ("orders",))
        await eventually(lambda: node.hub.count() == 1)
        assert (await pub.publish([Frame("acme", "orders", 1, b"before")]))[0].accepted
        await spy.wait_for(1)
        node.reload(node.cfg.replace(authz={}))
        assert (await pub.publish([Frame("acme", "orders", 2, b"after")]))[0].accepted
        await asyncio.sleep(1.0)
        assert [f.payload for f in spy.frames] == [b"before"]
        # parked for an authorized subscriber, not dropped
        assert sum(w.parked_topics for w in node.workers) == 1
        node.reload(node.cfg.replace(authz=grant))  # restored: the parked frame goes out
        await spy.wait_for(2)
        assert [f.payload for f in spy.frames] == [b"before", b"after"]
        assert sum(w.parked_topics for w in node.workers) == 0
    finally:
        await spy.close()
        await pub.close()
        await node.stop()


async def test_more_tunnels_do_not_multiply_a_customer_quota(tmp_path: Path) -> None:
    """Attacker's chair: acme opens a second publisher tunnel (another identity of the
    same tenant) to get around its quota; the quota is the customer's, not the tunnel's."""
    node = await start(tmp_path, quotas={"customers": {"acme": {"frames_per_s": 0.001,
                                                                "frames_burst": 4}}})
    one = await PublisherClient.connect("127.0.0.1", node.port, ids()["p1"])
    two = await PublisherClient.connect("127.0.0.1", node.port, ids()["s1"])
    try:
        a = await one.publish([Frame("acme", "a", s, b"x") for s in range(1, 5)])
        b = await two.publish([Frame("acme", "b", s, b"x") for s in range(1, 5)])
        assert sum(r.accepted for r in a + b) == 4
        assert all(r.code == 33 for r in b)
    finally:
        await one.close()
        await two.close()
        await node.stop()
