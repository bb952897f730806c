"""Subscriber acknowledgements: a batch counts (marks, meter, bus ack) only once acked.

Real relayer node (embedded RocksDB bus), real QSTP tunnels on loopback.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pqcnet.relayer.client import SubscriberClient
from pqcnet.relayer.frame import Frame, Topic
from pqcnet.relayer.node import RelayerNode
from pqcnet.relayer.wire import MessageReader, decode_server
from tests.relayer.e2e import identities, publisher, start_node, subscriber
from tests.relayer.helpers import assert_exactly_once_in_order, eventually

pytestmark = pytest.mark.timeout(90)

TOPICS: list[Topic] = [("acme", f"ch{i}") for i in range(5)]
N = 40


def _metered(node: RelayerNode) -> tuple[int, int]:
    recs = node.meter.query()
    return sum(r.frames for r in recs), sum(r.bytes for r in recs)


async def _publish_all(port: int) -> None:
    pub = await publisher(port)
    try:
        for start in range(1, N + 1, 10):
            frames = [Frame(c, ch, s, b"x" * 16) for c, ch in TOPICS
                      for s in range(start, start + 10)]
            assert all(r.accepted for r in await pub.publish(frames))
    finally:
        await pub.close()


async def _raw_subscriber(port: int) -> SubscriberClient:
    client = await SubscriberClient.connect("127.0.0.1", port, identities()[2])
    await client.subscribe("acme")
    return client


async def _read_batches(client: SubscriberClient, reader: MessageReader) -> list[list[Frame]]:
    """Whatever delivery batches arrive within a short read (no acks sent)."""
    assert client._stream is not None
    out: list[list[Frame]] = []
    try:
        async with asyncio.timeout(0.5):
            while chunk := await client._stream.recv():
                out += [m for m in map(decode_server, reader.feed(chunk)) if isinstance(m, list)]
    except TimeoutError:
        pass
    return out


async def test_tunnel_dies_between_write_and_read_nothing_lost_nothing_metered_twice(
        tmp_path: Path) -> None:
    node = await start_node(tmp_path)
    first = await _raw_subscriber(node.port)
    second = None
    try:
        await eventually(lambda: node.hub.count() == 1)
        await _publish_all(node.port)
        # the relayer wrote batches to the first subscriber, which never reads or acks them
        await eventually(lambda: node.hub.unacked() > 0)
        assert _metered(node) == (0, 0)  # written is not delivered: nothing counted yet
        await first.tunnel.close()  # the tunnel dies before the application read anything
        await eventually(lambda: node.hub.count() == 0)
        assert _metered(node) == (0, 0)

        second = await subscriber(node.port, "acme")
        await second.wait_for(len(TOPICS) * N)
        await eventually(lambda: _metered(node)[0] == len(TOPICS) * N)
        await asyncio.sleep(0.3)  # let any stray redelivery land before the final check
        assert_exactly_once_in_order(second.by_topic, {t: N for t in TOPICS})
        assert _metered(node) == (len(TOPICS) * N, len(TOPICS) * N * 16)
        assert node.hub.unacked() == 0
        assert sum(w.stats.resets for w in node.workers) >= 1  # the loss was noticed
    finally:
        if second is not None:
            await second.close()
        await first.close()
        await node.stop()


async def test_in_flight_window_is_bounded_and_acks_open_it(tmp_path: Path) -> None:
    node = await start_node(tmp_path, shards=8)
    node.hub.max_unacked = 2
    client = await _raw_subscriber(node.port)
    reader = MessageReader()
    try:
        await eventually(lambda: node.hub.count() == 1)
        await _publish_all(node.port)
        got = await _read_batches(client, reader)
        assert 0 < len(got) <= 2  # never more than the window unacked
        await eventually(lambda: node.hub.unacked() == 2)
        assert _metered(node) == (0, 0)
        seen: dict[Topic, list[int]] = {t: [] for t in TOPICS}
        for _ in range(200):  # ack what arrived, read the next window, until all came
            upto: dict[Topic, int] = {}
            for batch in got:
                for f in batch:
                    seen[f.topic].append(f.seq)
                    upto[f.topic] = f.seq
            if sum(map(len, seen.values())) >= len(TOPICS) * N:
                await client.ack(upto)
                break
            await client.ack(upto)
            got = await _read_batches(client, reader)
            assert len(got) <= 2
        assert_exactly_once_in_order(seen, {t: N for t in TOPICS})
        await eventually(lambda: _metered(node)[0] == len(TOPICS) * N)
    finally:
        await client.close()
        await node.stop()


async def test_ack_outside_a_subscription_is_a_typed_error(tmp_path: Path) -> None:
    from pqcnet.relayer.client import RelayerRefused
    from pqcnet.relayer.wire import encode_ack

    node = await start_node(tmp_path)
    pub = await publisher(node.port)
    try:
        await pub.send_raw(encode_ack({("acme", "c"): 5}))
        with pytest.raises(RelayerRefused, match="ack without a subscription"):
            await pub.publish([Frame("acme", "c", 1, b"p")])
        # the stream survives: the next request is answered normally
        assert (await pub.publish([Frame("acme", "c", 2, b"p")]))[0].accepted
    finally:
        await pub.close()
        await node.stop()
