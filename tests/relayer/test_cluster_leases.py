"""Shard leases of a Redis relayer cluster (decision 0019), against a real Redis: the
shards split between members, a clean stop hands its shards over at once, a dead
member's shards move after the lease expired with its pending entries, and a relayer
without the lease can neither save marks nor meter (fencing)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from pqcnet.relayer.bus.leases import journal
from pqcnet.relayer.bus.redis_streams import RedisStreamsBus
from pqcnet.relayer.errors import BusUnavailable
from pqcnet.relayer.frame import Frame, encode, shard_for
from pqcnet.relayer.node import RelayerNode
from pqcnet.relayer.seqstore import RocksSeqStore
from tests.relayer.e2e import close_clients, publisher, start_node, subscriber
from tests.relayer.helpers import (
    eventually,
    metrics_reach,
    redis_cli,
    redis_monitor,
    redis_pending,
    scrape_metrics,
)

pytestmark = pytest.mark.timeout(120)
SHARDS = 8
LEASE = 1.0


@pytest.fixture
async def cluster(redis_url: str) -> AsyncIterator[Callable[[str], RedisStreamsBus]]:
    prefix = f"lease:{uuid.uuid4().hex[:10]}"
    made: list[RedisStreamsBus] = []

    def make(node: str) -> RedisStreamsBus:
        bus = RedisStreamsBus(redis_url, SHARDS, prefix=prefix, consumer=node, lease=LEASE,
                              revoke_grace=1.0)
        made.append(bus)
        return bus

    yield make
    for b in made:
        await b.close()
    await _drop_keys(redis_url, prefix)


async def _drop_keys(redis_url: str, prefix: str) -> None:
    client = aioredis.from_url(redis_url)
    keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def test_shards_split_and_clean_stop_hands_over(cluster: Callable[[str], RedisStreamsBus]
                                                      ) -> None:
    a = cluster("a")
    await a.start()
    assert a.assignment() == list(range(SHARDS))  # a lone relayer owns every shard
    b = cluster("b")
    await b.start()
    await eventually(lambda: len(a.assignment()) == len(b.assignment()) == SHARDS // 2, 30)
    assert set(a.assignment()).isdisjoint(b.assignment())
    await a.close()  # clean stop: leases deleted, b takes them at its next round
    await eventually(lambda: b.assignment() == list(range(SHARDS)), 3 * LEASE + 2)
    assert b.leases is not None
    raw = await b.client.xrange(b.leases.journal_key)
    events = journal(raw)
    assert ("a", 0, "released") in events and ("b", 0, "claimed") in events


async def test_dead_relayer_shards_and_pending_entries_move(
        cluster: Callable[[str], RedisStreamsBus]) -> None:
    a = cluster("a")
    await a.start()
    frames = [Frame("acme", "c", s, b"x%d" % s) for s in range(1, 4)]
    await a.publish(0, [encode(f) for f in frames])
    got = await a.consume(0, "g", block=0.5)
    assert len(got) == 3  # read, never acked: in a's PEL when it "dies"
    in_pel = (await a.client.xpending(a.key(0), "g"))["pending"]
    assert in_pel >= 1 and a.taken_over == 0
    assert a.leases is not None
    assert a.leases._task is not None
    a.leases._task.cancel()  # dead: no renewals, no release
    b = cluster("b")
    await b.start()
    assert 0 not in b.assignment()  # a's lease still runs
    await eventually(lambda: 0 in b.assignment(), 4 * LEASE + 3)
    with pytest.raises(BusUnavailable):  # newly claimed: the worker resets first
        await b.consume(0, "g", block=0.2)
    again = await b.consume(0, "g", block=0.2)  # a's pending entries, taken at once
    assert [d.data for d in again] == [d.data for d in got]
    assert b.taken_over == in_pel  # every entry of the dead member's PEL, counted once
    await b.ack(0, "g", again)
    assert (await b.client.xpending(b.key(0), "g"))["pending"] == 0


async def test_entries_read_after_the_lease_ran_out_are_taken_by_the_owner(
        cluster: Callable[[str], RedisStreamsBus]) -> None:
    """The race behind a CI failure: a relayer's XREADGROUP lands after the new owner's
    one-time claim (its lease expired on the way), so the entries sit in the loser's
    PEL, unacked for good, and the owner never reads them (they are past the group's
    last-delivered id). The owner's sweep takes them after two leases."""
    b = cluster("b")
    await b.start()
    assert b.assignment() == list(range(SHARDS))
    assert await b.consume(0, "g", block=0.1) == []  # claimed: nothing pending yet
    frames = [Frame("acme", "c", s, b"late%d" % s) for s in range(1, 4)]
    await b.publish(0, [encode(f) for f in frames])
    # the former owner "a", whose lease is gone, reads them now: the late XREADGROUP
    late = await b.client.xreadgroup("g", "a", {b.key(0): ">"}, count=10)
    assert len(late[0][1]) == 1  # one packed entry, now in a's PEL
    mine = await b.consume(0, "g", block=0.1)
    assert mine == []  # past the last-delivered id: b's own reads never see them
    async with asyncio.timeout(6 * LEASE + 5):
        while not (got := await b.consume(0, "g", block=0.1)):  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    assert [d.data for d in got] == [encode(f) for f in frames]
    assert b.stale_claimed == 1
    await b.ack(0, "g", got)
    pending = await b.client.xpending(b.key(0), "g")
    assert pending["pending"] == 0, pending
    # b's own entries in flight are never swept away from it
    await b.publish(0, [encode(Frame("acme", "c", 9, b"mine"))])
    held = await b.consume(0, "g", block=0.1)
    assert len(held) == 1
    await asyncio.sleep(3 * LEASE)
    assert await b.consume(0, "g", block=0.1) == [] and b.stale_claimed == 1
    await b.ack(0, "g", held)


async def test_writes_are_fenced_by_the_lease(cluster: Callable[[str], RedisStreamsBus]) -> None:
    a = cluster("a")
    await a.start()
    store_a = a.seq_store()
    topic = ("acme", "c")
    vol = {(7, "acme", "c", 1): [10, 1]}
    for s in range(SHARDS):  # a owns every shard now: its writes go through
        await store_a.save(s, {topic: 5}, vol)
    b = cluster("b")
    await b.start()
    await eventually(lambda: len(b.assignment()) == SHARDS // 2, 30)
    shard = b.assignment()[0]
    # a relayer without the lease of the shard: refused before Redis is asked ...
    with pytest.raises(BusUnavailable, match="not leased"):
        await store_a.save(shard, {topic: 99}, vol)
    # ... and one that still believes it holds it (paused, partitioned): Redis refuses
    assert a.leases is not None
    a.leases.owned.add(shard)
    with pytest.raises(BusUnavailable, match="lease lost"):
        await store_a.save(shard, {topic: 99}, vol, gaps={topic: [(5, 99)]})
    a.leases.owned.discard(shard)
    assert await b.seq_store().load_topics(shard, [topic]) == {topic: 5}
    assert await b.seq_store().load_gaps(shard, [topic]) == {}  # nor its skipped gap
    assert await store_a.load_volume() == {(7, "acme", "c", 1): [10 * SHARDS, SHARDS]}
    # the owner's write goes through, with the gap it skipped in the same script
    await b.seq_store().save(shard, {topic: 9}, vol, gaps={topic: [(5, 9)]})
    assert await b.seq_store().load_topics(shard, [topic]) == {topic: 9}
    assert await store_a.load_gaps(shard, [topic]) == {topic: [(5, 9)]}


async def test_the_ack_rides_in_the_fenced_marks_write(
        cluster: Callable[[str], RedisStreamsBus], redis_url: str, tmp_path: Path) -> None:
    """On Redis a batch's ``XACK`` is made by the marks script, after the marks: one
    round trip, and fenced by the same lease check. Seen from outside: ``redis-cli
    MONITOR`` shows the owner's ``XACK`` coming from the script (``lua``), never from a
    client, and ``XPENDING`` empties; a former owner that still believes it holds the
    shard gets "lease lost" and its entries stay pending (the new owner takes them)."""
    a = cluster("a")
    await a.start()
    store_a = a.seq_store()
    topic = ("acme", "c")
    for s in range(SHARDS):
        await a.publish(s, [encode(Frame("acme", "c", 1, b"x%d" % s))])
    got = {s: await a.consume(s, "g", block=0.1) for s in range(SHARDS)}
    assert all(len(d) == 1 for d in got.values()), got
    rocks = RocksSeqStore(tmp_path / "marks")  # a store elsewhere cannot carry the ack
    assert a.ack_in_store(0, "g", got[0], rocks) is None
    rocks.close()
    async with redis_monitor(redis_url) as out:
        b = cluster("b")
        await b.start()
        await eventually(lambda: len(b.assignment()) == SHARDS // 2, 30)
        lost, kept = b.assignment()[0], a.assignment()[0]
        assert a.leases is not None
        a.leases.owned.add(lost)  # paused past its lease: still believes it owns it
        fold = a.ack_in_store(lost, "g", got[lost], store_a)
        assert fold is not None and len(fold.ids) == 1
        with pytest.raises(BusUnavailable, match="lease lost"):
            await store_a.save(lost, {topic: 2}, ack=fold)
        a.leases.owned.discard(lost)
        assert redis_pending(redis_url, a.key(lost), "g", "a") == 1  # not acknowledged
        fold = a.ack_in_store(kept, "g", got[kept], store_a)
        assert fold is not None
        await store_a.save(kept, {topic: 2}, ack=fold)
        await a.acked(kept, fold)
        assert redis_pending(redis_url, a.key(kept), "g") == 0
    xacks = [line for line in out if '"XACK"' in line.upper() and f'"{a.prefix}:' in line]
    assert len(xacks) == 1 and "lua]" in xacks[0], xacks
    assert f'"{a.key(kept)}"' in xacks[0] and fold.ids[0] in xacks[0], xacks
    assert await b.seq_store().load_topics(kept, [topic]) == {topic: 2}
    assert await b.seq_store().load_topics(lost, [topic]) == {}


async def test_a_relayer_acks_its_batches_in_the_marks_script(
        tmp_path: Path, redis_url: str) -> None:
    """The worker's side of the same: a relayer on Redis delivers 40 frames and every
    ``XACK`` of its streams that ``redis-cli MONITOR`` sees comes from its marks script;
    nothing stays pending and the marks are where the acks say."""
    prefix = f"lease:{uuid.uuid4().hex[:10]}"
    async with redis_monitor(redis_url) as out:
        await _deliver_forty(tmp_path, redis_url, prefix)
    xacks = [line for line in out if '"XACK"' in line.upper() and f'"{prefix}:' in line]
    assert xacks and all("lua]" in line for line in xacks), xacks


async def _deliver_forty(tmp_path: Path, redis_url: str, prefix: str) -> None:
    node = await start_node(tmp_path, backend="redis", redis_url=redis_url, shards=SHARDS,
                            redis_prefix=prefix, redis_lease=LEASE)
    sub = pub = None
    try:
        await eventually(lambda: node.bus.assignment() == list(range(SHARDS)), 30)
        sub = await subscriber(node.port, "acme")
        pub = await publisher(node.port)
        for i in range(4):
            await pub.publish([Frame("acme", f"c{i}", s, b"%d" % s) for s in range(1, 11)])
        await sub.wait_for(40, limit=30)
        bus = node.bus
        assert isinstance(bus, RedisStreamsBus)
        for shard in range(SHARDS):
            await eventually(
                lambda s=shard: redis_pending(redis_url, bus.key(s), node.cfg.group) == 0, 30)
    finally:
        await close_clients(pub, sub)
        await node.stop()
        await _drop_keys(redis_url, prefix)


async def test_concurrent_claims_never_share_a_shard(
        cluster: Callable[[str], RedisStreamsBus]) -> None:
    buses = [cluster(f"n{i}") for i in range(3)]
    await asyncio.gather(*(b.start() for b in buses))

    def balanced() -> bool:
        sets = [set(b.assignment()) for b in buses]
        return sum(map(len, sets)) == SHARDS and all(len(s) >= 2 for s in sets)

    await eventually(balanced, 30)
    sets = [set(b.assignment()) for b in buses]
    for i in range(3):
        for j in range(i + 1, 3):
            assert sets[i].isdisjoint(sets[j])


async def test_a_relayer_delivers_and_counts_entries_a_stalled_member_read(
        tmp_path: Path, redis_url: str) -> None:
    """The sweep seen from outside a running relayer: a stalled former owner ("ghost")
    reads three frames after the shard moved here — the XADD and its XREADGROUP in one
    MULTI, so the relayer's own blocked read cannot win the race. The subscriber gets
    them anyway, the metric counts the one entry, and nothing stays pending."""
    prefix = f"lease:{uuid.uuid4().hex[:10]}"
    node = await start_node(tmp_path, backend="redis", redis_url=redis_url, shards=SHARDS,
                            redis_prefix=prefix, redis_lease=LEASE, metrics_port=0)
    sub = None
    try:
        await eventually(lambda: node.bus.assignment() == list(range(SHARDS)), 30)
        sub = await subscriber(node.port, "acme")
        bus = node.bus
        assert isinstance(bus, RedisStreamsBus)
        shard = shard_for("acme", "late", SHARDS)
        # the shard's worker is at work first (one frame through it): a ghost that reads
        # before the worker's first read would have its entry taken over at that read
        # (XAUTOCLAIM of a shard just claimed), which is not the sweep this test is about
        warm = next(c for c in (f"warm{i}" for i in range(10_000))
                    if shard_for("acme", c, SHARDS) == shard)
        await bus.publish(shard, [encode(Frame("acme", warm, 1, b"w"))])
        await sub.wait_for(1, limit=30)
        frames = [encode(Frame("acme", "late", s, b"read-by-the-ghost")) for s in (1, 2, 3)]
        pipe = bus.client.pipeline(transaction=True)
        bus._add(pipe, shard, frames)
        pipe.xreadgroup(node.cfg.group, "ghost", {bus.key(shard): ">"}, count=10)
        _, ghost = await pipe.execute()
        assert len(ghost[0][1]) == 1, ghost  # in the ghost's PEL, past the last-delivered id
        await sub.wait_for(4, limit=10 * LEASE + 20)
        assert [(f.channel, f.seq) for f in sub.frames] == [(warm, 1), ("late", 1),
                                                           ("late", 2), ("late", 3)]
        assert node.metrics_port is not None
        scraped = await asyncio.to_thread(scrape_metrics, node.metrics_port)
        assert scraped["pqcnet_relayer_stale_claimed_entries_total"] == 1.0
        # the sweep, not a takeover at a claim: the warm-up frame made sure of it
        assert scraped["pqcnet_relayer_taken_over_entries_total"] == 0.0
        await eventually(
            lambda: redis_pending(redis_url, bus.key(shard), node.cfg.group) == 0, 30)
    finally:
        if sub is not None:
            await sub.close()
        await node.stop()
        await _drop_keys(redis_url, prefix)


async def _node_and_member(tmp_path: Path, redis_url: str, **node_kw: Any
                           ) -> tuple[str, RelayerNode, RedisStreamsBus]:
    """A relayer on a fresh prefix (it will own every shard) and a second member "b"
    of its cluster, not started yet."""
    prefix = f"lease:{uuid.uuid4().hex[:10]}"
    node = await start_node(tmp_path, backend="redis", redis_url=redis_url, shards=SHARDS,
                            redis_prefix=prefix, redis_lease=LEASE, metrics_port=0,
                            **node_kw)
    other = RedisStreamsBus(redis_url, SHARDS, prefix=prefix, consumer="b", lease=LEASE,
                            revoke_grace=1.0)
    return prefix, node, other


async def test_in_flight_of_shards_handed_over_is_dropped_at_once(
        tmp_path: Path, redis_url: str) -> None:
    """Frames registered in flight for a shard (acknowledged, not yet read by this
    relayer's worker: still in its overflow queue) are never read here once the shard
    moved to another member. The gauge dropped them only at the shard's next admission
    here — which, with the shard gone, may never come: a stuck gauge and a held gap.
    Now the hand-over itself drops them, seen on ``/metrics``."""
    prefix, node, other = await _node_and_member(tmp_path, redis_url)
    try:
        await eventually(lambda: node.bus.assignment() == list(range(SHARDS)), 30)
        assert node.metrics_port is not None
        for shard in range(SHARDS):  # what the ingress registers before it publishes
            frame = Frame("acme", _channel_of(shard), 1, b"q")
            assert await node.fence.admit(shard, [(frame, False)]) == [None]
        gauge = "pqcnet_relayer_gap_fence_inflight_frames"
        assert (await asyncio.to_thread(scrape_metrics, node.metrics_port))[gauge] == SHARDS
        await other.start()  # a second member: half of the shards move to it
        await eventually(lambda: len(other.assignment()) == SHARDS // 2, 30)
        kept = len(node.bus.assignment())
        assert kept == SHARDS // 2
        scraped = await asyncio.to_thread(scrape_metrics, node.metrics_port)
        assert scraped[gauge] == kept  # no admission happened since the hand-over
        assert node.fence.holds(("acme", _channel_of(node.bus.assignment()[0])), 1, 2)
    finally:
        await other.close()
        await node.stop()
        await _drop_keys(redis_url, prefix)


async def test_a_regained_shard_holds_the_gap_of_its_queued_frames(
        tmp_path: Path, redis_url: str) -> None:
    """A Redis outage both queues acknowledged frames in the overflow queue and lets
    leases lapse. Seq 1 of a topic was acknowledged into this relayer's overflow queue
    (the bus slow), the shard's lease went to another member and came back, and seqs
    2 and 3 reached the stream meanwhile. The loss dropped seq 1's in-flight
    registration; the regain registers it again from the queue, so the worker holds the
    gap until the replay brings it and the subscriber gets 1, 2, 3. Before, the gap was
    skipped after ``gap_timeout`` and the acknowledged frame was dropped as late."""
    prefix, node, other = await _node_and_member(tmp_path, redis_url, gap_timeout=0.3)
    sub = None
    try:
        await eventually(lambda: node.bus.assignment() == list(range(SHARDS)), 30)
        replay = next(t for t in node._tasks if t.get_name() == "overflow-replay")
        replay.cancel()  # the bus stays "slow": the test replays the queue itself
        sub = await subscriber(node.port, "acme")
        await other.start()  # half of the shards move to it
        await eventually(lambda: len(other.assignment()) == SHARDS // 2, 30)
        shard = other.assignment()[0]
        topic = ("acme", _channel_of(shard))
        first = Frame(*topic, 1, b"queued")
        # the ingress's path for a frame the bus did not take in time: admitted, queued
        assert await node.fence.admit(shard, [(first, False)]) == [None]
        node.overflow.append(shard, [encode(first)])
        assert node.fence.inflight == 0  # not owned here: nothing registered
        await other.publish(shard, [encode(Frame(*topic, s, b"on bus")) for s in (2, 3)])
        await other.close()  # a clean stop: its shards come back
        await eventually(lambda: node.bus.assignment() == list(range(SHARDS)), 30)
        assert node.fence.inflight == 1 and node.fence.holds(topic, 1, 2)
        await asyncio.sleep(1.0)  # more than three gap timeouts: the gap is held
        assert sub.by_topic[topic] == []
        assert await node.publisher.replay_once() == 1
        await sub.wait_for(3, 30)
        assert sub.by_topic[topic] == [1, 2, 3]
        assert node.metrics_port is not None
        want = {'pqcnet_relayer_gap_fence_events_total{event="restored"}': 1.0,
                'pqcnet_relayer_gap_fence_events_total{event="late_on_bus"}': 0.0,
                "pqcnet_relayer_gap_fence_inflight_frames": 0.0,
                "pqcnet_relayer_gaps_frames_total": 0.0,
                "pqcnet_relayer_delivered_frames_total": 3.0}
        port = node.metrics_port
        await metrics_reach(port, want)
        # every entry of the shard acked in the group, as redis-cli sees it
        await eventually(lambda: redis_pending(redis_url, node.bus.key(shard), node.cfg.group) == 0,
                         30)
    finally:
        if sub is not None:
            await sub.close()
        await other.close()
        await node.stop()
        await _drop_keys(redis_url, prefix)


async def test_a_lease_renewed_late_keeps_the_gap_of_its_acknowledged_frames(
        tmp_path: Path, redis_url: str) -> None:
    """The validity a lease round grants (0.9 lease) ran out before the next round
    finished — a stalled event loop or a slow Redis — and that round then renewed the
    lease: it never lapsed in Redis, and no loss was reported. For that moment the
    worker takes no records (right: the lease might be gone), but admissions went on.
    Before, the first of them dropped the shard's in-flight registrations and none was
    registered: seq 1 of a topic, acknowledged and still in the overflow queue, lost its
    registration, so once the round renewed the lease the worker skipped its gap (seqs
    2 and 3 were on the stream, from another relayer's ingress) and the replay brought
    it too late. Now the subscriber gets 1, 2, 3 and nothing is late."""
    prefix = f"lease:{uuid.uuid4().hex[:10]}"
    lease = 20.0  # the test drives the rounds itself; nothing expires in Redis meanwhile
    node = await start_node(tmp_path, backend="redis", redis_url=redis_url, shards=SHARDS,
                            redis_prefix=prefix, redis_lease=lease, metrics_port=0,
                            gap_timeout=0.3)
    sub = pub = None
    try:
        await eventually(lambda: node.bus.assignment() == list(range(SHARDS)), 30)
        leases = node.bus.leases
        assert leases is not None and leases._task is not None
        for task in (leases._task, next(t for t in node._tasks
                                        if t.get_name() == "overflow-replay")):
            task.cancel()  # the test runs the lease rounds and the replay itself
        sub = await subscriber(node.port, "acme")
        pub = await publisher(node.port)
        shard = 3
        topic, other = (("acme", c) for c in _channels_of(shard, 2))
        first = Frame(*topic, 1, b"queued")
        # the ingress's path for a frame the bus did not take in time: admitted, queued
        assert await node.fence.admit(shard, [(first, False)]) == [None]
        node.overflow.append(shard, [encode(first)])
        assert node.fence.inflight == 1
        leases._valid_until = time.monotonic()  # the clock passed it; the round is late
        assert not node.bus.owns(shard) and shard in node.bus.assignment()
        # an admission of the shard meanwhile, through the real ingress (queued behind 1)
        results = await pub.publish([Frame(*other, 1, b"meanwhile")])
        assert [r.accepted for r in results] == [True]
        assert node.fence.inflight == 2  # seq 1 kept, the new one registered
        # seqs 2 and 3 reach the stream from another relayer's ingress
        await node.bus.publish(shard, [encode(Frame(*topic, s, b"on bus")) for s in (2, 3)])
        await leases.round()  # the late round: a real renewal in Redis, no loss
        assert node.bus.owns(shard) and leases.owned == set(range(SHARDS))
        await asyncio.sleep(1.0)  # more than three gap timeouts: the gap of 1 is held
        assert sub.by_topic[topic] == []
        assert node.fence.holds(topic, 1, 2)
        assert await node.publisher.replay_once() == 2
        await sub.wait_for(4, 30)
        assert sub.by_topic[topic] == [1, 2, 3] and sub.by_topic[other] == [1]
        assert node.metrics_port is not None
        want = {'pqcnet_relayer_gap_fence_events_total{event="late_on_bus"}': 0.0,
                "pqcnet_relayer_gap_fence_inflight_frames": 0.0,
                "pqcnet_relayer_gaps_frames_total": 0.0,
                "pqcnet_relayer_delivered_frames_total": 4.0}
        port = node.metrics_port
        await metrics_reach(port, want)
        # no loss was journaled: the lease never lapsed in Redis (read with redis-cli)
        owners = redis_cli(redis_url, "XRANGE", leases.journal_key, "-", "+")
        assert "lost" not in owners and "claimed" in owners
        await eventually(lambda: redis_pending(redis_url, node.bus.key(shard), node.cfg.group) == 0,
                         30)
    finally:
        for c in (sub, pub):
            if c is not None:
                await c.close()
        await node.stop()
        await _drop_keys(redis_url, prefix)


def _channel_of(shard: int) -> str:
    """A channel of customer ``acme`` whose topic maps to ``shard``."""
    return _channels_of(shard, 1)[0]


def _channels_of(shard: int, n: int) -> list[str]:
    """``n`` channels of customer ``acme`` whose topics map to ``shard``."""
    found = (f"c{i}" for i in range(10_000) if shard_for("acme", f"c{i}", SHARDS) == shard)
    return [next(found) for _ in range(n)]


@pytest.mark.parametrize("fenced", [True, False], ids=["fenced", "control"])
async def test_a_former_owner_paused_past_its_lease_reads_nothing(
        cluster: Callable[[str], RedisStreamsBus], redis_url: str, fenced: bool) -> None:
    """Decision 0024. Relayer "a" pauses between its lease check and its read for much
    longer than its lease: "b" claims the shard, takes it over and counts as caught up
    (three leases later). Then a's read lands. Fenced, Redis refuses it: nothing lands
    in a's pending list, a drops the shard at once, and b reads the entry itself — and
    a paused a cannot take b's in-flight entries either (``XAUTOCLAIM`` under the same
    fence). The control (a's read let through the fence, i.e. unfenced as before) puts
    the acknowledged entry in a's pending list, past the group's cursor, while b
    believes it is caught up: a gap b skips now loses that frame. Pending entries
    counted from outside with ``redis-cli XPENDING``."""
    a = cluster("a")
    await a.start()
    assert a.leases is not None and a.leases._task is not None
    assert await a.consume(0, "g", block=0.1) == []  # a reads shard 0: drained
    a.leases._task.cancel()  # paused: no renewals; it still believes it holds its shards
    a.leases._valid_until = float("inf")
    b = cluster("b")
    await b.start()
    await eventually(lambda: 0 in b.assignment(), 10 * LEASE + 5)
    async with asyncio.timeout(6 * LEASE + 5):  # b reads; the settle time after its claim
        while (0, "g") not in b._claimed or not b.caught_up(0, "g"):
            with contextlib.suppress(BusUnavailable):  # a claim resets the worker first
                assert await b.consume(0, "g", block=0.1) == []
    assert b.leases is not None
    if not fenced:
        b_value = b.leases.value
        a.leases.fence = lambda s: (a.leases.key(s), b_value)  # type: ignore[union-attr,method-assign]
    frame = encode(Frame("acme", "c", 1, b"acknowledged while a was paused"))
    await b.publish(0, [frame])
    key = b.key(0)
    if fenced:
        with pytest.raises(BusUnavailable, match="changed owner"):
            await a.consume(0, "g", block=0.1)
        assert a.fenced_out == 1 and 0 not in a.assignment()
        assert redis_pending(redis_url, key, "g", "a") == 0
        got = await b.consume(0, "g", block=0.1)
        assert [d.data for d in got] == [frame]
        # a, still believing it owns the shard, tries to take b's in-flight entry
        a.leases.owned.add(0)
        with pytest.raises(BusUnavailable, match="changed owner"):
            await a._take_pending(0, "g")
        assert a.fenced_out == 2
        assert redis_pending(redis_url, key, "g", "a") == 0
        assert redis_pending(redis_url, key, "g", "b") == 1
        await b.ack(0, "g", got)
    else:
        stolen = await a.consume(0, "g", block=0.1)
        assert [d.data for d in stolen] == [frame] and a.fenced_out == 0
        assert redis_pending(redis_url, key, "g", "a") == 1
        assert await b.consume(0, "g", block=0.1) == [] and b.caught_up(0, "g")
    assert redis_pending(redis_url, key, "g") == (0 if fenced else 1)


async def test_a_lease_lost_during_the_wait_refuses_the_read_it_wakes(
        cluster: Callable[[str], RedisStreamsBus], redis_url: str) -> None:
    """Decision 0024. A drained shard's read waits in ``XREAD BLOCK`` with its fenced
    read pipelined behind it, on one connection. The lease changes hands while it
    waits (rewritten with ``redis-cli``, as another member's claim after ours ran out);
    the entry published then wakes the wait, and Redis runs the fenced read at once —
    refused: the consume raises, the refusal is counted, the shard is dropped, nothing
    sits in a's pending list and the group's cursor has not moved past the entry
    (``redis-cli XPENDING`` / ``XINFO GROUPS``), so the new owner reads it."""
    a = cluster("a")
    await a.start()
    assert a.leases is not None and a.leases._task is not None
    a.leases._task.cancel()  # no rounds: it goes on believing it holds its shards
    a.leases._valid_until = float("inf")
    assert await a.consume(0, "g", block=0.1) == []  # drained: the next read waits
    waiting = asyncio.create_task(a.consume(0, "g", block=30.0))

    def blocked() -> bool:
        clients = redis_cli(redis_url, "CLIENT", "LIST").splitlines()
        return any(" cmd=xread " in c and " flags=b " in c for c in clients)

    await eventually(blocked, 10)
    redis_cli(redis_url, "SET", a.leases.key(0), "0123456789abcdef:b")
    key = a.key(0)
    await a.publish(0, [encode(Frame("acme", "c", 1, b"published while a waited"))])
    with pytest.raises(BusUnavailable, match="changed owner"):
        await asyncio.wait_for(waiting, 10)
    assert a.fenced_out == 1 and 0 not in a.assignment()
    assert redis_pending(redis_url, key, "g") == 0
    lag = re.search(r'"lag"\n\s*\d+\) \(integer\) (\d+)',
                    redis_cli(redis_url, "XINFO", "GROUPS", key))
    assert lag is not None and lag[1] == "1"  # the group has not been handed it


async def test_a_paused_relayer_reads_nothing_once_its_leases_are_gone(
        tmp_path: Path, redis_url: str) -> None:
    """A running relayer stops renewing its leases but still believes it holds every
    shard (paused: its lease loop never runs again), and another member takes the
    shards over. A frame published to each shard then wakes the paused relayer's
    workers, whose reads Redis refuses (decision 0024): counted on its ``/metrics``,
    once per shard, its shards dropped, nothing in its pending lists (``redis-cli
    XPENDING``) — the new owner reads every frame."""
    prefix, node, other = await _node_and_member(tmp_path, redis_url)
    try:
        bus = node.bus
        assert isinstance(bus, RedisStreamsBus) and bus.leases is not None
        await eventually(lambda: bus.assignment() == list(range(SHARDS)), 30)
        assert bus.leases._task is not None
        bus.leases._task.cancel()
        bus.leases._valid_until = float("inf")
        await other.start()
        await eventually(lambda: other.assignment() == list(range(SHARDS)), 10 * LEASE + 10)
        assert bus.assignment() == list(range(SHARDS))  # it still believes
        frames = {s: encode(Frame("acme", _channel_of(s), 1, b"while paused"))
                  for s in range(SHARDS)}
        for s, f in frames.items():
            await other.publish(s, [f])
        assert node.metrics_port is not None
        name = "pqcnet_relayer_fenced_reads_total"

        def refused() -> float:
            return scrape_metrics(node.metrics_port)[name]  # type: ignore[arg-type]

        async with asyncio.timeout(30):
            while await asyncio.to_thread(refused) < SHARDS:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        assert bus.assignment() == [] and bus.fenced_out == SHARDS
        got: dict[int, list[bytes]] = {}
        async with asyncio.timeout(30):
            for s in range(SHARDS):
                while s not in got:
                    with contextlib.suppress(BusUnavailable):  # a claim resets first
                        if ds := await other.consume(s, node.cfg.group, block=0.1):
                            got[s] = [d.data for d in ds]
                            await other.ack(s, node.cfg.group, ds)
        assert got == {s: [f] for s, f in frames.items()}
        for s in range(SHARDS):
            key = other.key(s)
            assert redis_pending(redis_url, key, node.cfg.group, node.cfg.node_id) == 0
            assert redis_pending(redis_url, key, node.cfg.group) == 0
        assert await asyncio.to_thread(refused) == SHARDS  # once per shard, then dropped
    finally:
        await other.close()
        await node.stop()
        await _drop_keys(redis_url, prefix)
