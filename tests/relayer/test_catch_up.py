"""A shard worker skips no gap before it has read what its bus held at its reset
(decision 0023), on each real backend: the embedded log, Redis Streams, Kafka.

The case: a frame was acknowledged (so it is in the log) after a later seq of its topic
was, and a long backlog lies between the two — a publisher's retry that landed late, a
relayer that restarted behind a backlog, a shard taken over by a relayer that has the
previous owner's backlog to read. The worker reads the later seq first and waits for
the missing one; if it gave up after ``gap_timeout`` it would drop the acknowledged
frame when it got there. The control (the same run with the bus claiming to be caught up
at once, which is what every backend said before) shows that loss. Checked from the
outside: what the subscriber received, the worker's counters, and what the bus still
holds unacknowledged.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from pqcnet.relayer.bus.base import Bus
from pqcnet.relayer.bus.embedded import EmbeddedBus
from pqcnet.relayer.bus.kafka import KafkaBus
from pqcnet.relayer.bus.redis_streams import RedisStreamsBus
from pqcnet.relayer.frame import Frame, encode
from pqcnet.relayer.seqstore import RocksSeqStore
from pqcnet.relayer.worker import RelayerShardWorker, WorkerConfig
from tests.relayer.helpers import CollectSink, eventually, redis_pending

pytestmark = [pytest.mark.services, pytest.mark.timeout(120)]

T = ("acme", "orders")
BACKLOG = 240
#: small batches, a short gap timeout and a slow subscriber: reading the backlog takes
#: many times ``gap_timeout``
CFG = WorkerConfig(group="g", batch=8, poll_timeout=0.05, gap_timeout=0.05)


class SlowSink(CollectSink):
    """A subscriber that takes 20 ms per batch."""

    async def deliver(self, shard: int, frames: Sequence[Frame], *,
                      park: bool = False) -> Sequence[Frame]:
        await asyncio.sleep(0.02)
        return await super().deliver(shard, frames, park=park)


@pytest.fixture(params=["embedded", "redis", "kafka"])
async def bus(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Bus]:
    tag = uuid.uuid4().hex[:8]
    made: Bus
    if request.param == "embedded":
        made = EmbeddedBus(tmp_path / "bus", 1)
    elif request.param == "redis":
        made = RedisStreamsBus(request.getfixturevalue("redis_url"), 1,
                               prefix=f"test:catchup:{tag}")
    else:
        made = KafkaBus(request.getfixturevalue("kafka_bootstrap"), 1,
                        topic=f"pqcnet-catchup-{tag}")
    await made.start()
    yield made
    if isinstance(made, RedisStreamsBus):
        keys = [k async for k in made.client.scan_iter(match=f"{made.prefix}:*")]
        if keys:
            await made.client.delete(*keys)
    await made.close()


async def _backlog(bus: Bus) -> None:
    """T's seq 2, then BACKLOG frames of other topics (one append each), then T's seq 1:
    every one of them acknowledged to its publisher when its append returned."""
    await bus.publish(0, [encode(Frame(*T, 2, b"second"))])
    for i in range(BACKLOG):
        await bus.publish(0, [encode(Frame("acme", f"filler{i % 16}", i // 16 + 1, b"f"))])
    await bus.publish(0, [encode(Frame(*T, 1, b"first, acknowledged late"))])


@pytest.mark.parametrize("barrier", [True, False], ids=["caught-up-barrier", "control"])
async def test_no_gap_is_skipped_before_the_backlog_at_reset_is_read(
        bus: Bus, tmp_path: Path, barrier: bool) -> None:
    await _backlog(bus)
    if not barrier:  # what every backend answered before decision 0023
        bus.caught_up = lambda shard, group: True  # type: ignore[method-assign]
    sink = SlowSink()
    store = RocksSeqStore(tmp_path / "marks")
    worker = RelayerShardWorker(bus, 0, store, sink, CFG)
    task = asyncio.create_task(worker.run())
    try:
        await sink.wait_for(BACKLOG + (2 if barrier else 1), 60)
        if barrier:
            assert sink.by_topic[T] == [1, 2]  # the late-acknowledged frame, in order
            assert worker.stats.gaps == 0
            assert worker.stats.held_catching_up >= 1  # the skip was due, and held
            assert bus.caught_up(0, CFG.group)
            # caught up, a real gap is skipped after gap_timeout as before
            await bus.publish(0, [encode(Frame(*T, 4, b"fourth"))])
            await eventually(lambda: sink.by_topic[T] == [1, 2, 4], 30)
            assert worker.stats.gaps == 1
        else:
            # the skip came first: seq 1 was dropped as a duplicate when it was read
            await eventually(lambda: worker.stats.duplicates == 1, 30)
            assert sink.by_topic[T] == [2]
            assert worker.stats.gaps == 1 and worker.stats.held_catching_up == 0
        assert worker.stats.resets == 0
        # every filler delivered once, in order per topic
        for i in range(16):
            n = len(range(i, BACKLOG, 16))
            assert sink.by_topic[("acme", f"filler{i}")] == list(range(1, n + 1))
        # and the bus holds nothing unacknowledged for the group
        await eventually(lambda: worker.stats.delivered == sink.total(), 10)
        lag = -1
        for _ in range(100):
            lag = await bus.lag(0, CFG.group)
            if lag == 0:
                break
            await asyncio.sleep(0.1)
        assert lag == 0
    finally:
        worker.stop()
        await asyncio.wait_for(task, 10)
        store.close()


async def test_a_restarted_worker_waits_for_its_backlog_again(bus: Bus, tmp_path: Path
                                                             ) -> None:
    """The barrier is set at every reset, not once: a worker stopped after its first
    frames and a new one started on the same bus and marks (a restart) has the rest of
    the backlog to read before it may skip, and it delivers seq 1 in order too."""
    await bus.publish(0, [encode(Frame("acme", "warm", 1, b"w"))])
    store = RocksSeqStore(tmp_path / "marks")
    first_sink = CollectSink()
    first = RelayerShardWorker(bus, 0, store, first_sink, CFG)
    task = asyncio.create_task(first.run())
    await first_sink.wait_for(1, 60)
    await eventually(lambda: bus.caught_up(0, CFG.group), 30)
    first.stop()
    await asyncio.wait_for(task, 10)
    await _backlog(bus)  # published while no worker ran
    sink = SlowSink()
    worker = RelayerShardWorker(bus, 0, store, sink, CFG)
    task = asyncio.create_task(worker.run())
    try:
        await sink.wait_for(BACKLOG + 2, 60)
        assert sink.by_topic[T] == [1, 2]
        assert ("acme", "warm") not in sink.by_topic  # acknowledged before the restart
        assert worker.stats.gaps == 0 and worker.stats.held_catching_up >= 1
    finally:
        worker.stop()
        await asyncio.wait_for(task, 10)
        store.close()


@pytest.mark.parametrize("settle", [True, False], ids=["settle", "control"])
async def test_a_new_owner_waits_for_what_its_former_owner_read_late(
        redis_url: str, tmp_path: Path, settle: bool) -> None:
    """Redis cluster: the former owner's read was on the way when this relayer claimed
    the shard, so a late-acknowledged seq 1 lands in the former owner's pending list,
    past the group's cursor — nowhere this relayer reads. The sweep takes it once idle
    for two leases; the new owner skips nothing until the first sweep three leases
    after its claim, and delivers 1, 2 in order. The control (caught up as soon as the
    log is read, the previous behaviour) skips seq 1 and drops it when the sweep brings
    it. Counted from outside with ``redis-cli XPENDING``."""
    lease = 1.0
    bus = RedisStreamsBus(redis_url, 1, prefix=f"test:settle:{uuid.uuid4().hex[:8]}",
                          consumer="b", lease=lease)
    await bus.start()
    if not settle:
        bus.caught_up = lambda s, g: (s, g) not in bus._catch_up  # type: ignore[method-assign]
    sink = CollectSink()
    store = RocksSeqStore(tmp_path / "marks")
    cfg = WorkerConfig(group="g", poll_timeout=0.05, gap_timeout=0.2)
    worker = RelayerShardWorker(bus, 0, store, sink, cfg)
    task = asyncio.create_task(worker.run())
    try:
        await eventually(lambda: (0, "g") in bus._claimed, 10)  # claimed: the clock runs
        await bus.publish(0, [encode(Frame(*T, 2, b"second"))])
        await eventually(lambda: redis_pending(redis_url, bus.key(0), "g") == 1, 10)  # b read it
        # the former owner "a"'s read lands now: XADD and its XREADGROUP in one MULTI, so
        # this relayer's own blocked read cannot take the entry first
        pipe = bus.client.pipeline(transaction=True)
        bus._add(pipe, 0, [encode(Frame(*T, 1, b"first, read by the former owner"))])
        pipe.xreadgroup("g", "a", {bus.key(0): ">"}, count=10)
        _, late = await pipe.execute()
        assert len(late[0][1]) == 1, late
        await eventually(lambda: bus.stale_claimed == 1, 10 * lease + 10)
        if settle:
            await eventually(lambda: sink.by_topic[T] == [1, 2], 10)
            assert worker.stats.gaps == 0 and worker.stats.held_catching_up >= 1
            # the sweep that took seq 1 may run before the settle time: caught up at the
            # first sweep after it, three leases from the claim
            await eventually(lambda: bus.caught_up(0, "g"), 6 * lease + 5)
            await bus.publish(0, [encode(Frame(*T, 4, b"fourth"))])  # a real gap: skipped
            await eventually(lambda: sink.by_topic[T] == [1, 2, 4], 10)
            assert worker.stats.gaps == 1
        else:
            await eventually(lambda: worker.stats.duplicates == 1, 10)
            assert sink.by_topic[T] == [2] and worker.stats.gaps == 1
        await eventually(lambda: redis_pending(redis_url, bus.key(0), "g") == 0, 10)
    finally:
        worker.stop()
        await asyncio.wait_for(task, 10)
        store.close()
        keys = [k async for k in bus.client.scan_iter(match=f"{bus.prefix}:*")]
        if keys:
            await bus.client.delete(*keys)
        await bus.close()

