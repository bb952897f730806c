"""A 3-relayer cluster on one set of Redis streams (issue 15, decision 0019): two
relayers split the shards by leases, a third one is ADDED mid-stream and takes its
share, then one is SIGKILLed and its shards (and pending entries) move after the lease
expired. The failover publisher and the cluster subscriber record histories;
pqcnet.chaos's checker finds no lost acknowledged, duplicated, out-of-order, phantom
or mis-billed frame. Counted independently with ``redis-cli``: nothing pending or
unread in any shard, and the metered frames (HVALS) equal the frames taken. Last,
each relayer's signed proofs cover exactly what it metered, only for topics of shards
it owned (the ownership journal) in that epoch, and their union is the total."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import urllib.request
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
    free_port,
    metered,
    proofs,
    read_journal,
)
from tests.relayer.e2e import identities
from tests.relayer.helpers import eventually
from tests.relayer.proc import RelayerProcess, write_config

pytestmark = pytest.mark.timeout(300)

TOPICS: list[Topic] = [("acme", f"ch{i}") for i in range(6)]
COUNT = 240  # frames per topic
BATCH = 8
SHARDS = 8
EPOCH = 3.0
LEASE = 2.0


def _cli(redis_url: str, *args: str) -> str:
    """``redis-cli`` itself: counts that do not go through pqcnet's code."""
    exe = shutil.which("redis-cli")
    assert exe, "redis-cli (installed with redis-server by scripts/services)"
    out = subprocess.run([exe, "-u", redis_url, "--no-raw", *args], check=True,
                         capture_output=True, text=True, timeout=30)
    return out.stdout


def _ints(text: str) -> list[int]:
    return [int(w.strip('"')) for line in text.splitlines()
            for w in line.split()[-1:] if w.strip('"').lstrip("-").isdigit()]


async def test_three_relayers_add_one_kill_one(tmp_path: Path, redis_url: str) -> None:
    prefix = f"rcluster:{uuid.uuid4().hex[:8]}"
    common = {"backend": "redis", "redis_url": redis_url, "redis_prefix": prefix,
              "group": "cluster", "shards": SHARDS, "redis_lease": LEASE,
              "epoch_seconds": EPOCH, "metrics_port": 0}
    names = ["r0", "r1", "r2"]
    ports = [free_port() for _ in names]
    dirs = {n: tmp_path / n for n in names}
    procs = []
    for name, port in zip(names, ports):
        dirs[name].mkdir()
        procs.append(RelayerProcess(write_config(dirs[name], node_id=name, listen_port=port,
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
    by_relayer = [0, 0, 0]  # frames each relayer delivered

    async def consume() -> None:
        nonlocal taken
        async for batch in sub.batches():
            taken += len(batch)
            assert sub._source is not None
            by_relayer[sub.subs.index(sub._source)] += len(batch)
            if taken >= COUNT * len(TOPICS):
                await sub.ack()
                return

    await procs[0].start()
    await procs[1].start()
    consumer = asyncio.create_task(consume())
    acked = dict.fromkeys(TOPICS, 0)
    added_at: int | None = None
    killed = False
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
            if added_at is None and step >= 6:
                await procs[2].start()  # ADDED mid-stream: leases give it its share
                pub.targets.append(targets[2])
                added_at = step
            # r2 must have delivered (owns shards) and r1 too before r1 is killed
            if not killed and added_at is not None and step >= added_at + 4 \
                    and by_relayer[2] > 0 and by_relayer[1] > 0:
                procs[1].kill()  # SIGKILL mid-stream: its shards move after the lease
                killed = True
            await asyncio.sleep(0.25 if added_at is not None and not killed else 0.05)
        assert killed, by_relayer
        async with asyncio.timeout(150):
            await consumer
        # the killed relayer comes back (same node_id, same data dir): it proves the
        # epochs it metered before it died, from its volume in Redis
        await procs[1].start()
        volume = await metered(redis_url, prefix, names)

        def proved() -> bool:
            proved_frames = sum(p.total_frames for n in names for p in proofs(dirs[n] / "data"))
            return proved_frames >= frames_of(volume)

        await eventually(proved, 4 * EPOCH + 30, 0.5)
        # the three live relayers' owned-shards gauges: every shard, none twice, all shares
        owned_now: list[int] = []

        async def gauges() -> bool:
            owned_now[:] = [await asyncio.to_thread(_owned_gauge, p.ready["metrics_port"])
                            for p in procs]
            return sum(owned_now) == SHARDS and min(owned_now) >= SHARDS // 3

        async with asyncio.timeout(6 * LEASE + 20):
            while not await gauges():  # noqa: ASYNC110 - polling another process
                await asyncio.sleep(0.5)
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
    # the history checker: clients' histories against what the relayers bill
    report = check(sorted(hist.glob("*.jsonl")), by_topic(volume))
    assert report.ok, report.table()
    assert report.total("taken") == report.total("acked") == COUNT * len(TOPICS)
    assert all(by_relayer), by_relayer  # every relayer delivered: added and killed one too

    # independent counts with redis-cli: every shard read and acked by the group ...
    for s in range(SHARDS):
        key = f"{prefix}:s:{s}"
        pending = _ints(_cli(redis_url, "XPENDING", key, "cluster"))
        assert pending and pending[0] == 0, (s, pending)
        groups = _cli(redis_url, "XINFO", "GROUPS", key)
        lines = groups.splitlines()
        lag = [int(lines[i + 1].split()[-1].strip('"')) for i, line in enumerate(lines)
               if line.split()[-1].strip('"') == "lag"]
        assert lag == [0], (s, groups)
    # ... and the metered frames, summed by redis-cli, are the frames taken
    metered_frames = sum(sum(_ints(_cli(redis_url, "HVALS", f"{prefix}:volf:{n}")))
                         for n in names)
    assert metered_frames == COUNT * len(TOPICS)

    # proofs: each relayer proved exactly what it metered; union = total, nothing twice
    cover = audit_proofs({n: dirs[n] / "data" for n in names}, volume,
                         identities()[0].key.public_key)
    assert frames_of(cover) == COUNT * len(TOPICS)
    assert {n for n, _e, _t in cover} == set(names)
    # ... and only for topics of shards it owned (ownership journal) in that epoch
    events = await read_journal(redis_url, prefix)
    assert {e[1] for e in events} == set(names)
    assert_owned_when_proved(cover, events, SHARDS, EPOCH)


def _owned_gauge(port: int) -> int:
    """``pqcnet_relayer_owned_shards`` from a relayer's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("pqcnet_relayer_owned_shards "):
                return int(float(line.split()[1]))
    raise AssertionError("no pqcnet_relayer_owned_shards series")
