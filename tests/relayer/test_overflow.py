"""Overflow queue on real RocksDB (FIFO per shard, bound, restart) and the flow controller."""

from __future__ import annotations

from pathlib import Path

import pytest

from pqcnet.relayer.backpressure import FlowController
from pqcnet.relayer.bus.embedded import EmbeddedBus
from pqcnet.relayer.errors import OverflowFull
from pqcnet.relayer.overflow import BufferedPublisher, OverflowQueue


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
