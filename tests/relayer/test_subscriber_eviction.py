"""A subscriber that stops acknowledging cannot stall its shard for good.

Delivery waits until every subscriber acknowledged its share of a batch (the meter
counts what subscribers took). A subscriber on a live tunnel whose application hung —
or one that stopped reading its stream altogether — used to stall its shard's worker
for as long as its tunnel lived: its own customer's other subscribers *and other
customers whose topics share the shard* got nothing more. Now it is evicted after
``subscriber_ack_timeout``; the batch goes to the subscribers left (their cursors drop
the repeat) and ``/metrics`` counts the eviction. Histories are read at the healthy
subscribers: every seq once, in order."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pqcnet.errors import PqcnetError
from pqcnet.relayer.client import RelayerRefused, SubscriberClient
from pqcnet.relayer.frame import Frame
from tests.relayer.e2e import Collector, identities, publisher, start_node, subscriber
from tests.relayer.helpers import eventually, metrics_reach, same_shard, scrape_metrics

pytestmark = pytest.mark.timeout(120)
SHARDS = 8




@pytest.mark.parametrize("payload", [16, 512 * 1024], ids=["hung-app", "stopped-reading"])
async def test_a_subscriber_that_never_acks_is_evicted(tmp_path: Path, payload: int) -> None:
    """``hung-app``: small frames, the stuck subscriber's tunnel takes them but its
    application never asks for the next batch (no ack). ``stopped-reading``: 9 MiB for
    its customer, more than its tunnel's window, so the relayer's write to it blocks."""
    node = await start_node(tmp_path, shards=SHARDS, subscriber_ack_timeout=1.0,
                            metrics_port=0)
    a, g = same_shard(SHARDS)
    acme, globex = ("acme", a), ("globex", g)
    stuck = await SubscriberClient.connect("127.0.0.1", node.port, identities()[2])
    healthy = other = pub = None
    try:
        healthy = await subscriber(node.port, "acme")
        other = await subscriber(node.port, "globex")
        await stuck.subscribe("acme")  # and never reads a batch: no ack, ever
        pub = await publisher(node.port)
        await asyncio.sleep(0.3)  # the three subscriptions are in place
        n = 18
        for seq in range(1, n + 1):  # one request per seq: one batch each, in turn
            results = await pub.publish([Frame(*acme, seq, b"a" * payload),
                                         Frame(*globex, seq, b"g" * 16)])
            assert all(r.accepted for r in results), results
        await healthy.wait_for(n, 60)
        await other.wait_for(n, 60)
        assert healthy.by_topic[acme] == list(range(1, n + 1))
        assert other.by_topic[globex] == list(range(1, n + 1))
        assert node.metrics_port is not None
        got = await asyncio.to_thread(scrape_metrics, node.metrics_port)
        assert got["pqcnet_relayer_subscriber_ack_timeouts_total"] == 1
        assert got["pqcnet_relayer_subscribers"] == 2  # the stuck one is gone
        assert got["pqcnet_relayer_held_frames"] == 0
        with pytest.raises(PqcnetError):  # its stream was reset
            async with asyncio.timeout(10):
                async for _ in stuck.batches():
                    pass
                raise AssertionError("the stream ended without an error")
    finally:
        for c in (healthy, other):
            if c is not None:
                await c.close()
        if pub is not None:
            await pub.close()
        await stuck.close()
        await node.stop()


def test_a_new_hub_checks_its_bound_and_starts_at_zero() -> None:
    from pqcnet.relayer.egress import ACK_TIMEOUT, SubscriberHub

    hub = SubscriberHub()
    assert (hub.ack_timeout, hub.ack_timeouts, hub.held, hub.may_receive) == (
        ACK_TIMEOUT, 0, 0, None)
    with pytest.raises(ValueError, match="ack_timeout"):
        SubscriberHub(ack_timeout=0)


async def test_a_subscriber_evicted_again_and_again_is_quarantined(tmp_path: Path) -> None:
    """A hung application that reconnects stalled its shard for ``ack_timeout`` every
    time. Its second eviction makes its peer's new subscriptions to that customer be
    refused (code 31, ``SubscriberQuarantined``) for a while; another peer's
    subscription to the same customer is not refused, and after the quarantine the
    peer may subscribe again."""
    node = await start_node(tmp_path, shards=SHARDS, subscriber_ack_timeout=0.5,
                            metrics_port=0)
    topic = ("acme", "q")
    pub = healthy = None
    try:
        pub = await publisher(node.port)
        seq = 0

        async def hang_once() -> SubscriberClient:
            """Subscribe as the subscriber identity, take a batch's stream, never ack."""
            nonlocal seq
            stuck = await SubscriberClient.connect("127.0.0.1", node.port, identities()[2])
            await stuck.subscribe("acme")
            await eventually(lambda: node.hub.count() >= 1)
            seq += 1
            assert (await pub.publish([Frame(*topic, seq, b"x")]))[0].accepted
            return stuck

        evicted = []
        for strike in (1, 2):
            evicted.append(await hang_once())
            await eventually(lambda s=strike: node.hub.ack_timeouts == s, 20)
        # the third try is refused at once: the stream carries code 31 and ends
        again = await SubscriberClient.connect("127.0.0.1", node.port, identities()[2])
        evicted.append(again)
        await again.subscribe("acme")
        with pytest.raises(RelayerRefused) as refused:
            async with asyncio.timeout(10):
                async for _ in again.batches():
                    pass
        assert refused.value.code == 31 and "evicted 2 times" in str(refused.value)
        assert node.hub.quarantine_refusals == 1
        # another peer (the publisher's identity may subscribe under GRANT_ALL) is not
        # quarantined: it gets the frames the evicted ones left unacknowledged
        healthy = Collector(await SubscriberClient.connect("127.0.0.1", node.port,
                                                           identities()[1]))
        await healthy.client.subscribe("acme")
        await healthy.wait_for(seq, 20)
        assert healthy.by_topic[topic] == list(range(1, seq + 1))
        assert node.metrics_port is not None
        await metrics_reach(node.metrics_port, {
            "pqcnet_relayer_subscriber_quarantine_refusals_total": 1.0,
            "pqcnet_relayer_subscriber_ack_timeouts_total": 2.0})
        await asyncio.sleep(0.6)  # the quarantine (ack_timeout x 1) is over
        later = await SubscriberClient.connect("127.0.0.1", node.port, identities()[2])
        evicted.append(later)
        await later.subscribe("acme")
        await eventually(lambda: node.hub.count() == 2, 10)  # accepted this time
    finally:
        for c in evicted:
            await c.close()
        if healthy is not None:
            await healthy.close()
        if pub is not None:
            await pub.close()
        await node.stop()
