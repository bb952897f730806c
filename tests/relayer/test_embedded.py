"""Embedded RocksDB bus and shard workers: order, exactly-once, dedup across restart."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from pqcnet.qstp.errors import TunnelClosed
from pqcnet.relayer.bus.embedded import EmbeddedBus
from pqcnet.relayer.errors import BusError
from pqcnet.relayer.frame import Frame, encode, shard_for
from pqcnet.relayer.seqstore import RocksSeqStore
from pqcnet.relayer.worker import RelayerShardWorker, WorkerConfig
from tests.relayer.helpers import CollectSink, assert_exactly_once_in_order

pytestmark = pytest.mark.timeout(60)


async def test_publish_consume_ack_lag_and_reopen(tmp_path: Path) -> None:
    bus = EmbeddedBus(tmp_path / "bus", shards=4)
    assert await bus.publish(1, [b"a", b"b", b"c"]) == [0, 1, 2]
    assert await bus.lag(1, "g") == 3
    got = await bus.consume(1, "g", max_records=2, block=0.1)
    assert [d.data for d in got] == [b"a", b"b"]
    await bus.ack(1, "g", got[:1])
    assert await bus.lag(1, "g") == 2
    assert await bus.consume(2, "g", block=0.01) == []
    with pytest.raises(BusError):
        EmbeddedBus(tmp_path / "bus", shards=4)  # locked by the open instance
    await bus.close()
    bus = EmbeddedBus(tmp_path / "bus", shards=4)  # unacked records come back after reopen
    got = await bus.consume(1, "g", block=0.1)
    assert [d.data for d in got] == [b"b", b"c"] and got[0].offset == 1
    assert await bus.publish(1, [b"d"]) == [3]
    await bus.ack(1, "g", got)
    assert bus.trim(1, ["g"]) == 3
    await bus.close()
    with pytest.raises(BusError):
        await bus.publish(1, [b"x"])


async def test_consume_wakes_on_publish(tmp_path: Path) -> None:
    bus = EmbeddedBus(tmp_path / "bus", shards=1)
    task = asyncio.create_task(bus.consume(0, "g", block=10))
    await asyncio.sleep(0.05)
    await bus.publish(0, [b"x"])
    assert [d.data for d in await asyncio.wait_for(task, 5)] == [b"x"]
    await bus.close()


async def test_tail_and_log_reads_agree(tmp_path: Path) -> None:
    """Reads served from the in-memory tail equal reads from RocksDB, for every group.

    Large records push the first ones out of the byte-bounded tail, so group ``b``
    (behind the tail) reads through the iterator and group ``a`` partly from memory;
    both must see the same offsets and bytes, and a trimmed record is never served
    from the tail to a group the trim did not wait for.
    """
    from pqcnet.relayer.bus.embedded import TAIL_BYTES

    bus = EmbeddedBus(tmp_path / "bus", shards=1)
    small = [bytes([i]) * 10 for i in range(5)]
    await bus.publish(0, small)
    first = await bus.consume(0, "a", max_records=3, block=0.1)  # from the tail
    assert [(d.offset, d.data) for d in first] == [(i, small[i]) for i in range(3)]
    pad, big = b"P" * (TAIL_BYTES // 2 + 10), b"B" * (TAIL_BYTES // 2 - 20)
    await bus.publish(0, [pad, big, b"z"])  # over the bound: the tail keeps big, z
    want = list(enumerate([*small, pad, big, b"z"]))
    rest = await bus.consume(0, "a", block=0.1)  # offsets 3.. : behind the tail
    behind = await bus.consume(0, "b", max_records=100, block=0.1)
    assert [(d.offset, d.data) for d in first + rest] == want
    assert [(d.offset, d.data) for d in behind] == want
    assert len(await bus.consume(0, "d", max_records=6, block=0.1)) == 6  # d is at 6
    await bus.ack(0, "a", rest)
    await bus.ack(0, "b", behind[:7])  # b acked up to offset 6: trim keeps only "z"
    assert bus.trim(0, ["a", "b"]) == 7
    again = await bus.consume(0, "d", max_records=100, block=0.1)  # 6 is gone from the log
    assert [(d.offset, d.data) for d in again] == [(7, b"z")]
    await bus.publish(0, [b"y"])
    assert [(d.offset, d.data) for d in await bus.consume(0, "a", block=0.1)] == [(8, b"y")]
    await bus.close()


async def _publish_topics(bus: EmbeddedBus, topics: list[tuple[str, str]], n: int,
                          dup_rate: float, rng: random.Random) -> None:
    """One publisher per topic, concurrently; some frames retried (published twice)."""
    shards = bus.partitions()

    async def one(c: str, ch: str) -> None:
        for seq in range(1, n + 1):
            rec = encode(Frame(c, ch, seq, f"{c}/{ch}/{seq}".encode()))
            reps = 2 if rng.random() < dup_rate else 1
            await bus.publish(shard_for(c, ch, shards), [rec] * reps)
            if seq % 7 == 0:
                await asyncio.sleep(0)

    await asyncio.gather(*(one(c, ch) for c, ch in topics))


async def _run_workers(bus: EmbeddedBus, store: RocksSeqStore, sink: CollectSink,
                       cfg: WorkerConfig) -> list[asyncio.Task[None]]:
    workers = [RelayerShardWorker(bus, s, store, sink, cfg) for s in range(bus.partitions())]
    return [asyncio.create_task(w.run()) for w in workers]


async def _stop(tasks: list[asyncio.Task[None]]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_concurrent_publishers_exactly_once_in_order(tmp_path: Path) -> None:
    bus = EmbeddedBus(tmp_path / "bus", shards=8)
    store = RocksSeqStore(tmp_path / "state")
    sink = CollectSink()
    rng = random.Random(1)
    topics = [(f"cust{i % 5}", f"chan{i}") for i in range(24)]
    tasks = await _run_workers(bus, store, sink, WorkerConfig(batch=64, poll_timeout=0.05))
    await _publish_topics(bus, topics, 60, 0.2, rng)
    await sink.wait_for(24 * 60)
    await asyncio.sleep(0.2)  # give any stray duplicate a chance to show
    assert_exactly_once_in_order(sink.by_topic, {t: 60 for t in topics})
    for s in range(8):
        assert await bus.lag(s, "relayer") == 0
    await _stop(tasks)
    store.close()
    await bus.close()


async def test_duplicates_suppressed_across_restart(tmp_path: Path) -> None:
    topics = [("c", f"ch{i}") for i in range(6)]
    rng = random.Random(2)
    bus = EmbeddedBus(tmp_path / "bus", shards=4)
    store = RocksSeqStore(tmp_path / "state")
    sink = CollectSink()
    tasks = await _run_workers(bus, store, sink, WorkerConfig(poll_timeout=0.05))
    await _publish_topics(bus, topics, 30, 0.0, rng)
    await sink.wait_for(6 * 30)
    await _stop(tasks)
    store.close()
    await bus.close()
    # restart: a publisher retries everything it sent (it never saw the acks), then continues
    bus = EmbeddedBus(tmp_path / "bus", shards=4)
    store = RocksSeqStore(tmp_path / "state")
    tasks = await _run_workers(bus, store, sink, WorkerConfig(poll_timeout=0.05))
    await _publish_topics(bus, topics, 40, 0.0, rng)
    await sink.wait_for(6 * 40)
    await asyncio.sleep(0.3)
    assert_exactly_once_in_order(sink.by_topic, {t: 40 for t in topics})
    await _stop(tasks)
    store.close()
    await bus.close()


@pytest.mark.parametrize("error", [OSError("gone"), TunnelClosed("subscriber stream closed"),
                                   KeyError("a bug")])
async def test_sink_failure_resets_without_loss(tmp_path: Path, error: Exception) -> None:
    bus = EmbeddedBus(tmp_path / "bus", shards=1)
    store = RocksSeqStore(tmp_path / "state")
    sink = CollectSink()
    sink.fail_next = 3
    sink.fail_with = error
    w = RelayerShardWorker(bus, 0, store, sink, WorkerConfig(poll_timeout=0.05))
    task = asyncio.create_task(w.run())
    await bus.publish(0, [encode(Frame("c", "x", i, b"p")) for i in range(1, 101)])
    await sink.wait_for(100)
    assert_exactly_once_in_order(sink.by_topic, {("c", "x"): 100})
    assert w.stats.resets == 3
    w.stop()
    await asyncio.wait_for(task, 5)
    store.close()
    await bus.close()


async def test_worker_reports_and_skips_a_gap(tmp_path: Path) -> None:
    bus = EmbeddedBus(tmp_path / "bus", shards=1)
    store = RocksSeqStore(tmp_path / "state")
    sink = CollectSink()
    gaps = []
    w = RelayerShardWorker(bus, 0, store, sink, WorkerConfig(poll_timeout=0.05, gap_timeout=0.3),
                           on_gap=gaps.append)
    task = asyncio.create_task(w.run())
    await bus.publish(0, [encode(Frame("c", "x", s, b"p")) for s in (1, 2, 4, 5)])
    await sink.wait_for(4, 10)  # 3 never comes: after gap_timeout 4 and 5 go out
    assert sink.by_topic[("c", "x")] == [1, 2, 4, 5]
    assert w.stats.gaps == 1 and (gaps[0].expected, gaps[0].resumed_at) == (3, 4)
    await bus.publish(0, [encode(Frame("c", "x", 3, b"late"))])
    await bus.publish(0, [encode(Frame("c", "x", 6, b"p"))])
    await sink.wait_for(5, 10)
    assert sink.by_topic[("c", "x")] == [1, 2, 4, 5, 6] and w.stats.duplicates == 1
    assert await bus.lag(0, "relayer") == 0
    bus.trim(0, ["relayer"])  # fully acked log can be dropped
    w.stop()
    await asyncio.wait_for(task, 5)
    store.close()
    await bus.close()


def _stored_offsets(bus: EmbeddedBus, shard: int) -> list[int]:
    """Offsets of the records RocksDB still holds for ``shard`` (read from the db)."""
    prefix = b"L" + shard.to_bytes(2, "big")
    it = bus._db.iter()
    it.seek(prefix)
    out = []
    while it.valid() and it.key()[:3] == prefix:
        out.append(int.from_bytes(it.key()[3:], "big"))
        it.next()
    return out


def _point_deletes(bus: EmbeddedBus) -> int:
    return int(bus._db.property_int_value("rocksdb.num-deletes-active-mem-table"))


async def test_trims_write_point_deletes_not_a_range_tombstone_each(tmp_path: Path) -> None:
    """A steady trickle of trims must not pile up RocksDB range tombstones.

    Each range tombstone in the memtable is fragmented again on the next read, so one
    per shard per second (the relayer's trim loop) made every read O(tombstones) and a
    long run O(n²) until a memtable flush (benchmarks/README: "Trims that slowed down
    with time"). Short spans are point deletes, counted by RocksDB itself; a long one
    is one range tombstone; and a trim after a restart starts where the log starts.
    """
    from pqcnet.relayer.bus.embedded import POINT_DELETES_MAX

    shards, rounds = 32, 100
    bus = EmbeddedBus(tmp_path / "bus", shards=shards)
    for r in range(rounds):  # one record, its ack and a trim per shard per round
        for s in range(shards):
            await bus.publish(s, [b"r%d" % r])
            await bus.ack(s, "g", await bus.consume(s, "g", block=0.1))
            assert bus.trim(s, ["g"]) == r + 1
    assert _point_deletes(bus) == shards * rounds  # one point delete per record
    assert all(_stored_offsets(bus, s) == [] for s in range(shards))
    assert [await bus.lag(s, "g") for s in range(shards)] == [0] * shards

    backlog = POINT_DELETES_MAX + 10  # a long span: one range tombstone, no point deletes
    await bus.publish(0, [b"b"] * backlog)
    await bus.publish(1, [b"k"] * 5)
    await bus.ack(0, "g", await bus.consume(0, "g", max_records=backlog, block=0.1))
    assert bus.trim(0, ["g"]) == rounds + backlog
    assert _point_deletes(bus) == shards * rounds
    assert _stored_offsets(bus, 0) == []
    await bus.close()

    bus = EmbeddedBus(tmp_path / "bus", shards=shards)  # shard 1 holds 5 unacked records
    before = _point_deletes(bus)
    got = await bus.consume(1, "g", max_records=2, block=0.1)
    assert [d.offset for d in got] == [rounds, rounds + 1]
    await bus.ack(1, "g", got)
    assert bus.trim(1, ["g"]) == rounds + 2
    assert _point_deletes(bus) - before == 2  # from the log's start, not from offset 0
    assert _stored_offsets(bus, 1) == [rounds + 2, rounds + 3, rounds + 4]
    await bus.close()
