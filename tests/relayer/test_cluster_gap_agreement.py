"""The cross-relayer gap race, end to end with two relayer processes (Redis, Kafka)
(decision 0020). r0 owns the topic's shard; seq 2 and 3 reach it, seq 1 is missing.
r0 is SIGSTOPped; the publisher fails over to r1, which acknowledges a backlog for the
same shard and then seq 1. r0 resumes with its ``gap_timeout`` long gone and seq 1
behind thousands of records: before the agreement it skipped seq 1 on its first step
and dropped it when it got there (an acknowledged frame lost). Now r1's marker holds
the skip and the subscriber gets every acknowledged frame once and in order. Counted
from outside: /metrics over HTTP and ``redis-cli``."""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path

import pytest

from pqcnet.relayer.frame import Frame, shard_for
from tests.relayer.e2e import publisher, subscriber
from tests.relayer.helpers import eventually, redis_cli, scrape_metrics
from tests.relayer.proc import RelayerProcess, write_config

pytestmark = [pytest.mark.services, pytest.mark.timeout(240)]

SHARDS = 2
BACKLOG = 12_000  # records ahead of seq 1: far more than one worker step reads
FENCE = "pqcnet_relayer_gap_fence_events_total{{event=\"{}\"}}"


@pytest.mark.parametrize("backend", ["redis", "kafka"])
async def test_an_owner_stopped_mid_gap_waits_for_the_frame_acknowledged_elsewhere(
        tmp_path: Path, redis_url: str, backend: str, request: pytest.FixtureRequest) -> None:
    """On Redis streams, and on Kafka with the marks in Redis (``redis_url``)."""
    tag = uuid.uuid4().hex[:8]
    prefix = f"agree:{tag}"
    shard = shard_for("acme", "late", SHARDS)
    fillers = [ch for ch in (f"fill{i}" for i in range(64))
               if shard_for("acme", ch, SHARDS) == shard][:4]
    common = {"backend": backend, "redis_url": redis_url, "redis_prefix": prefix,
              "shards": SHARDS, "gap_timeout": 1.0, "metrics_port": 0}
    if backend == "kafka":  # static partitions (owned_shards): no group rebalancing
        common |= {"kafka_bootstrap": request.getfixturevalue("kafka_bootstrap"),
                   "kafka_topic": f"pqcnet-agree-{tag}", "group": f"agree-{tag}"}
    procs = []
    for i, owned in enumerate((shard, 1 - shard)):
        (tmp_path / f"r{i}").mkdir()
        procs.append(RelayerProcess(write_config(tmp_path / f"r{i}", node_id=f"r{i}",
                                                 owned_shards=[owned], **common)))
    r0, r1 = procs
    await r0.start()
    await r1.start()
    sub = await subscriber(r0.port, "acme")
    pub0 = await publisher(r0.port)
    pub1 = await publisher(r1.port)
    stopped = False
    try:
        res = await pub0.publish([Frame("acme", "late", s, b"x%d" % s) for s in (2, 3)])
        assert all(r.accepted for r in res)
        await asyncio.sleep(0.3)  # r0 read them: the gap's clock runs
        assert r0.proc is not None
        r0.proc.send_signal(signal.SIGSTOP)
        stopped = True
        per = BACKLOG // len(fillers)
        for start in range(1, per + 1, 500):
            frames = [Frame("acme", ch, s, b"f") for ch in fillers
                      for s in range(start, min(start + 500, per + 1))]
            assert all(r.accepted for r in await pub1.publish(frames))
        res = await pub1.publish([Frame("acme", "late", 1, b"x1")])
        assert res[0].accepted, res[0]  # acknowledged by r1, the shard's non-owner
        await asyncio.sleep(1.2)  # r0's gap_timeout runs out while it is stopped
        r0.proc.send_signal(signal.SIGCONT)
        stopped = False
        await sub.wait_for(per * len(fillers) + 3, 120)
        assert sub.by_topic[("acme", "late")] == [1, 2, 3]
        for ch in fillers:
            assert sub.by_topic[("acme", ch)] == list(range(1, per + 1))
        m0 = await asyncio.to_thread(scrape_metrics, r0.ready["metrics_port"])
        m1 = await asyncio.to_thread(scrape_metrics, r1.ready["metrics_port"])
        assert m0[FENCE.format("held_elsewhere")] >= 1  # the race happened, and was held
        assert m0[FENCE.format("late_on_bus")] == 0 and m0[FENCE.format("reserved")] == 0
        assert m0["pqcnet_relayer_gaps_frames_total"] == 0
        assert m1[FENCE.format("marked")] == per * len(fillers) + 1
        assert m1[FENCE.format("refused")] == 0
        # r0's saves deleted every marker as its marks moved past them
        acked = f"{prefix}:acked:{shard}"
        await eventually(lambda: redis_cli(redis_url, "ZCARD", acked).strip()
                         == "(integer) 0", 30)
    finally:
        if stopped and r0.proc is not None:
            r0.proc.send_signal(signal.SIGCONT)
        await pub0.close()
        await pub1.close()
        await sub.close()
        for p in procs:
            await p.stop()
