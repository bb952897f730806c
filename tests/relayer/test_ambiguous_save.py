"""A marks+volume write that fails without saying whether it was applied — the store's
connection closed under it (the chaos run's Redis SIGKILL) — is neither lost from
metering nor counted twice: the worker asks the store whether the write's token
landed before it counts the batch (``SeqStore.landed``).

Found by ``tests/chaos/test_faults.py::test_redis_with_broker_restart``: 10 frames
delivered and persisted, but missing from the relayer's metering (billing anomaly).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping
from pathlib import Path

import redis.asyncio as aioredis

from pqcnet.relayer.bus.embedded import EmbeddedBus
from pqcnet.relayer.errors import BusUnavailable
from pqcnet.relayer.frame import Frame, Topic, encode
from pqcnet.relayer.gapfence import SeqRanges
from pqcnet.relayer.metering import VolumeDelta, VolumeMeter
from pqcnet.relayer.seqstore import RedisSeqStore, RocksSeqStore, StreamAck
from pqcnet.relayer.worker import RelayerShardWorker, WorkerConfig
from tests.relayer.helpers import CollectSink

N = 10


class OnceFailingStore(RocksSeqStore):
    """A real store whose first volume write fails — after it was applied (``landed``)
    or before — the way a closed connection reports both."""

    def __init__(self, path: Path, *, apply_first: bool) -> None:
        super().__init__(path)
        self.apply_first = apply_first
        self.failed = False

    async def save(self, shard: int, marks: Mapping[Topic, int],
                   volume: VolumeDelta | None = None, *, token: bytes = b"",
                   gaps: Mapping[Topic, SeqRanges] | None = None,
                   ack: StreamAck | None = None) -> None:
        if volume and not self.failed:
            self.failed = True
            if self.apply_first:
                await super().save(shard, marks, volume, token=token, gaps=gaps, ack=ack)
            raise BusUnavailable("redis unavailable saving marks: Connection closed by server")
        await super().save(shard, marks, volume, token=token, gaps=gaps, ack=ack)


async def _run(tmp_path: Path, *, apply_first: bool) -> tuple[VolumeMeter, CollectSink,
                                                              RelayerShardWorker]:
    bus = EmbeddedBus(tmp_path / "bus", shards=1)
    store = OnceFailingStore(tmp_path / "state", apply_first=apply_first)
    sink = CollectSink()
    meter = VolumeMeter(epoch_seconds=3600)
    w = RelayerShardWorker(bus, 0, store, sink, WorkerConfig(poll_timeout=0.05), meter=meter)
    task = asyncio.create_task(w.run())
    try:
        await bus.publish(0, [encode(Frame("acme", "ch", s, b"x" * 8)) for s in range(1, N + 1)])
        for _ in range(200):  # delivered, and the failed write settled one way or the other
            if store.failed and w._unsure is None and sum(
                    r.frames for r in meter.query()) >= N:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # a double count has time to show
    finally:
        w.stop()
        await asyncio.wait_for(task, 5)
        store.close()
        await bus.close()
    return meter, sink, w


async def test_a_write_that_landed_is_counted_once(tmp_path: Path) -> None:
    meter, sink, w = await _run(tmp_path, apply_first=True)
    assert [(r.customer, r.channel, r.frames) for r in meter.query()] == [("acme", "ch", N)]
    assert w.stats.unsure_landed == 1 and w.stats.resets >= 1
    # the marks landed with it: nothing is delivered again
    assert sink.by_topic[("acme", "ch")] == list(range(1, N + 1))
    assert all(meter.settled(e) for e in meter.epochs())


async def test_a_write_that_did_not_land_is_counted_after_redelivery(tmp_path: Path) -> None:
    meter, sink, w = await _run(tmp_path, apply_first=False)
    assert [(r.customer, r.channel, r.frames) for r in meter.query()] == [("acme", "ch", N)]
    assert w.stats.unsure_landed == 0 and w.stats.resets >= 1
    # the marks did not land either: the batch was delivered again, in order
    assert sink.by_topic[("acme", "ch")][-N:] == list(range(1, N + 1))
    assert all(meter.settled(e) for e in meter.epochs())


async def test_redis_store_records_the_token_in_the_same_write(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    store = RedisSeqStore(client, f"pqcnet-test-{uuid.uuid4().hex[:8]}", "r1")
    try:
        vol: VolumeDelta = {(0, "acme", "ch", 1): [8, 1]}
        assert not await store.landed(3, b"\x01" * 8)
        await store.save(3, {("acme", "ch"): 2}, vol, token=b"\x01" * 8)
        assert await store.landed(3, b"\x01" * 8)
        assert not await store.landed(3, b"\x02" * 8) and not await store.landed(4, b"\x01" * 8)
        await store.save(3, {("acme", "ch"): 3}, vol, token=b"\x02" * 8)
        assert await store.landed(3, b"\x02" * 8) and not await store.landed(3, b"\x01" * 8)
    finally:
        await client.aclose()
