"""The gap fence (decision 0012): what it refuses, and the race it closes — a frame
admitted (acknowledged) just before its gap would be skipped is waited for, never
skipped and then discarded."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pqcnet.relayer.bus.base import Delivery
from pqcnet.relayer.bus.embedded import EmbeddedBus
from pqcnet.relayer.frame import Frame, encode
from pqcnet.relayer.gapfence import GapFence
from pqcnet.relayer.seqstore import RocksSeqStore
from pqcnet.relayer.sequencer import Sequencer
from pqcnet.relayer.worker import RelayerShardWorker, WorkerConfig
from tests.relayer.helpers import CollectSink

T = ("c", "x")


def _f(seq: int) -> Frame:
    return Frame("c", "x", seq, b"p%d" % seq)


async def test_fence_rules() -> None:
    marks = {T: 11}

    async def lookup(shard: int, topics: object) -> dict[tuple[str, str], int]:
        return dict(marks)

    fence = GapFence(lookup)
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
