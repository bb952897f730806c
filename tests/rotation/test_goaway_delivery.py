"""A subscriber whose tunnel is ended (GOAWAY, as certificate rotation does before expiry)
mid-stream keeps receiving every acknowledged frame.

The soak test (test_soak.py) found deliveries stalling for good after a rotation: when a
subscriber's stream handler was cancelled just after it had taken a share out of its
queue (and before it wrote it), that share was neither written nor failed, so the shard
worker waited for its ack forever and every later frame of the shard stayed on the bus.
The first test hits that window deterministically; the second is the end-to-end
outcome, checked from the clients' histories with the chaos checker.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from pqcnet.chaos.checker import check
from pqcnet.chaos.clients import run_publisher, run_subscriber
from pqcnet.qstp.errors import TunnelClosed
from pqcnet.relayer.client import SubscriberClient
from pqcnet.relayer.frame import Frame
from tests.relayer.e2e import identities, start_node

pytestmark = pytest.mark.timeout(180)

SUB_ID = str(identities()[2].spiffe_id)


async def test_share_taken_by_a_cancelled_stream_handler_is_failed_not_lost(
        tmp_path: Path) -> None:
    node = await start_node(tmp_path, shards=1)
    client = await SubscriberClient.connect("127.0.0.1", node.port, identities()[2])
    try:
        await client.subscribe("acme")
        async with asyncio.timeout(10):
            while node.hub.count() < 1:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        server = node.server
        assert server is not None
        # deliver() puts the share in the subscription's queue (waking the handler's
        # queue read); in the same loop turn the tunnel is ended, which cancels the
        # handler right after that read took the share
        deliver = asyncio.create_task(node.hub.deliver(0, [Frame("acme", "c", 1, b"x")]))
        await asyncio.sleep(0)
        ended = await server.end_tunnels(lambda _p: "certificate renewed; reconnect")
        assert ended == 1
        # the share must be failed (the worker then resets and redelivers), not left
        # waiting for an ack that can never come
        async with asyncio.timeout(10):
            with pytest.raises(TunnelClosed):
                await deliver
        assert node.hub.count() == 0
        assert node.hub.unacked() == 0
    finally:
        await client.close()
        await node.stop()


async def test_subscriber_goaway_mid_stream_every_acked_frame_taken(tmp_path: Path) -> None:
    node = await start_node(tmp_path, shards=2)
    pub_hist, journal = tmp_path / "pub.jsonl", tmp_path / "sub.jsonl"
    topics = [("acme", "a"), ("acme", "b")]
    count = 400
    target = [("127.0.0.1", node.port)]
    sub = asyncio.create_task(run_subscriber(target, identities()[2], journal, "acme",
                                             until=len(topics) * count))
    pub = asyncio.create_task(run_publisher(target, identities()[1], pub_hist, topics, count,
                                            batch=2, pace=0.0))
    server = node.server
    assert server is not None
    goaways = 0

    async def busy_loop() -> None:
        # a loaded node: every loop turn takes a while (the soak's handshakes and
        # signatures), so timers, socket reads and deliveries land in the same turn
        while True:
            time.sleep(0.005)  # noqa: ASYNC251 - blocking on purpose: a busy loop
            await asyncio.sleep(0)

    hog = asyncio.create_task(busy_loop())
    try:
        # end the subscriber's tunnel over and over while frames flow, like a rotation
        # does (GOAWAY, a short grace for open streams, then close)
        while not pub.done():
            await asyncio.sleep(0.1)
            goaways += await server.end_tunnels(
                lambda p: "certificate renewed; reconnect"
                if str(p.spiffe_id) == SUB_ID else None, grace_s=0.05)
        await pub
        with contextlib.suppress(TimeoutError):  # the checker says what is missing
            async with asyncio.timeout(30):
                await asyncio.shield(sub)
    finally:
        for t in (pub, sub, hog):
            t.cancel()
            with contextlib.suppress(BaseException):
                await t
        await node.stop()
    report = check([pub_hist, journal])
    assert report.ok, report.table()
    assert goaways >= 10
    assert report.total("acked") == len(topics) * count
    assert report.total("taken") == len(topics) * count
