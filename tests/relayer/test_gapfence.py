"""The gap fence (decision 0012): what it refuses, and the race it closes — a frame
admitted (acknowledged) just before its gap would be skipped is waited for, never
skipped and then discarded."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from pqcnet.relayer.bus.base import Delivery
from pqcnet.relayer.bus.embedded import EmbeddedBus
from pqcnet.relayer.errors import BusUnavailable, LateFrame
from pqcnet.relayer.frame import Frame, decode, encode, shard_for
from pqcnet.relayer.gapfence import MAX_RANGES_PER_TOPIC, GapFence
from pqcnet.relayer.overflow import BufferedPublisher, OverflowQueue
from pqcnet.relayer.seqstore import RedisSeqStore, RocksSeqStore, SeqStore
from pqcnet.relayer.sequencer import Sequencer
from pqcnet.relayer.worker import RelayerShardWorker, WorkerConfig
from tests.relayer.e2e import start_node, subscriber
from tests.relayer.helpers import CollectSink, eventually, metrics_reach

T = ("c", "x")


def _f(seq: int) -> Frame:
    return Frame("c", "x", seq, b"p%d" % seq)


async def test_fence_rules() -> None:
    marks = {T: 11}

    async def lookup(shard: int, topics: object) -> dict[tuple[str, str], int]:
        return dict(marks)

    fence = GapFence(lookup, owns=lambda shard: True)  # shard 0 is read here
    fence.record_gap(T, 1, 6)  # the worker skipped 1..5, resumed at 6
    out = await fence.admit(0, [(_f(3), True), (_f(3), False), (_f(8), True), (_f(8), False),
                                (_f(11), False)])
    assert [e is None for e in out] == [False, False, True, False, True]
    assert "resumed at seq 6" in str(out[0]) and "gap 1..5" in str(out[0])
    assert "next seq is 11" in str(out[3])
    assert fence.stats.refused == 3 and fence.inflight == 2
    assert fence.holds(T, 8, 9) and not fence.holds(T, 1, 8)
    fence.consumed(T, 8)
    fence.release(T, 11)
    assert fence.inflight == 0 and not fence.holds(T, 1, 100)


def test_sequencer_postpones_a_held_skip() -> None:
    seq = Sequencer(gap_timeout=1.0)
    assert seq.offer(_f(2), Delivery(0, 2, b""), 0.0) == []
    assert seq.poll(5.0, hold=lambda t, lo, hi: True) == []  # held: nothing skipped
    deadline = seq.next_deadline()
    assert deadline is not None and 5.0 < deadline <= 5.2  # re-checked soon, no busy loop
    events = seq.poll(6.0, hold=lambda t, lo, hi: False)
    assert [type(e).__name__ for e in events] == ["Gap", "Deliver"]


async def test_admitted_frame_is_waited_for_not_skipped(tmp_path: Path) -> None:
    bus = EmbeddedBus(tmp_path / "bus", shards=1)
    store = RocksSeqStore(tmp_path / "state")
    sink = CollectSink()
    fence = GapFence(store.load_topics)
    w = RelayerShardWorker(bus, 0, store, sink,
                           WorkerConfig(poll_timeout=0.05, gap_timeout=0.2), fence=fence)
    task = asyncio.create_task(w.run())
    try:
        await bus.publish(0, [encode(_f(s)) for s in (2, 3)])
        # seq 1 is admitted by the ingress (acknowledged) but still on its way to the bus
        assert await fence.admit(0, [(_f(1), False)]) == [None]
        await asyncio.sleep(0.8)  # well past gap_timeout: the skip is held
        assert sink.total() == 0 and w.stats.gaps == 0 and fence.stats.held >= 1
        await bus.publish(0, [encode(_f(1))])
        await sink.wait_for(3, 10)
        assert sink.by_topic[T] == [1, 2, 3] and fence.inflight == 0
    finally:
        w.stop()
        await asyncio.wait_for(task, 5)
        store.close()
        await bus.close()


async def test_a_frame_of_a_skipped_gap_reaching_the_worker_is_counted(tmp_path: Path) -> None:
    """What the fence cannot stop is at least not silent: a frame of a skipped gap that
    reaches the bus anyway (admitted by another relayer process, which cannot see this
    one's skip or hold it) is dropped as below the delivery point, and counted as
    ``late_on_bus``; a resend of a *delivered* frame is an ordinary duplicate."""
    bus = EmbeddedBus(tmp_path / "bus", shards=1)
    store = RocksSeqStore(tmp_path / "state")
    sink = CollectSink()
    fence = GapFence(store.load_topics, store.load_gaps)
    w = RelayerShardWorker(bus, 0, store, sink,
                           WorkerConfig(poll_timeout=0.05, gap_timeout=0.2), fence=fence)
    task = asyncio.create_task(w.run())
    try:
        await bus.publish(0, [encode(_f(s)) for s in (3, 4)])
        await sink.wait_for(2, 10)  # 1..2 skipped
        assert w.stats.gaps == 1 and fence.stats.late_on_bus == 0
        await bus.publish(0, [encode(_f(2)), encode(_f(4))])  # straight to the bus
        await bus.publish(0, [encode(_f(5))])
        await sink.wait_for(3, 10)
        assert sink.by_topic[T] == [3, 4, 5]
        assert w.stats.duplicates == 2 and fence.stats.late_on_bus == 1
        # the stored gap refuses the same seq at this relayer's ingress, retry or not
        for retry in (False, True):
            got = await fence.admit(0, [(_f(2), retry)])
            assert got[0] is not None and "gap 1..2 was skipped" in str(got[0])
    finally:
        w.stop()
        await asyncio.wait_for(task, 5)
        store.close()
        await bus.close()


@pytest.mark.parametrize("restore", [True, False], ids=["restored", "not-restored"])
async def test_overflow_frames_from_before_a_restart_hold_their_gap(
        tmp_path: Path, restore: bool) -> None:
    """Seq 1 was acknowledged into the overflow queue (the bus was slow) and the relayer
    restarted; 2 and 3 are on the bus. The new process registers the queued frame in
    flight from the queue, so its gap waits for the replay. Without that registration
    (the control case) the gap is skipped and the acknowledged frame is dropped late."""
    queue = OverflowQueue(tmp_path / "overflow", 1)
    queue.append(0, [encode(_f(1))])
    queue.close()  # the crash: only what is on disk survives
    queue = OverflowQueue(tmp_path / "overflow", 1)
    bus = EmbeddedBus(tmp_path / "bus", shards=1)
    await bus.publish(0, [encode(_f(s)) for s in (2, 3)])
    store = RocksSeqStore(tmp_path / "state")
    sink = CollectSink()
    fence = GapFence(store.load_topics, store.load_gaps)
    w = RelayerShardWorker(bus, 0, store, sink,
                           WorkerConfig(poll_timeout=0.05, gap_timeout=0.2), fence=fence)
    if restore:
        assert fence.restore(0, (decode(r) for r in queue.scan(0))) == 1
        assert fence.inflight == 1 and fence.stats.restored == 1
    task = asyncio.create_task(w.run())
    try:
        await asyncio.sleep(0.8)  # well past gap_timeout, the replay still "slow"
        await BufferedPublisher(bus, queue).replay_once()
        if restore:
            await sink.wait_for(3, 10)
            assert sink.by_topic[T] == [1, 2, 3]
            assert w.stats.gaps == 0 and fence.stats.held >= 1
            assert fence.stats.late_on_bus == 0 and fence.inflight == 0
        else:
            await eventually(lambda: fence.stats.late_on_bus == 1, 10)
            assert sink.by_topic[T] == [2, 3] and w.stats.gaps == 1
        assert queue.total() == 0
    finally:
        w.stop()
        await asyncio.wait_for(task, 5)
        store.close()
        queue.close()
        await bus.close()


async def test_a_restarted_relayer_restores_its_overflow_frames(tmp_path: Path) -> None:
    """The node wiring, seen from /metrics: frames left in the overflow queue by an
    earlier run are counted as ``restored``, reach the bus and the worker, and leave
    nothing registered in flight (a leak would hold that topic's gaps for good)."""
    shard = shard_for("acme", "q", 8)
    queue = OverflowQueue(tmp_path / "relayer" / "overflow", 8)
    queue.append(shard, [encode(Frame("acme", "q", s, b"queued")) for s in (1, 2, 3)])
    queue.close()
    node = await start_node(tmp_path, metrics_port=0)
    sub = None
    try:
        sub = await subscriber(node.port, "acme")
        await sub.wait_for(3, 30)
        assert sub.by_topic[("acme", "q")] == [1, 2, 3]
        assert node.metrics_port is not None
        port = node.metrics_port
        want = {'pqcnet_relayer_gap_fence_events_total{event="restored"}': 3.0,
                "pqcnet_relayer_delivered_frames_total": 3.0,
                "pqcnet_relayer_gap_fence_inflight_frames": 0.0,
                "pqcnet_relayer_overflow_records": 0.0,
                'pqcnet_relayer_gap_fence_events_total{event="late_on_bus"}': 0.0,
                "pqcnet_relayer_gaps_frames_total": 0.0}
        await metrics_reach(port, want, 30)
    finally:
        if sub is not None:
            await sub.close()
        await node.stop()


async def test_in_flight_only_for_shards_owned_here_and_forgotten_when_lost() -> None:
    """Admissions are registered in flight only for a shard a worker here reads: one
    owned elsewhere is never ``consumed`` here, and before this every frame accepted
    for another relayer's shard stayed registered until MAX_INFLIGHT_SEQS was reached
    (then nothing more was tracked, for any shard). Registrations made while a shard was
    owned are dropped once it moved away."""
    owned = {0, 1}
    fence = GapFence(owns=owned.__contains__)
    assert await fence.admit(0, [(_f(1), False), (_f(2), False)]) == [None, None]
    other = Frame("c", "other", 1, b"p")
    assert await fence.admit(1, [(other, False)]) == [None]
    assert fence.inflight == 3
    owned.discard(0)  # shard 0 moved to another relayer with two frames unread
    assert await fence.admit(0, [(_f(3), False)]) == [None]
    assert fence.inflight == 1  # shard 1's frame only; nothing of shard 0
    assert not fence.holds(T, 1, 4)
    fence.consumed(other.topic, 1)
    assert fence.inflight == 0 and fence.stats.untracked == 0


async def test_a_shard_not_owned_for_a_moment_but_still_assigned_keeps_its_registrations(
        ) -> None:
    """A Redis lease whose validity ran out before the next renewal round: the worker
    takes no records for that moment (``owns`` false), but no loss was reported
    (``assigned`` true) and the round will renew it. An admission then is registered
    and drops nothing; before, it dropped the shard's registrations and registered
    nothing, so the worker could skip the gap of an acknowledged frame afterwards. The
    marks of both the store (read: not owned now) and the worker count."""
    owns_now, assigned = {0}, {0}
    reads: list[int] = []

    async def lookup(shard: int, topics: object) -> dict[tuple[str, str], int]:
        reads.append(shard)
        return {T: 3}  # the store: delivered up to seq 2

    fence = GapFence(lookup, owns=owns_now.__contains__, assigned=assigned.__contains__)
    fence.attach_worker(0, lambda topic: 5 if topic == T else None)  # the worker: up to 4
    assert await fence.admit(0, [(_f(5), False)]) == [None]
    assert fence.inflight == 1 and reads == []
    owns_now.discard(0)  # the lease round runs late
    got = await fence.admit(0, [(_f(4), False), (_f(6), False)])
    assert isinstance(got[0], LateFrame) and got[1] is None  # the worker's marks count
    assert reads == [0]  # not owned now: the store is read as well
    assert fence.inflight == 2 and fence.holds(T, 5, 6) and fence.holds(T, 6, 7)
    assigned.discard(0)  # the round reported the loss: what was registered goes
    assert await fence.admit(0, [(_f(7), False)]) == [None]
    assert fence.inflight == 0


async def test_forget_shards_drops_only_those_shards() -> None:
    """What a cluster hand-over calls: the lost shards' registrations go (counted), the
    kept shard's stay and still hold its gap."""
    fence = GapFence(owns=lambda shard: True)
    for shard in (0, 1, 2):
        frames = [(Frame("c", f"s{shard}", seq, b"p"), False) for seq in (1, 2)]
        assert await fence.admit(shard, frames) == [None, None]
    assert fence.forget_shards({0, 2, 5}) == 4
    assert fence.inflight == 2 and fence.holds(("c", "s1"), 1, 3)
    assert not fence.holds(("c", "s0"), 1, 3) and not fence.holds(("c", "s2"), 1, 3)
    assert fence.forget_shards({0}) == 0
    fence.consumed_many([Frame("c", "s1", 1, b"p"), Frame("c", "s1", 2, b"p")])
    assert fence.inflight == 0


async def test_a_shard_lost_while_the_store_is_read_is_not_registered() -> None:
    """The marks read is an await: the shard can move to another relayer meanwhile.
    Registration follows ownership *after* the read (a frame registered for a shard
    no worker here reads again would stay in flight), and a shard gained meanwhile is
    registered."""
    owned = {0}

    async def lookup(shard: int, topics: object) -> dict[tuple[str, str], int]:
        owned.clear()
        owned.add(1)  # a rebalance: 0 goes away, 1 comes
        return {}

    fence = GapFence(lookup, owns=owned.__contains__)
    other = Frame("c", "other", 1, b"p")
    got = await fence.admit_many({0: [(_f(1), False)], 1: [(other, False)]})
    assert got == {0: [None], 1: [None]}
    assert fence.inflight == 1 and fence.holds(other.topic, 1, 2)
    assert not fence.holds(T, 1, 2)


async def test_a_worker_s_marks_count_only_while_it_owns_the_shard() -> None:
    """A worker's in-memory marks are newer than the store only while its shard is
    owned here; once the shard moved away (before the worker resets) they are stale,
    and the new owner's marks in the shared store decide."""
    owned = {0}

    async def shared(shard: int, topics: object) -> dict[tuple[str, str], int]:
        return {T: 10}  # the new owner delivered up to 9

    fence = GapFence(shared, owns=owned.__contains__)
    fence.attach_worker(0, lambda topic: 5)  # what this worker knew when it owned it
    assert await fence.admit(0, [(_f(7), False)]) == [None]  # its marks rule while owned
    owned.clear()
    got = await fence.admit(0, [(_f(7), False)])
    assert got[0] is not None and "next seq is 10" in str(got[0])


@pytest.mark.parametrize("kind", ["rocks", "redis"])
async def test_stored_gaps_merge_and_stay_bounded(kind: str, tmp_path: Path,
                                                  redis_url: str) -> None:
    """Each write adds its skipped ranges to those recorded (read-modify-write by the one
    writer of the shard); only the most recent MAX_RANGES_PER_TOPIC are kept; a gap
    written without marks or volume is still written; other shards do not see it."""
    client = aioredis.from_url(redis_url)
    store: SeqStore = (RocksSeqStore(tmp_path / "marks") if kind == "rocks"
                       else RedisSeqStore(client, f"gaps:{uuid.uuid4().hex[:8]}"))
    try:
        other = ("c", "y")
        await store.save(3, {T: 3}, gaps={T: [(1, 3)]})
        await store.save(3, {}, gaps={T: [(4, 6)], other: [(1, 2)]})
        assert await store.load_gaps(3, [T, other, ("c", "z")]) == {
            T: [(1, 3), (4, 6)], other: [(1, 2)]}
        assert await store.load_gaps(2, [T]) == {}
        n = MAX_RANGES_PER_TOPIC + 5
        for k in range(n):  # one gap per write, as a worker skipping them one by one
            await store.save(3, {T: 100 + 10 * k + 5},
                             gaps={T: [(100 + 10 * k, 100 + 10 * k + 5)]})
        got = (await store.load_gaps(3, [T]))[T]
        assert len(got) == MAX_RANGES_PER_TOPIC
        assert got[-1] == (100 + 10 * (n - 1), 100 + 10 * (n - 1) + 5)  # newest kept
        assert got[0] == (100 + 10 * (n - MAX_RANGES_PER_TOPIC),
                          100 + 10 * (n - MAX_RANGES_PER_TOPIC) + 5)
    finally:
        if isinstance(store, RocksSeqStore):
            store.close()
        await client.aclose()


async def test_a_retry_that_cannot_be_checked_is_refused_retriably() -> None:
    """The store's gaps cannot be read (broker down): a retry below the delivery point is
    refused with a retriable error, not acknowledged unchecked; a fresh frame at or past
    the delivery point is admitted (no gap read needed)."""
    async def marks(shard: int, topics: object) -> dict[tuple[str, str], int]:
        return {T: 10}

    async def gaps(shard: int, topics: object) -> dict[tuple[str, str], list[tuple[int, int]]]:
        raise BusUnavailable("redis unavailable loading gaps: connection refused")

    fence = GapFence(marks, gaps, owns=lambda shard: True)
    got = await fence.admit_many({0: [(_f(4), True)], 1: [(_f(10), False)]})
    assert isinstance(got[0], BusUnavailable) and got[0].retriable
    assert got[1] == [None]
    assert fence.stats.gap_reads == 1 and fence.inflight == 1
