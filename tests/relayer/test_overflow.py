"""Overflow queue on real RocksDB (FIFO per shard, bound, restart) and the flow controller."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pqcnet.relayer.backpressure import FlowController
from pqcnet.relayer.bus.embedded import EmbeddedBus
from pqcnet.relayer.errors import BusError, OverflowFull
from pqcnet.relayer.overflow import Accepted, BufferedPublisher, OverflowQueue


def test_fifo_bound_and_restart(tmp_path: Path) -> None:
    q = OverflowQueue(tmp_path / "ovf", 4, max_records=5)
    q.append(1, [b"a", b"b"])
    q.append(3, [b"z"])
    q.append(1, [b"c"])
    with pytest.raises(OverflowFull):
        q.append(2, [b"x", b"y", b"w"])  # nothing of it written
    assert q.total() == 4 and q.depth(2) == 0
    assert q.peek(1, 10) == [b"a", b"b", b"c"]
    q.remove(1, 2)
    q.close()
    q = OverflowQueue(tmp_path / "ovf", 4, max_records=5)
    assert q.peek(1, 10) == [b"c"] and q.peek(3, 10) == [b"z"] and q.total() == 2
    q.append(1, [b"d"])
    assert q.peek(1, 10) == [b"c", b"d"]
    q.close()


async def test_replay_moves_queue_to_bus_in_order(tmp_path: Path) -> None:
    bus = EmbeddedBus(tmp_path / "bus", shards=2)
    q = OverflowQueue(tmp_path / "ovf", 2)
    pub = BufferedPublisher(bus, q)
    q.append(0, [b"1", b"2"])
    # a shard with a backlog queues new frames behind it, even with the bus up
    assert (await pub.publish(0, [b"3"])).overflowed
    assert not (await pub.publish(1, [b"x"])).overflowed
    assert await pub.replay_once() == 3
    got = await bus.consume(0, "g", block=0.1)
    assert [d.data for d in got] == [b"1", b"2", b"3"]
    assert not (await pub.publish(0, [b"4"])).overflowed
    q.close()
    await bus.close()


async def test_publish_many_one_write_for_many_shards_in_arrival_order(tmp_path: Path) -> None:
    bus = EmbeddedBus(tmp_path / "bus", shards=4)
    q = OverflowQueue(tmp_path / "ovf", 4)
    pub = BufferedPublisher(bus, q)
    # concurrent requests share the group commit; each shard keeps arrival order
    got = await asyncio.gather(*(pub.publish_many({0: [b"a%d" % i], 2: [b"c%d" % i, b"d%d" % i]})
                                 for i in range(5)))
    assert all(r == {0: Accepted(False), 2: Accepted(False)} for r in got)
    assert [d.data for d in await bus.consume(0, "g", block=0.1)] == [b"a%d" % i
                                                                      for i in range(5)]
    assert [d.data for d in await bus.consume(2, "g", block=0.1)] == [
        x for i in range(5) for x in (b"c%d" % i, b"d%d" % i)]
    # a shard with a backlog queues behind it; the others still go to the bus
    q.append(1, [b"old"])
    assert await pub.publish_many({1: [b"new"], 3: [b"z"]}) == {
        1: Accepted(True), 3: Accepted(False)}
    assert await pub.replay_once() == 2
    assert [d.data for d in await bus.consume(1, "g", block=0.1)] == [b"old", b"new"]
    q.close()
    await bus.close()


async def test_publish_many_refuses_a_request_whole_when_overflow_is_full(
        tmp_path: Path) -> None:
    bus = EmbeddedBus(tmp_path / "bus", shards=2)
    q = OverflowQueue(tmp_path / "ovf", 2, max_records=3)
    pub = BufferedPublisher(bus, q)
    q.append(1, [b"x", b"y"])  # shard 1 must queue behind this, and 2 more do not fit
    out = await pub.publish_many({0: [b"a"], 1: [b"b", b"c"]})
    assert set(out) == {0, 1} and all(isinstance(e, OverflowFull) for e in out.values())
    assert await bus.consume(0, "g", block=0.1) == []  # nothing of the request written
    assert q.depth(1) == 2
    # a bus that fails: every shard of the request goes to overflow, nothing is lost
    await bus.close()
    q2 = OverflowQueue(tmp_path / "ovf2", 2)
    pub2 = BufferedPublisher(bus, q2)
    out = await pub2.publish_many({0: [b"a"], 1: [b"b"]})
    assert isinstance(out[0], BusError) and not out[0].retriable  # closed: not retried
    q.close()
    q2.close()


async def test_publish_many_per_shard_on_a_bus_without_multi_shard_writes(
        tmp_path: Path) -> None:
    bus = EmbeddedBus(tmp_path / "bus", shards=2)
    bus.batched_shards = False  # as Redis / Kafka: one publish per shard, own outcome each
    q = OverflowQueue(tmp_path / "ovf", 2, max_records=2)
    pub = BufferedPublisher(bus, q)
    q.append(1, [b"x", b"y"])  # shard 1 is full behind its backlog, shard 0 is not
    out = await pub.publish_many({0: [b"a"], 1: [b"b"]})
    assert out[0] == Accepted(False) and isinstance(out[1], OverflowFull)
    assert [d.data for d in await bus.consume(0, "g", block=0.1)] == [b"a"]
    q.close()
    await bus.close()


def test_flow_controller_hysteresis() -> None:
    fc = FlowController(high=100, low=20)
    assert fc.update(0, 99) is None
    ch = fc.update(0, 100)
    assert ch is not None and ch.action == "pause"
    assert fc.update(0, 150) is None and fc.update(0, 50) is None
    ch = fc.update(0, 19)
    assert ch is not None and ch.action == "resume"
    assert fc.paused == set()
    with pytest.raises(ValueError):
        FlowController(high=10, low=10)
