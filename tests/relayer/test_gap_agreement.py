"""The cluster's per-frame agreement on gap skips (decision 0020), on a real Redis.

Relayer A owns the shard and reads it; relayer B acknowledges frames for that shard
(its ingress: a gap fence that owns nothing and confirms in the shared store). Each
test plays one of the two orders the store's scripts can run in, and the case of an
owner that reserved a skip and stopped before its save. The control cases show what
happened before: without the agreement the acknowledged frame is skipped and dropped
(``late_on_bus``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from pqcnet.relayer.bus.base import Bus, Delivery
from pqcnet.relayer.bus.redis_streams import RedisStreamsBus
from pqcnet.relayer.errors import BusUnavailable, LateFrame
from pqcnet.relayer.frame import Frame, encode
from pqcnet.relayer.gapfence import GapFence
from pqcnet.relayer.seqstore import RedisSeqStore
from pqcnet.relayer.sequencer import Deliver, Duplicate, Gap, Sequencer
from pqcnet.relayer.worker import RelayerShardWorker, WorkerConfig
from tests.relayer.conftest import BusFactory
from tests.relayer.helpers import CollectSink, eventually, redis_cli

pytestmark = pytest.mark.services

T = ("c", "x")
CFG = WorkerConfig(poll_timeout=0.05, gap_timeout=0.2)


def _f(seq: int, channel: str = "x") -> Frame:
    return Frame("c", channel, seq, b"p%d" % seq)


def _redis(bus: Bus) -> tuple[RedisStreamsBus, RedisSeqStore]:
    assert isinstance(bus, RedisStreamsBus)
    return bus, RedisSeqStore(bus.client, bus.prefix)


class Owner:
    """Relayer A's shard worker (with or without the agreement), running."""

    def __init__(self, bus: RedisStreamsBus, store: RedisSeqStore, agree: bool) -> None:
        self.sink = CollectSink()
        self.fence = GapFence(store.load_topics, store.load_gaps)
        self.worker = RelayerShardWorker(bus, 0, store, self.sink, CFG, fence=self.fence,
                                         agreement=store.agreement if agree else None)
        self.task = asyncio.create_task(self.worker.run())

    async def stop(self) -> None:
        self.worker.stop()
        await asyncio.wait_for(self.task, 10)


@pytest.fixture
async def shared(redis_bus_factory: BusFactory) -> AsyncIterator[tuple[RedisStreamsBus,
                                                                       RedisSeqStore]]:
    yield _redis(redis_bus_factory(shards=1, consumer="a"))


def _other_relayer(store: RedisSeqStore) -> GapFence:
    """Relayer B's ingress fence: owns no shard, confirms in the shared store."""
    return GapFence(store.load_topics, store.load_gaps, owns=lambda shard: False,
                    confirm=store.agreement.confirm)


@pytest.mark.parametrize("agree", [True, False], ids=["agreement", "control"])
async def test_a_frame_acknowledged_elsewhere_holds_the_owners_skip(
        shared: tuple[RedisStreamsBus, RedisSeqStore], redis_url: str, agree: bool) -> None:
    """B acknowledged seq 1 (its marker is in the store) but the frame has not reached
    the bus yet (B's overflow queue, or a deep backlog before it). A's gap times out:
    the reservation finds the marker and the skip waits; the frame arrives and is
    delivered in order. The control (no agreement) skips it and drops it late."""
    bus, store = shared
    owner = Owner(bus, store, agree)
    b = _other_relayer(store)
    try:
        await bus.publish(0, [encode(_f(2)), encode(_f(3))])
        assert await b.admit(0, [(_f(1), False)]) == [None]
        assert await b.confirm({0: [_f(1)]}) == {0: [None]}  # acknowledged by B
        assert b.stats.marked == 1
        acked = f"{bus.prefix}:acked:0"
        assert redis_cli(redis_url, "ZCARD", acked).strip() == "(integer) 1"
        await asyncio.sleep(1.0)  # five gap timeouts
        if agree:
            assert owner.sink.total() == 0 and owner.worker.stats.gaps == 0
            assert owner.fence.stats.held_elsewhere >= 1 and owner.fence.stats.reserved == 0
        else:
            assert owner.sink.by_topic[T] == [2, 3] and owner.worker.stats.gaps == 1
        await bus.publish(0, [encode(_f(1))])  # B's copy reaches the bus
        if agree:
            await owner.sink.wait_for(3, 10)
            assert owner.sink.by_topic[T] == [1, 2, 3]
            # the save that moved the mark past seq 1 deleted its marker
            await eventually(lambda: redis_cli(redis_url, "ZCARD", acked).strip()
                             == "(integer) 0", 10)
            assert owner.fence.stats.late_on_bus == 0
            assert redis_cli(redis_url, "HLEN", f"{bus.prefix}:pending:0").strip() \
                == "(integer) 0"
        else:
            await eventually(lambda: owner.fence.stats.late_on_bus == 1, 10)
            assert owner.sink.by_topic[T] == [2, 3]
    finally:
        await owner.stop()


async def test_a_reserved_skip_refuses_the_frame_acknowledged_after_it(
        shared: tuple[RedisStreamsBus, RedisSeqStore], redis_url: str) -> None:
    """The other order: B's check before its append passed (A had not skipped yet),
    then A reserved and skipped the gap, then B appended and confirms: B is refused
    (LateFrame, never acknowledged) and A drops B's copy from the bus as a refused
    frame (``refused_on_bus``), not as a lost one."""
    bus, store = shared
    b = _other_relayer(store)
    assert await b.admit(0, [(_f(1), False)]) == [None]  # before A skips anything
    owner = Owner(bus, store, agree=True)
    try:
        await bus.publish(0, [encode(_f(2)), encode(_f(3))])
        await owner.sink.wait_for(2, 10)  # seq 1 reserved and skipped
        assert owner.fence.stats.reserved == 1 and owner.worker.stats.gaps == 1
        gaps = redis_cli(redis_url, "HVALS", f"{bus.prefix}:gaps:0")
        assert gaps.split() == ['1)', '"1-2"'], gaps  # recorded once (reserve, then save)
        await bus.publish(0, [encode(_f(1))])  # B's append
        got = await b.confirm({0: [_f(1)]})
        assert isinstance(got[0][0], LateFrame) and "gave up its gap" in str(got[0][0])
        assert b.stats.refused == 1 and b.stats.marked == 0
        await bus.publish(0, [encode(_f(4))])
        await owner.sink.wait_for(3, 10)
        assert owner.sink.by_topic[T] == [2, 3, 4]
        assert owner.fence.stats.refused_on_bus == 1 and owner.fence.stats.late_on_bus == 0
    finally:
        await owner.stop()


async def test_a_skip_reserved_by_a_relayer_that_stopped_is_honoured_by_the_next(
        shared: tuple[RedisStreamsBus, RedisSeqStore], redis_url: str) -> None:
    """A reserved ``[1, 3)`` and stopped before the save that moves its marks past it:
    B then refused seq 1 and 2 after appending them. The next owner loads the pending
    range, drops those refused copies and resumes at 3; its save ends the pending
    range."""
    bus, store = shared
    assert await store.agreement.reserve(0, [(T, 1, 3)]) == [True]  # A, then A stops
    pending = f"{bus.prefix}:pending:0"
    assert redis_cli(redis_url, "HVALS", pending).split() == ['1)', '"1-3"']
    b = _other_relayer(store)
    got = await b.confirm({0: [_f(1), _f(2), _f(3)]})
    assert [type(e).__name__ for e in got[0]] == ["LateFrame", "LateFrame", "NoneType"]
    await bus.publish(0, [encode(_f(s)) for s in (1, 2, 3, 4)])  # B's appends
    owner = Owner(bus, store, agree=True)
    try:
        await owner.sink.wait_for(2, 10)
        await asyncio.sleep(0.3)
        assert owner.sink.by_topic[T] == [3, 4]
        # B's refused copies dropped as such, none counted as an acknowledged frame lost
        assert owner.fence.stats.refused_on_bus == 2 and owner.fence.stats.late_on_bus == 0
        assert owner.worker.stats.duplicates == 2 and owner.worker.stats.gaps == 1
        await eventually(lambda: redis_cli(redis_url, "HLEN", pending).strip()
                         == "(integer) 0", 10)
    finally:
        await owner.stop()


async def test_reserve_is_fenced_by_the_shard_lease(
        shared: tuple[RedisStreamsBus, RedisSeqStore], redis_url: str) -> None:
    """A relayer whose shard lease another one holds reserves nothing (a stale owner
    must not refuse frames the new owner will wait for)."""
    bus, _ = shared
    lease = f"{bus.prefix}:test-lease:0"
    redis_cli(redis_url, "SET", lease, "other")
    stale = RedisSeqStore(bus.client, bus.prefix, fence=lambda shard: (lease, "me"))
    with pytest.raises(BusUnavailable, match="lease lost"):
        await stale.agreement.reserve(0, [(T, 1, 3)])
    assert redis_cli(redis_url, "EXISTS", f"{bus.prefix}:pending:0").strip() == "(integer) 0"
    assert redis_cli(redis_url, "EXISTS", f"{bus.prefix}:gaps:0").strip() == "(integer) 0"
    unleased = RedisSeqStore(bus.client, bus.prefix, fence=lambda shard: None)
    with pytest.raises(BusUnavailable, match="not leased here"):
        await unleased.agreement.reserve(0, [(T, 1, 3)])


async def test_local_admissions_inside_a_pending_reservation_are_refused() -> None:
    """While the owner's reservation call is out, its own ingress must not acknowledge a
    frame of the range (the store may already have recorded the skip)."""
    fence = GapFence(owns=lambda shard: True)
    started, release = asyncio.Event(), asyncio.Event()

    async def reserve(shard: int, spans: object) -> list[bool]:
        started.set()
        await release.wait()
        return [True]

    call = asyncio.create_task(fence.agree(0, [(T, 1, 3)], reserve))
    await started.wait()
    got = await fence.admit(0, [(_f(2), False), (_f(3), False)])
    assert isinstance(got[0], LateFrame) and "giving up the gap 1..2" in str(got[0])
    assert got[1] is None
    release.set()
    assert await call == {(T, 1, 3)}
    assert fence.stats.reserved == 1 and fence.stats.refused == 1


def test_sequencer_honours_a_preskipped_range() -> None:
    """Frames of an agreed range are suppressed; the topic jumps over it when its
    delivery reaches it."""
    seq = Sequencer(gap_timeout=5.0)
    seq.prime({T: 1}, [T])
    seq.preskip({T: (3, 6)})

    def offer(n: int) -> list[str]:
        delivered: list[Frame] = []
        events = seq.offer_batch([(_f(n), Delivery(0, n, b""))], 0.0, delivered)
        return [f"Duplicate:{e.frame.seq}" if isinstance(e, Duplicate)
                else f"Gap:{e.expected}-{e.resumed_at}:{e.agreed}"
                for e in events if not isinstance(e, Deliver)
                ] + [f"Deliver:{f.seq}" for f in delivered]

    assert offer(1) == ["Deliver:1"]
    assert offer(4) == ["Duplicate:4"]
    assert offer(7) == []  # buffered: 2 is missing
    assert offer(2) == ["Gap:3-6:True", "Deliver:2"]  # 3..5 given up: next is 6
    assert offer(5) == ["Duplicate:5"]
    assert offer(6) == ["Deliver:6", "Deliver:7"] and seq.next_seq(T) == 8
    assert not Gap(T, 1, 2).agreed  # a skip made alone


def test_a_full_reorder_buffer_makes_the_gap_due_when_skips_are_agreed() -> None:
    """Without the agreement a full buffer skips the oldest gap at once (a skip nobody
    agreed on); with it the gap becomes due for the next poll, and only past twice the
    bound is the skip forced."""
    def run(defer: bool) -> tuple[list[str], Sequencer]:
        seq = Sequencer(max_reorder=2, gap_timeout=30.0, defer_forced=defer)
        seq.prime({T: 1}, [T])
        names: list[str] = []
        for n in (3, 4, 5):  # 1 and 2 missing; the third frame finds the buffer full
            delivered: list[Frame] = []
            events = seq.offer_batch([(_f(n), Delivery(0, n, b""))], 0.0, delivered)
            names += [type(e).__name__ for e in events] + [f"Deliver:{f.seq}" for f in delivered]
        return names, seq

    names, seq = run(False)
    assert names == ["Gap", "Deliver:3", "Deliver:4", "Deliver:5"]
    names, seq = run(True)
    assert names == [] and seq.buffered == 3
    assert seq.due(0.0) == [(T, 1, 3)]  # due at once, though gap_timeout is 30 s
    assert [type(e).__name__ for e in seq.poll(0.0, hold=lambda t, lo, hi: False)] == [
        "Gap", "Deliver", "Deliver", "Deliver"]
    seq = Sequencer(max_reorder=2, gap_timeout=30.0, defer_forced=True)
    seq.prime({T: 1}, [T])
    held = [seq.offer_batch([(_f(n), Delivery(0, n, b""))], 0.0, []) for n in (3, 4, 5, 6)]
    assert held == [[], [], [], []] and seq.buffered == 4  # twice the bound
    assert [type(e).__name__ for e in seq.offer(_f(7), Delivery(0, 7, b""), 0.0)] == [
        "Gap", "Deliver", "Deliver", "Deliver", "Deliver", "Deliver"]


async def test_a_full_buffer_skip_is_agreed_so_a_late_copy_is_refused_not_lost(
        shared: tuple[RedisStreamsBus, RedisSeqStore]) -> None:
    """A shard whose reorder buffer fills: the skip is reserved first, so B's confirm
    of the missing seq afterwards is refused and the owner's drop of B's copy is
    ``refused_on_bus`` — before, the forced skip was never agreed and the same copy,
    acknowledged by B, was lost (``late_on_bus``)."""
    bus, store = shared
    b = _other_relayer(store)
    assert await b.admit(0, [(_f(1), False)]) == [None]  # B checked before the skip
    sink = CollectSink()
    fence = GapFence(store.load_topics, store.load_gaps)
    w = RelayerShardWorker(bus, 0, store, sink,
                           WorkerConfig(poll_timeout=0.05, gap_timeout=30.0, max_reorder=4),
                           fence=fence, agreement=store.agreement)
    task = asyncio.create_task(w.run())
    try:
        await bus.publish(0, [encode(_f(s)) for s in range(2, 8)])  # 6 > max_reorder
        await sink.wait_for(6, 10)  # long before gap_timeout
        assert fence.stats.reserved == 1 and w.stats.gaps == 1
        await bus.publish(0, [encode(_f(1))])  # B's append, then its confirm
        got = await b.confirm({0: [_f(1)]})
        assert isinstance(got[0][0], LateFrame)
        await bus.publish(0, [encode(_f(8))])
        await sink.wait_for(7, 10)
        assert sink.by_topic[T] == [2, 3, 4, 5, 6, 7, 8]
        assert fence.stats.refused_on_bus == 1 and fence.stats.late_on_bus == 0
    finally:
        w.stop()
        await asyncio.wait_for(task, 10)
