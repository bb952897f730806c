"""A 3-relayer cluster on one Kafka topic (issue 15): the group protocol splits the
partitions, one relayer is SIGKILLed mid-stream and a third one joins; the shared
dedup marks and volume (Redis) move with the partitions. The failover publisher and
the cluster subscriber record histories; pqcnet.chaos's checker finds no lost
acknowledged, duplicated, out-of-order, phantom or mis-billed frame. Last, each
relayer's signed volume proofs cover exactly what it metered, only for partitions the
group gave it in that epoch (the ownership journal in Redis), their union is the total
and no frame is proved twice."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from pqcnet.relayer.frame import Topic
from tests.relayer.cluster import ClusterRun, metered
from tests.relayer.helpers import eventually

pytestmark = pytest.mark.timeout(240)

TOPICS: list[Topic] = [("acme", f"ch{i}") for i in range(4)]
COUNT = 320  # frames per topic
BATCH = 8
EPOCH = 3.0
SHARDS = 8


async def test_three_relayers_kill_one_add_one(tmp_path: Path, kafka_bootstrap: str,
                                               redis_url: str) -> None:
    tag = uuid.uuid4().hex[:8]
    prefix = f"cluster:{tag}"
    run = ClusterRun(tmp_path, TOPICS, COUNT, BATCH, backend="kafka",
                     kafka_bootstrap=kafka_bootstrap, kafka_topic=f"pqcnet-cluster-{tag}",
                     group=f"cluster-{tag}", redis_url=redis_url, redis_prefix=prefix,
                     kafka_session_timeout=6.0, kafka_commit_interval=0.0,
                     epoch_seconds=EPOCH, shards=SHARDS)
    procs, by_relayer = run.procs, run.by_relayer
    await asyncio.gather(procs[0].start(), procs[1].start())
    consumer = asyncio.create_task(run.consume())
    kill_at: int | None = None
    try:
        step = 0
        while not run.done():
            await run.publish_step()
            step += 1
            # r1 must own partitions (it delivered) before it dies; the group may give it
            # some only after a rebalance (seconds on a new broker), and it can deliver
            # only what is published after that: keep publishing, slowly, until it has
            # (waiting without publishing failed once, on a cold CI's fresh broker)
            if kill_at is None and step >= 8 and by_relayer[1] > 0 \
                    and await run.has_metered("r1"):
                procs[1].kill()  # mid-stream: its partitions move after the session timeout
                kill_at = step
            if kill_at is not None and step == kill_at + 6:
                await procs[2].start()  # joins the group: takes partitions over
                run.pub.targets.append(run.targets[2])
            # after r2 joined, slow down until the group gave it partitions
            joined = kill_at is not None and step >= kill_at + 6
            waiting = (kill_at is None and step >= 8) or (joined and by_relayer[2] == 0)
            await asyncio.sleep(0.5 if waiting else 0.05)
        assert kill_at is not None, "r1 delivered nothing while the stream was published"
        async with asyncio.timeout(150):
            await consumer
        # the killed relayer comes back (same node_id and data dir) to prove the epochs
        # it metered before it died (its volume is in Redis)
        await procs[1].start()
        volume = await metered(redis_url, prefix, run.names)
        await eventually(lambda: run.proved(volume), 4 * EPOCH + 60, 0.5)
    finally:
        await run.close(consumer)
    # metering per customer from every relayer's volume (the killed one's too), as billed;
    # proofs per relayer, only for partitions the group gave it in that epoch
    await run.check_histories_and_proofs(volume, redis_url, prefix, SHARDS, EPOCH)


async def test_broker_accepts_a_one_second_group_session(kafka_bootstrap: str) -> None:
    """The project's broker (scripts/services: group.min.session.timeout.ms=1000) lets a
    relayer ask for a 1 s session, so a dead member's partitions can move within ~1 s;
    a stock broker (6 s floor) refuses the join with InvalidSessionTimeout."""
    from pqcnet.relayer.bus.kafka import KafkaBus

    tag = uuid.uuid4().hex[:8]
    bus = KafkaBus(kafka_bootstrap, 2, topic=f"pqcnet-session-{tag}", rebalance=True,
                   session_timeout=1.0, client_id=f"session-{tag}")
    await bus.start()
    try:
        async def joined() -> None:
            while not bus.assignment():
                await bus.consume(0, f"session-{tag}", block=0.2)

        async with asyncio.timeout(60):
            await joined()
        assert bus.assignment() == [0, 1]
    finally:
        await bus.close()
