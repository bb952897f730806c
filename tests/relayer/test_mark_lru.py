"""Bounded per-topic marks: more topics than the LRU holds, so marks are evicted and read
back from the durable store on a miss — order, dedup and exactly-once must not change,
including across a restart (where no marks are preloaded at all)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from pqcnet.relayer.bus.base import Bus, Delivery
from pqcnet.relayer.frame import Frame, encode
from pqcnet.relayer.seqstore import RedisSeqStore, RocksSeqStore, SeqStore
from pqcnet.relayer.sequencer import Deliver, Duplicate, Sequencer
from pqcnet.relayer.worker import RelayerShardWorker, WorkerConfig
from tests.relayer.conftest import BusFactory
from tests.relayer.helpers import CollectSink, assert_exactly_once_in_order

pytestmark = pytest.mark.timeout(90)

LRU = 4
TOPICS = [(f"cust{i % 3}", f"chan{i}") for i in range(40)]  # 10x the LRU


def _d(n: int) -> Delivery:
    return Delivery(0, n, b"")


def test_sequencer_evicts_only_clean_unbuffered_topics() -> None:
    s = Sequencer(max_topics=2)
    a, b, c = ("c", "a"), ("c", "b"), ("c", "c")
    for i, t in enumerate((a, b, c)):
        assert isinstance(s.offer(Frame(*t, 1, b""), _d(i), 0.0)[0], Deliver)
    s.offer(Frame(*a, 5, b""), _d(9), 0.0)  # a holds a frame out of order
    assert s.evict() == 0  # every mark is dirty (not yet persisted): nothing may go
    assert s.take_dirty() == {a: 2, b: 2, c: 2}
    assert s.evict() == 1 and s.cached_topics == 2 and s.missing([a, b, c]) == [b]
    # a miss is primed from the store's mark: the old seq stays a duplicate
    s.prime({b: 2}, [b])
    assert isinstance(s.offer(Frame(*b, 1, b""), _d(10), 0.0)[0], Duplicate)
    assert isinstance(s.offer(Frame(*b, 2, b""), _d(11), 0.0)[0], Deliver)
    s.prime({}, [("c", "new")])
    assert s.next_seq(("c", "new")) == 1
    with pytest.raises(ValueError):
        Sequencer(max_topics=0)


async def _publish(bus: Bus, upto: int, start: int, rng: random.Random) -> None:
    """Topics interleaved round-robin (so the LRU churns), some frames twice, some
    pairs swapped (out of order), all on shard 0."""
    for seq in range(start, upto + 1, 2):
        recs = []
        for c, ch in rng.sample(TOPICS, len(TOPICS)):
            pair = [encode(Frame(c, ch, s, b"p")) for s in (seq, seq + 1) if s <= upto]
            if rng.random() < 0.3:
                pair.reverse()
            if rng.random() < 0.2:
                pair.append(pair[0])  # a publisher retry
            recs += pair
        await bus.publish(0, recs)


def _store(backend: str, bus: Bus, tmp_path: Path) -> SeqStore:
    if backend == "redis":
        from pqcnet.relayer.bus.redis_streams import RedisStreamsBus

        assert isinstance(bus, RedisStreamsBus)
        return RedisSeqStore(bus.client, bus.prefix)
    return RocksSeqStore(tmp_path / "marks")


async def test_evicted_topics_exactly_once_across_restart_embedded(
    embedded_bus_factory: BusFactory, tmp_path: Path
) -> None:
    await _evicted_topics_exactly_once(embedded_bus_factory, "embedded", tmp_path)


@pytest.mark.services
async def test_evicted_topics_exactly_once_across_restart_redis(
    redis_bus_factory: BusFactory, tmp_path: Path
) -> None:
    await _evicted_topics_exactly_once(redis_bus_factory, "redis", tmp_path)


async def _evicted_topics_exactly_once(factory: BusFactory, backend: str,
                                       tmp_path: Path) -> None:
    rng = random.Random(7)
    sink = CollectSink()
    cfg = WorkerConfig(batch=64, poll_timeout=0.05, max_topics=LRU)

    async def run(upto: int, start: int) -> RelayerShardWorker:
        bus = factory(shards=1, consumer="r1")
        store = _store(backend, bus, tmp_path)
        w = RelayerShardWorker(bus, 0, store, sink, cfg)
        task = asyncio.create_task(w.run())
        await _publish(bus, upto, start, rng)
        await sink.wait_for(len(TOPICS) * upto, 60)
        lag = -1

        async def drained() -> bool:  # every record, duplicates too, is acked in the end
            nonlocal lag
            lag = await bus.lag(0, "relayer")
            return lag == 0

        async with asyncio.timeout(30):
            while not await drained():  # noqa: ASYNC110 - lag lives in the bus
                await asyncio.sleep(0.05)
        assert w.stats.duplicates > 0
        w.stop()
        await asyncio.wait_for(task, 10)
        assert w._seq is not None and w._seq.cached_topics <= LRU
        if isinstance(store, RocksSeqStore):
            store.close()
        await bus.close()
        return w

    first = await run(10, 1)
    assert first.stats.evictions > 0 and first.stats.mark_loads > len(TOPICS)
    # restart: nothing preloaded; publishers retry seqs 5..10 (already delivered), then go on
    second = await run(16, 5)
    assert second.stats.duplicates >= len(TOPICS) * 6  # the retried 5..10 of every topic
    assert second.stats.evictions > 0
    assert_exactly_once_in_order(sink.by_topic, dict.fromkeys(TOPICS, 16))


async def test_volume_totals_exact_past_the_bounded_cache(tmp_path: Path) -> None:
    """The RocksDB store keeps at most ``vol_cache`` volume totals in memory; totals it
    dropped are read back when next updated, so the persisted sums stay exact."""
    store = RocksSeqStore(tmp_path / "marks", vol_cache=LRU)
    rng = random.Random(7)
    want: dict[tuple[int, str, str, int], list[int]] = {}
    for _ in range(30):  # 30 saves over 40 topics: most updates miss the cache
        delta = {}
        for c, ch in rng.sample(TOPICS, 8):
            key = (5, c, ch, 1)
            delta[key] = [rng.randint(1, 100), 1]
            w = want.setdefault(key, [0, 0])
            w[0] += delta[key][0]
            w[1] += 1
        await store.save(0, {}, delta)
        assert len(store._vol) <= LRU
    assert await store.load_volume() == want
    store.close()
    reopened = RocksSeqStore(tmp_path / "marks")
    try:
        assert await reopened.load_volume() == want
    finally:
        reopened.close()
