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
import signal
import uuid
from pathlib import Path

import pytest

from pqcnet.relayer.frame import Topic, shard_for
from tests.relayer.cluster import ClusterRun, metered
from tests.relayer.helpers import eventually, metrics_reach

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
    await run.start(0, 1)
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
            await run.all_taken.wait()
        # frames accepted for another relayer's partition were confirmed in Redis before
        # their ack (decision 0020), and their owners' saves removed every marker
        await eventually(lambda: not run.agreement_left(SHARDS), 30, 0.5)
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



async def test_a_member_paused_past_its_session_bills_nothing_twice(
        tmp_path: Path, kafka_bootstrap: str, redis_url: str) -> None:
    """Decision 0025, from outside. The subscriber takes a batch from r1 and r1 is
    SIGSTOPped before the subscriber's ack for it reaches it; it stays stopped for three
    times its group session (2 s). The group gives its partitions to r0 and r2, which
    claim them with a newer generation and deliver from the last commit: the batch
    again, which the subscriber's cursor drops and acks, and they bill. When r1 resumes,
    the ack waiting in its socket makes it save marks and volume for that batch with the
    old generation: refused. Before the fence it billed the batch a second time. The
    history checker finds every frame taken once and billed exactly once (metering per
    customer equal to deliveries); every relayer's proofs cover only what it metered,
    for partitions the group gave it then; r1's log shows the refused save."""
    tag = uuid.uuid4().hex[:8]
    prefix = f"cluster:{tag}"
    session = 2.0
    # one topic per partition: every member owns topics whatever the group gives it
    topics = [("acme", next(f"ch{i}" for i in range(10_000)
                            if shard_for("acme", f"ch{i}", SHARDS) == s)) for s in range(SHARDS)]
    run = ClusterRun(tmp_path, topics, COUNT, BATCH, backend="kafka",
                     kafka_bootstrap=kafka_bootstrap, kafka_topic=f"pqcnet-stale-{tag}",
                     group=f"stale-{tag}", redis_url=redis_url, redis_prefix=prefix,
                     kafka_session_timeout=session, kafka_commit_interval=0.0,
                     epoch_seconds=EPOCH, shards=SHARDS)
    procs, by_relayer = run.procs, run.by_relayer
    await run.start(0, 1, 2)
    loop = asyncio.get_running_loop()
    paused_at: float | None = None

    async def consume() -> None:
        """``run.consume``, pausing r1 once: after a batch of it was taken, before the
        ack for it (sent when the next batch is asked for)."""
        nonlocal paused_at
        async for batch in run.sub.batches():
            run.taken += len(batch)
            assert run.sub._source is not None
            source = run.sub.subs.index(run.sub._source)
            by_relayer[source] += len(batch)
            if run.taken >= run.total:
                run.all_taken.set()
            if paused_at is None and source == 1 and all(by_relayer) \
                    and await run.has_metered("r1"):
                assert procs[1].proc is not None
                procs[1].proc.send_signal(signal.SIGSTOP)
                paused_at = loop.time()

    consumer = asyncio.create_task(consume())
    try:
        resumed = False
        while not resumed:
            if not run.done():
                await run.publish_step()
            elif paused_at is None:
                break  # never paused: failed below
            if paused_at is not None and loop.time() >= paused_at + 3 * session:
                assert procs[1].proc is not None
                procs[1].proc.send_signal(signal.SIGCONT)
                resumed = True
            # slowly until every member delivered, and once r1 is paused: the stream
            # goes on past its resumption
            await asyncio.sleep(0.3 if paused_at is not None or not all(by_relayer)
                                else 0.05)
        assert paused_at is not None, "not every relayer delivered while the stream ran"
        while not run.done():
            await run.publish_step()
            await asyncio.sleep(0.05)
        async with asyncio.timeout(150):
            await run.all_taken.wait()
        await eventually(lambda: not run.agreement_left(SHARDS), 30, 0.5)
        volume = await metered(redis_url, prefix, run.names)
        await eventually(lambda: run.proved(volume), 4 * EPOCH + 60, 0.5)
    finally:
        await run.close(consumer)
    await run.check_histories_and_proofs(volume, redis_url, prefix, SHARDS, EPOCH)
    log = (run.dirs["r1"] / "relayer.log").read_text()
    # r1's save for the batch was refused: by Redis (an old generation) or at once (its
    # consumer had already learnt it was out of the group)
    assert "lease lost" in log or "not leased here: marks not saved" in log, log[-3000:]


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


async def test_in_flight_follows_partitions_that_moved_for_good(
        tmp_path: Path, kafka_bootstrap: str) -> None:
    """The gap fence's in-flight registry across Kafka rebalances (eager: every
    partition revoked, then the new set assigned). Seq 1 of a topic on every shard is
    acknowledged into the relayer's overflow queue (the bus slow). A second member joins:
    the registrations of the partitions that went are dropped at the assign step (they
    stayed until the shard's next admission here, which may never come), those handed
    straight back stay. An admission here for a partition that went is not registered.
    The member leaves: the partitions that came back get their queued frames registered
    again, so the worker holds the gap of seq 1 while seqs 2 and 3 arrive from another
    relayer's ingress, and the subscriber gets 1, 2, 3. Before, the admission while the
    partition was away dropped seq 1's registration for good, the gap was skipped and
    seq 1 arrived too late."""
    from pqcnet.relayer.bus.kafka import KafkaBus
    from pqcnet.relayer.frame import Frame, encode, shard_for
    from tests.relayer.e2e import publisher, start_node, subscriber

    tag = uuid.uuid4().hex[:8]
    topic_name, group = f"pqcnet-fence-{tag}", f"fence-{tag}"
    node = await start_node(tmp_path, backend="kafka", kafka_bootstrap=kafka_bootstrap,
                            kafka_topic=topic_name, group=group, shards=SHARDS,
                            kafka_session_timeout=3.0, metrics_port=0, gap_timeout=0.3)
    other = KafkaBus(kafka_bootstrap, SHARDS, topic=topic_name, rebalance=True,
                     session_timeout=3.0, revoke_grace=1.0)
    sub = pub = None
    joined: asyncio.Task[None] | None = None
    try:
        await eventually(lambda: node.bus.assignment() == list(range(SHARDS)), 60)
        next(t for t in node._tasks if t.get_name() == "overflow-replay").cancel()
        sub = await subscriber(node.port, "acme")
        pub = await publisher(node.port)
        channels = {s: next(f"c{i}" for i in range(10_000)
                            if shard_for("acme", f"c{i}", SHARDS) == s) for s in range(SHARDS)}
        for shard, channel in channels.items():  # the ingress's path with the bus slow
            first = Frame("acme", channel, 1, b"queued")
            assert await node.fence.admit(shard, [(first, False)]) == [None]
            node.overflow.append(shard, [encode(first)])
        assert node.fence.inflight == SHARDS

        async def member() -> None:  # the second member reads (and so joins the group)
            while True:
                for s in other.assignment():
                    await other.consume(s, group, block=0.1)
                await other.consume(0, group, block=0.1)

        joined = asyncio.create_task(member())
        await eventually(lambda: len(node.bus.assignment()) == SHARDS // 2
                         and len(other.assignment()) == SHARDS // 2, 60)
        kept = set(node.bus.assignment())
        went = sorted(set(range(SHARDS)) - kept)
        assert node.fence.inflight == len(kept)  # the partitions that went: dropped
        x = went[0]
        topic = ("acme", channels[x])
        # an admission for a partition that went (through the ingress; queued behind 1)
        meanwhile = next(("acme", f"m{i}") for i in range(10_000)
                         if shard_for("acme", f"m{i}", SHARDS) == x)
        assert [r.accepted for r in await pub.publish([Frame(*meanwhile, 1, b"m")])] == [True]
        assert node.fence.inflight == len(kept)  # not registered: read elsewhere
        joined.cancel()
        await asyncio.gather(joined, return_exceptions=True)
        await other.close()  # leaves the group: its partitions come back
        await eventually(lambda: node.bus.assignment() == list(range(SHARDS)), 60)
        # every queued frame of the partitions that came back is registered again
        assert node.fence.inflight == SHARDS + 1
        assert node.fence.stats.restored == len(went) + 1
        # seqs 2 and 3 reach the partition from another relayer's ingress
        await node.bus.publish(x, [encode(Frame(*topic, s, b"on bus")) for s in (2, 3)])
        await asyncio.sleep(1.5)  # the worker read them; more than three gap timeouts
        assert sub.by_topic[topic] == [] and node.fence.holds(topic, 1, 2)
        assert await node.publisher.replay_once() == SHARDS + 1
        await sub.wait_for(SHARDS + 3, 60)
        assert sub.by_topic[topic] == [1, 2, 3] and sub.by_topic[meanwhile] == [1]
        assert node.metrics_port is not None
        want = {'pqcnet_relayer_gap_fence_events_total{event="late_on_bus"}': 0.0,
                "pqcnet_relayer_gap_fence_inflight_frames": 0.0,
                "pqcnet_relayer_gaps_frames_total": 0.0,
                "pqcnet_relayer_delivered_frames_total": float(SHARDS + 3)}
        await metrics_reach(node.metrics_port, want)
    finally:
        if joined is not None:
            joined.cancel()
            await asyncio.gather(joined, return_exceptions=True)
        for c in (sub, pub):
            if c is not None:
                await c.close()
        await other.close()
        await node.stop()
