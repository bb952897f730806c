"""Reproduction 1 of issue 11: a late frame below a skipped gap must never be
acknowledged and then discarded. The relayer refuses it *before* the ack with a typed
error naming the seq the topic moved past (docs/decisions/0012-late-frames.md) — also
after the relayer restarted (the skipped ranges are stored with the marks), and at a
relayer of a cluster that does not own the shard (a failed-over publisher's retry)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import httpx
import pytest

from pqcnet.relayer.client import PublisherClient
from pqcnet.relayer.errors import LateFrame
from pqcnet.relayer.frame import Frame, shard_for
from pqcnet.relayer.node import RelayerNode
from tests.relayer.e2e import identities, publisher, start_node, subscriber
from tests.relayer.helpers import redis_cli

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
    # the same relayer restarted (same data dir): nothing of the gap is in memory now,
    # the retries are checked against the ranges stored with the marks
    node = await start_node(tmp_path, gap_timeout=0.3)
    try:
        assert node.fence.stats.gap_reads == 0
        late = await publisher(node.port)
        res = await late.publish([Frame("acme", "late", s, b"y") for s in range(1, 6)],
                                 retry=True)
        assert {r.code for r in res} == {LateFrame.code}, res
        assert all("gap 1..5 was skipped" in r.reason for r in res), res
        assert node.fence.stats.gap_reads == 1  # one topic read from the store
        assert node.fence.stats.refused == 5
        res = await late.publish([Frame("acme", "late", 9, b"x9")], retry=True)
        assert res[0].accepted  # delivered before the restart: a resend, suppressed
        await late.close()
    finally:
        await node.stop()


def _fence_events(port: int) -> dict[str, float]:
    """``pqcnet_relayer_gap_fence_events_total`` by event, scraped over HTTP."""
    body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out = {}
    for line in body.splitlines():
        if line.startswith("pqcnet_relayer_gap_fence_events_total{"):
            labels, value = line.rsplit(" ", 1)
            out[labels.split('"')[1]] = float(value)
        elif line.startswith("pqcnet_relayer_gap_fence_inflight_frames "):
            out["inflight"] = float(line.split()[1])
        elif line.startswith("pqcnet_relayer_shards_catching_up "):
            out["catching_up"] = float(line.split()[1])
    return out


async def _retry_at(node: RelayerNode, frames: list[Frame]) -> list[int]:
    pub = await PublisherClient.connect("127.0.0.1", node.port, identities()[1])
    try:
        return [r.code for r in await pub.publish(frames, retry=True)]
    finally:
        await pub.close()


async def test_a_retry_in_a_gap_is_refused_by_a_relayer_not_owning_the_shard(
        tmp_path: Path, redis_url: str) -> None:
    """Two relayers on Redis split the shards (r0 owns the topic's). r0's worker skips
    the gap 1..5; the publisher "fails over" to r1, which has no worker, no memory of
    the gap and no cached mark for the topic: it reads mark and gaps from Redis and
    refuses the retries. Before the gaps were stored, r1 acknowledged them and r0's
    worker suppressed them as duplicates — acknowledged, never delivered."""
    prefix = f"late:{uuid.uuid4().hex[:8]}"
    shard = shard_for("acme", "late", 2)
    common = {"backend": "redis", "redis_url": redis_url, "redis_prefix": prefix,
              "shards": 2, "gap_timeout": 0.3}
    owner = await start_node(tmp_path / "r0", owned_shards=[shard], node_id="r0", **common)
    other = await start_node(tmp_path / "r1", owned_shards=[1 - shard], node_id="r1",
                             metrics_port=0, **common)
    sub = await subscriber(owner.port, "acme")
    try:
        pub = await publisher(owner.port)
        res = await pub.publish([Frame("acme", "late", s, b"x%d" % s) for s in range(6, 11)])
        assert all(r.accepted for r in res)
        await sub.wait_for(5, 30)
        assert sub.by_topic[("acme", "late")] == [6, 7, 8, 9, 10]
        await pub.close()
        # what r1 will read, seen with redis-cli (not our store code)
        fields = await asyncio.to_thread(redis_cli, redis_url, "HGETALL",
                                         f"{prefix}:gaps:{shard}")
        assert fields.splitlines()[1].split()[-1] == '"1-6"', fields  # [lo, hi): 1..5
        codes = await _retry_at(other, [Frame("acme", "late", s, b"y") for s in range(1, 6)])
        assert codes == [LateFrame.code] * 5
        assert other.fence.stats.gap_reads == 1 and other.fence.stats.refused == 5
        assert await asyncio.to_thread(_fence_events, other.metrics_port or 0) == {
            "refused": 5.0, "held": 0.0, "untracked": 0.0, "gap_reads": 1.0, "late_on_bus": 0.0,
            "restored": 0.0, "inflight": 0.0, "marked": 0.0, "reserved": 0.0,
            "held_elsewhere": 0.0, "refused_on_bus": 0.0, "held_catching_up": 0.0,
            "catching_up": 0.0}
        assert owner.fence.stats.gap_reads == 0  # the owner had the gap in memory
        # the owner reserved its skip in the shared store first (decision 0020)
        assert owner.fence.stats.reserved == 1 and owner.fence.stats.held_elsewhere == 0
        # a resend of a delivered frame is still accepted at r1 (confirmed in the store
        # after its append: below the mark, no marker), and never redelivered
        assert await _retry_at(other, [Frame("acme", "late", 7, b"x7")]) == [0]
        assert other.fence.stats.marked == 1
        # r1 has no worker for the shard: nothing it accepts for it is held in flight
        # there (r0's worker reads it; r1 would wait for its "consumed" for good)
        assert other.fence.inflight == 0
        assert (await asyncio.to_thread(_fence_events, other.metrics_port or 0))[
            "inflight"] == 0.0
        await asyncio.sleep(0.5)
        assert sub.by_topic[("acme", "late")] == [6, 7, 8, 9, 10]
    finally:
        await sub.close()
        await other.stop()
        await owner.stop()
