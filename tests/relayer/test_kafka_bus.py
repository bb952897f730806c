"""Kafka backend against the real broker: topic with 32 partitions created by the
backend, idempotent acks=all publish, manual commits, restart without loss or
visible duplicates, exactly-once ordered delivery with concurrent publishers.

One topic per module (topic creation and metadata are the slow part); each test
uses its own consumer group and shards so tests do not see each other's records."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pqcnet.relayer.bus.kafka import KafkaBus
from pqcnet.relayer.frame import Frame, encode, shard_for
from pqcnet.relayer.seqstore import RocksSeqStore
from pqcnet.relayer.worker import RelayerShardWorker, WorkerConfig
from tests.relayer.helpers import CollectSink, assert_exactly_once_in_order, eventually

pytestmark = [pytest.mark.services, pytest.mark.timeout(120)]
TOPIC = f"pqcnet-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def bus(kafka_bootstrap: str) -> AsyncIterator[KafkaBus]:
    b = KafkaBus(kafka_bootstrap, 32, topic=TOPIC)
    await b.start()
    yield b
    await b.close()


async def test_contract_partitions_commit_and_restart(bus: KafkaBus, kafka_bootstrap: str) -> None:
    group = f"g-{uuid.uuid4().hex[:6]}"
    offs = await bus.publish(5, [b"a", b"b", b"c"])
    assert offs == sorted(offs) and len(set(offs)) == 3
    assert await bus.lag(5, group) == offs[-1] + 1  # group never committed: all of it
    got: list = []
    async with asyncio.timeout(30):
        while len(got) < offs[-1] + 1:
            got += await bus.consume(5, group, block=0.5)
    assert [d.data for d in got[-3:]] == [b"a", b"b", b"c"]
    await bus.ack(5, group, got[:-2])
    assert await bus.lag(5, group) == 2
    other = KafkaBus(kafka_bootstrap, 32, topic=TOPIC, owned=[5])  # a restarted relayer
    await other.start()
    try:
        again = await other.consume(5, group, block=5)
        assert [d.data for d in again] == [b"b", b"c"]
    finally:
        await other.close()
    with pytest.raises(Exception, match="partitions"):
        bad = KafkaBus(kafka_bootstrap, 64, topic=TOPIC)
        try:
            await bad.start()
        finally:
            await bad.close()


async def test_exactly_once_in_order_across_restart(kafka_bootstrap: str, tmp_path: Path) -> None:
    shards = [10, 11, 12, 13]
    group = f"g-{uuid.uuid4().hex[:6]}"
    topics = [(f"c{i % 3}", f"ch{i}") for i in range(12)]
    home = {t: shards[i % 4] for i, t in enumerate(topics)}
    rng = random.Random(5)
    sink = CollectSink()

    async def publish_all(b: KafkaBus, n: int) -> None:
        async def one(t: tuple[str, str]) -> None:
            for s in range(1, n + 1, 5):
                recs = [encode(Frame(*t, q, b"p" * 16)) for q in range(s, s + 5)]
                if rng.random() < 0.3:
                    recs = recs + recs[:2]  # a publisher retry: duplicates on the bus
                await b.publish(home[t], recs)
        await asyncio.gather(*(one(t) for t in topics))

    async def run(b: KafkaBus, store: RocksSeqStore) -> list[asyncio.Task[None]]:
        cfg = WorkerConfig(group=group, poll_timeout=0.2)
        return [asyncio.create_task(RelayerShardWorker(b, s, store, sink, cfg).run())
                for s in shards]

    b = KafkaBus(kafka_bootstrap, 32, topic=TOPIC, owned=shards)
    await b.start()
    store = RocksSeqStore(tmp_path / "marks")
    tasks = await run(b, store)
    await publish_all(b, 30)
    await sink.wait_for(12 * 30, 60)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await b.close()
    store.close()

    b = KafkaBus(kafka_bootstrap, 32, topic=TOPIC, owned=shards)
    await b.start()
    store = RocksSeqStore(tmp_path / "marks")
    tasks = await run(b, store)
    await publish_all(b, 40)  # publishers start over from seq 1 (retries), then go on
    await sink.wait_for(12 * 40, 60)
    await asyncio.sleep(0.5)
    assert_exactly_once_in_order(sink.by_topic, {t: 40 for t in topics})
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for s in shards:
        assert await b.lag(s, group) == 0
    await b.close()
    store.close()


async def test_group_rebalance_hands_shards_over_without_loss_or_replay(
    kafka_bootstrap: str, tmp_path: Path,
) -> None:
    """Two relayers in one group (rebalance=True): B joins mid-stream, then A leaves.
    Both deliver into one sink (one application subscribed through both relayers):
    every seq exactly once, in order — no replay across the handovers."""
    topic = f"pqcnet-rebal-{uuid.uuid4().hex[:8]}"
    group = f"g-{uuid.uuid4().hex[:6]}"
    shards = 8
    topics = [(f"c{i % 2}", f"ch{i}") for i in range(16)]
    sink = CollectSink()
    cfg = WorkerConfig(group=group, poll_timeout=0.1, gap_timeout=0.5)
    sent = dict.fromkeys(topics, 0)

    Node = tuple[KafkaBus, RocksSeqStore, list[RelayerShardWorker], list[asyncio.Task[None]]]

    async def start(name: str) -> Node:
        b = KafkaBus(kafka_bootstrap, shards, topic=topic, rebalance=True, client_id=name,
                     commit_interval=0.1, revoke_grace=5.0)
        await b.start()
        store = RocksSeqStore(tmp_path / name)
        workers = [RelayerShardWorker(b, s, store, sink, cfg) for s in range(shards)]
        return b, store, workers, [asyncio.create_task(w.run()) for w in workers]

    async def stop(node: Node) -> None:
        """Graceful, as RelayerNode.stop: workers finish their step, then the bus
        commits and leaves the group, and the survivor takes the shards over."""
        b, store, workers, tasks = node
        for w in workers:
            w.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        await b.close()
        store.close()

    async def publish(pub: KafkaBus, upto: int) -> None:
        for t in topics:
            recs = [encode(Frame(*t, q, b"p")) for q in range(sent[t] + 1, upto + 1)]
            await pub.publish(shard_for(t[0], t[1], shards), recs)
            sent[t] = upto

    pub = KafkaBus(kafka_bootstrap, shards, topic=topic)
    await pub.start()
    a = await start("relayer-a")
    n = 120

    async def keep_publishing() -> None:  # handovers happen while frames are in flight
        for upto in range(1, n + 1):
            await publish(pub, upto)
            await asyncio.sleep(0.03)

    feeder = asyncio.create_task(keep_publishing())
    await eventually(lambda: sink.total() >= 16 * 20, 60)
    b = await start("relayer-b")
    # both hold shards, none twice, none unowned (mid-rebalance A may briefly hold none)
    await eventually(lambda: bool(a[0].assigned) and bool(b[0].assigned)
                     and not (a[0].assigned & b[0].assigned)
                     and a[0].assigned | b[0].assigned == set(range(shards)), 60)
    await eventually(lambda: sink.total() >= 16 * 60, 60)
    await stop(a)
    await eventually(lambda: b[0].assigned == set(range(shards)), 60)
    await asyncio.wait_for(feeder, 60)
    await sink.wait_for(16 * n, 60)
    await asyncio.sleep(1.0)
    assert_exactly_once_in_order(sink.by_topic, {t: n for t in topics})
    await stop(b)
    await pub.close()


async def test_static_member_restart_resumes_exactly_once(kafka_bootstrap: str,
                                                          tmp_path: Path) -> None:
    """Static membership (group.instance.id): a relayer stopped and restarted under the
    same id takes its partitions back and resumes at its commit, exactly once."""
    topic = f"pqcnet-static-{uuid.uuid4().hex[:8]}"
    group = f"g-{uuid.uuid4().hex[:6]}"
    shards = 4
    topics = [("c", f"ch{i}") for i in range(8)]
    sink = CollectSink()
    cfg = WorkerConfig(group=group, poll_timeout=0.1, gap_timeout=0.5)
    store = RocksSeqStore(tmp_path / "marks")
    pub = KafkaBus(kafka_bootstrap, shards, topic=topic)
    await pub.start()

    async def publish(lo: int, hi: int) -> None:
        for t in topics:
            await pub.publish(shard_for(t[0], t[1], shards),
                              [encode(Frame(*t, q, b"p")) for q in range(lo, hi + 1)])

    async def run(upto: int) -> None:
        b = KafkaBus(kafka_bootstrap, shards, topic=topic, rebalance=True,
                     instance_id="relayer-x", session_timeout=6.0, commit_interval=0.0)
        await b.start()
        workers = [RelayerShardWorker(b, s, store, sink, cfg) for s in range(shards)]
        tasks = [asyncio.create_task(w.run()) for w in workers]
        try:
            await sink.wait_for(len(topics) * upto, 90)
        finally:
            for w in workers:
                w.stop()
            await asyncio.wait_for(asyncio.gather(*tasks), 30)
            await b.close()

    try:
        await publish(1, 30)
        await run(30)
        await publish(31, 60)
        await run(60)  # same instance id: no wait for the old member's session
        await asyncio.sleep(0.5)
        assert_exactly_once_in_order(sink.by_topic, {t: 60 for t in topics})
    finally:
        await pub.close()
        store.close()


async def test_fetch_loop_buffers_are_bounded_and_rewind_drops_them(
        bus: KafkaBus, monkeypatch: pytest.MonkeyPatch) -> None:
    """One fetch loop feeds every shard (kafka_pump): a shard whose worker does not take
    its records gets its partition paused at the bound, and takes them all later, in
    order, exactly once; a rewind drops what was buffered and reads again from the
    committed offset — nothing fetched before the seek is handed out after it."""
    from pqcnet.relayer.bus import kafka_pump

    monkeypatch.setattr(kafka_pump, "MAX_BUFFERED", 8)
    monkeypatch.setattr(kafka_pump, "FETCH_RECORDS", 4)
    group = f"g-{uuid.uuid4().hex[:6]}"
    records = [f"r{i}".encode() for i in range(60)]
    for i in range(0, 60, 10):
        await bus.publish(9, records[i : i + 10])
    first = await bus.consume(9, group, max_records=3, block=2)  # starts the fetch loop
    pump = bus._pumps[group]
    # the loop fetches while nobody takes: the partition is paused at the bound
    await eventually(lambda: bus.tp(9) in bus._consumers[group].paused(), limit=20)
    await asyncio.sleep(0.5)  # and stays bounded while paused
    assert pump.buffered(9) <= 8 + 4, pump.buffered(9)  # bound + one fetch at most
    got = list(first)
    async with asyncio.timeout(30):
        while len(got) < 60:  # the group never committed: from the partition's start
            got += await bus.consume(9, group, max_records=7, block=0.5)
    mine = [d.data for d in got if d.data in set(records)]
    assert mine == records  # all of them, in order, once
    assert bus.tp(9) not in bus._consumers[group].paused()
    # rewind to the (absent) commit: back to the beginning; nothing buffered survives
    await bus.ack(9, group, got[:5])
    await bus.consume(9, group, max_records=2, block=0.5)  # something may be buffered now
    await bus.rewind(9, group)
    again: list = []
    async with asyncio.timeout(30):
        while len(again) < 10:
            again += await bus.consume(9, group, max_records=10, block=0.5)
    assert [d.offset for d in again[:10]] == [got[5].offset + i for i in range(10)]


async def test_publish_many_lands_each_shard_in_order(bus: KafkaBus) -> None:
    """A cross-shard group commit (``batched_shards``): every shard's records in its own
    partition, in order, and nothing in a shard that had none."""
    assert bus.batched_shards
    group = f"g-{uuid.uuid4().hex[:6]}"
    ends = {s: (await bus.lag(s, group)) for s in (11, 12, 13)}  # what earlier tests left
    await bus.publish_many({11: [b"k0", b"k1", b"k2"], 12: [], 13: [b"m0"]})
    assert await bus.lag(11, group) == ends[11] + 3
    assert await bus.lag(12, group) == ends[12]
    assert await bus.lag(13, group) == ends[13] + 1
    for shard, want in ((11, [b"k0", b"k1", b"k2"]), (13, [b"m0"])):
        got: list = []
        async with asyncio.timeout(30):
            while len(got) < ends[shard] + len(want):
                got += await bus.consume(shard, group, block=0.5)
        assert [d.data for d in got[ends[shard]:]] == want
    with pytest.raises(ValueError):
        await bus.publish_many({bus.partitions(): [b"x"]})  # no such shard: nothing sent


async def test_lags_ask_for_every_partition_in_one_request(bus: KafkaBus) -> None:
    """The backpressure sample of all owned shards is one ``ListOffsets`` request, not
    one per partition, and gives each shard what :meth:`KafkaBus.lag` gives it alone."""
    group = f"g-{uuid.uuid4().hex[:6]}"
    shards = range(14, 20)
    before = await bus.lags(shards, group)  # what earlier tests left
    await bus.publish_many({14: [b"a", b"b"], 17: [b"c"]})
    consumer = await bus._consumer(group)
    asked: list[int] = []
    real = consumer.end_offsets

    async def counting(partitions: list[Any]) -> Any:
        asked.append(len(partitions))
        return await real(partitions)

    consumer.end_offsets = counting  # type: ignore[method-assign]
    try:
        lags = await bus.lags(shards, group)
    finally:
        consumer.end_offsets = real  # type: ignore[method-assign]
    assert asked == [len(shards)]
    assert lags == {s: before[s] + {14: 2, 17: 1}.get(s, 0) for s in shards}
    assert lags == {s: await bus.lag(s, group) for s in shards}


async def test_a_failed_fetch_reaches_each_shard_once_without_the_loops_frames() -> None:
    """A failed ``getmany`` is handed to the next ``take`` of every assigned shard: the
    same error object for all of them. Kept with its traceback, it held the fetch
    loop's frame (and, through it, the pump) and every raise in a worker grew it by that
    worker's frames. Each raise now starts a fresh traceback: the worker's own frame
    only (and the test's). The consumer is a real aiokafka one, never started, so its
    fetch fails."""
    import traceback

    from aiokafka import AIOKafkaConsumer

    from pqcnet.relayer.bus.kafka_pump import PartitionPump

    consumer = AIOKafkaConsumer(bootstrap_servers="127.0.0.1:9")
    pump = PartitionPump(consumer, "never", lambda: {0, 1})
    pump.start()
    try:
        await eventually(lambda: pump.ready(0) and pump.ready(1), limit=10)
        stacks = []
        for shard in (0, 1):
            with pytest.raises(AttributeError) as info:
                pump.take(shard, 10)
            stacks.append([f.name for f in traceback.extract_tb(info.value.__traceback__)])
        here = test_a_failed_fetch_reaches_each_shard_once_without_the_loops_frames.__name__
        assert stacks == [[here, "take"], [here, "take"]]
        assert not pump.ready(0)  # once per shard
        assert pump.take(0, 10) == []
    finally:
        await pump.close()
        await consumer.stop()
