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
import socket
import uuid
from pathlib import Path

import pytest

from pqcnet.chaos.checker import check
from pqcnet.chaos.history import HistoryWriter, payload_for
from pqcnet.relayer.client import ClusterSubscriber, FailoverPublisher
from pqcnet.relayer.cursor import JournalCursor
from pqcnet.relayer.frame import Frame, Topic
from tests.relayer.cluster import (
    assert_owned_when_proved,
    audit_proofs,
    by_topic,
    frames_of,
    metered,
    proofs,
    read_journal,
)
from tests.relayer.e2e import identities
from tests.relayer.helpers import eventually
from tests.relayer.proc import RelayerProcess, write_config

pytestmark = pytest.mark.timeout(240)

TOPICS: list[Topic] = [("acme", f"ch{i}") for i in range(4)]
COUNT = 320  # frames per topic
BATCH = 8
EPOCH = 3.0
SHARDS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_three_relayers_kill_one_add_one(tmp_path: Path, kafka_bootstrap: str,
                                               redis_url: str) -> None:
    tag = uuid.uuid4().hex[:8]
    prefix = f"cluster:{tag}"
    common = {"backend": "kafka", "kafka_bootstrap": kafka_bootstrap,
              "kafka_topic": f"pqcnet-cluster-{tag}", "group": f"cluster-{tag}",
              "redis_url": redis_url, "redis_prefix": prefix,
              "kafka_session_timeout": 6.0, "kafka_commit_interval": 0.0,
              "epoch_seconds": EPOCH, "shards": SHARDS}
    names = ["r0", "r1", "r2"]
    ports = [_free_port() for _ in names]
    procs = []
    dirs = {n: tmp_path / n for n in names}
    for name, port in zip(names, ports):
        d = dirs[name]
        d.mkdir()
        procs.append(RelayerProcess(write_config(d, node_id=name, listen_port=port,
                                                 **common)))
    targets = [("127.0.0.1", p) for p in ports]
    hist = tmp_path / "history"
    hist.mkdir()
    cursor = JournalCursor(hist / "subscriber.jsonl")
    pub_log = HistoryWriter(hist / "publisher.jsonl")
    pub = FailoverPublisher(targets[:2], identities()[1], attempt_timeout=15.0,
                            retry_delay=0.1, give_up=120.0)
    sub = ClusterSubscriber(targets, identities()[2], "acme", cursor=cursor,
                            retry_delay=0.2)
    taken = 0
    by_relayer = [0, 0, 0]  # frames each relayer delivered: who owned partitions when

    async def consume() -> None:
        nonlocal taken
        async for batch in sub.batches():
            taken += len(batch)
            assert sub._source is not None
            by_relayer[sub.subs.index(sub._source)] += len(batch)
            if taken >= COUNT * len(TOPICS):
                await sub.ack()
                return

    await asyncio.gather(procs[0].start(), procs[1].start())
    consumer = asyncio.create_task(consume())
    acked = dict.fromkeys(TOPICS, 0)
    kill_at: int | None = None
    try:
        step = 0
        while any(v < COUNT for v in acked.values()):
            frames = [Frame(c, ch, s, payload_for(1, c, ch, s, 48))
                      for (c, ch) in TOPICS
                      for s in range(acked[(c, ch)] + 1, min(acked[(c, ch)] + BATCH, COUNT) + 1)]
            pub_log.record("publish", frames)
            results = await pub.publish(frames)
            ok = [f for f, r in zip(frames, results) if r.accepted]
            pub_log.record("ack", ok)
            for f in ok:
                acked[f.topic] = max(acked[f.topic], f.seq)
            if len(ok) < len(frames):
                await asyncio.sleep(0.2)  # retriable refusal (backpressure): same seqs again
            step += 1
            # r1 must own partitions (it delivered) before it dies; the group may give it
            # some only after a rebalance, so keep publishing until it has delivered
            if kill_at is None and step >= 8 and (by_relayer[1] > 0 or step >= 30):
                await eventually(lambda: by_relayer[1] > 0, 60)
                procs[1].kill()  # mid-stream: its partitions move after the session timeout
                kill_at = step
            if kill_at is not None and step == kill_at + 6:
                await procs[2].start()  # joins the group: takes partitions over
                pub.targets.append(targets[2])
            # after r2 joined, slow down until the group gave it partitions
            joined = kill_at is not None and step >= kill_at + 6
            await asyncio.sleep(0.3 if joined and by_relayer[2] == 0 else 0.05)
        async with asyncio.timeout(150):
            await consumer
        # the killed relayer comes back (same node_id and data dir) to prove the epochs
        # it metered before it died (its volume is in Redis)
        await procs[1].start()
        volume = await metered(redis_url, prefix, names)

        def proved() -> bool:
            return sum(p.total_frames for n in names
                       for p in proofs(dirs[n] / "data")) >= frames_of(volume)

        await eventually(proved, 4 * EPOCH + 60, 0.5)
    finally:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
        await pub.close()
        await sub.close()
        pub_log.close()
        cursor.close()
        for p in procs:
            if p.proc is not None:
                await p.stop()
    # metering per customer from every relayer's volume (the killed one's too), as billed
    metering = by_topic(volume)
    report = check(sorted(hist.glob("*.jsonl")), metering)
    assert report.ok, report.table()
    assert by_relayer[1] > 0 and by_relayer[2] > 0, by_relayer  # killed one and added one
    assert by_relayer[0] > 0, by_relayer
    assert report.total("taken") == COUNT * len(TOPICS)
    assert report.total("acked") == COUNT * len(TOPICS)
    # proofs: each relayer proved exactly what it metered; union = total, nothing twice
    cover = audit_proofs({n: dirs[n] / "data" for n in names}, volume,
                         identities()[0].key.public_key)
    assert frames_of(cover) == COUNT * len(TOPICS)
    assert {n for n, _e, _t in cover} == set(names)
    # ... and only for topics of partitions the group gave it in that epoch (the
    # ownership journal the relayers write next to the shared marks)
    events = await read_journal(redis_url, prefix)
    assert {e[1] for e in events} == set(names)
    assert_owned_when_proved(cover, events, SHARDS, EPOCH)


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
