"""Reproduction 1 of issue 11: a late frame below a skipped gap must never be
acknowledged and then discarded. The relayer refuses it *before* the ack with a typed
error naming the seq the topic moved past (docs/decisions/0012-late-frames.md)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pqcnet.relayer.errors import LateFrame
from pqcnet.relayer.frame import Frame
from tests.relayer.e2e import publisher, start_node, subscriber

pytestmark = pytest.mark.timeout(60)


async def test_late_frames_below_a_skipped_gap_are_refused_before_ack(tmp_path: Path) -> None:
    node = await start_node(tmp_path, gap_timeout=0.3)
    sub = await subscriber(node.port, "acme")
    try:
        pub = await publisher(node.port)
        res = await pub.publish([Frame("acme", "late", s, b"x%d" % s) for s in range(6, 11)])
        assert all(r.accepted for r in res)
        await sub.wait_for(5, 30)  # the worker skipped the gap 1..5 and delivered 6..10
        assert sub.by_topic[("acme", "late")] == [6, 7, 8, 9, 10]
        late = await publisher(node.port)  # a fresh tunnel: no SeqNotMonotonic in the way
        for retry in (False, True):
            res = await late.publish([Frame("acme", "late", s, b"y") for s in range(1, 6)],
                                     retry=retry)
            assert [r.accepted for r in res] == [False] * 5, res
            assert {r.code for r in res} == {LateFrame.code}
            assert all("moved past" in r.reason and "6" in r.reason for r in res), res
        # nothing was acknowledged, so nothing may arrive; later seqs still flow
        res = await pub.publish([Frame("acme", "late", 11, b"z")])
        assert res[0].accepted
        await sub.wait_for(6, 30)
        await asyncio.sleep(0.3)
        assert sub.by_topic[("acme", "late")] == [6, 7, 8, 9, 10, 11]
        # a retry of a frame that *was* delivered is still accepted (and suppressed)
        res = await late.publish([Frame("acme", "late", 8, b"x8")], retry=True)
        assert res[0].accepted
        await pub.close()
        await late.close()
    finally:
        await sub.close()
        await node.stop()
