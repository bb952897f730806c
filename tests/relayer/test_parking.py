"""A topic nobody subscribes to does not hold its shard: it is parked.

Shards are shared by many customers' topics. A topic with no subscriber used to hold
its shard's worker in ``deliver()`` until one subscribed — so a tenant publishing to a
channel it never reads (or whose application was down) stopped every other customer
on that shard. Now the worker passes over that topic's frames, keeps delivering the
others, acknowledges the bus only up to the parked topic's first record, and replays
from there when a subscriber comes (decision 0021). Histories are read at real
subscribers; the bus is read with ``redis-cli``; the counters over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path
from typing import Any

import pytest

from pqcnet.relayer.bus.kafka import KafkaBus
from pqcnet.relayer.client import SubscriberClient
from pqcnet.relayer.cursor import MemoryCursor
from pqcnet.relayer.errors import BusError, BusUnavailable
from pqcnet.relayer.frame import Frame, decode, encode, shard_for
from pqcnet.relayer.node import RelayerNode
from pqcnet.relayer.worker import RelayerShardWorker
from tests.relayer.conftest import BusFactory
from tests.relayer.e2e import (
    Collector,
    close_clients,
    identities,
    publisher,
    start_node,
    subscriber,
)
from tests.relayer.helpers import (
    CollectSink,
    eventually,
    metrics_reach,
    one_shard_worker,
    redis_pending,
    same_shard,
    scrape_metrics,
)
from tests.relayer.proc import RelayerProcess, write_config

pytestmark = pytest.mark.timeout(180)
SHARDS = 8


def _two_customers() -> tuple[tuple[str, str], tuple[str, str]]:
    """acme's and globex's topics, on one shard."""
    a, g = same_shard(SHARDS)
    return ("acme", a), ("globex", g)


def _metrics_port(node: RelayerNode) -> int:
    port = node.metrics_port
    assert port, "started with metrics_port=0"
    return port


def _volume(metrics: dict[str, float], customer: str) -> float:
    return sum(v for k, v in metrics.items()
               if k.startswith("pqcnet_relayer_volume_frames_total{")
               and f'customer="{customer}"' in k)


async def _billed(port: int, want: dict[str, float]) -> None:
    """Wait until each customer in ``want`` is metered that many frames: a batch is
    metered once its marks' write returns, after the subscriber already has it."""
    def now() -> dict[str, float]:
        m = scrape_metrics(port)
        return {c: _volume(m, c) for c in want}

    await eventually(lambda: now() == want, 15)


@pytest.mark.parametrize("backend", ["embedded", "redis"])
async def test_a_topic_nobody_reads_does_not_hold_other_customers(
        tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    kw: dict[str, Any] = {}
    if backend == "redis":
        url = request.getfixturevalue("redis_url")
        prefix = f"park-{uuid.uuid4().hex[:8]}"
        kw = {"backend": "redis", "redis_url": url, "redis_prefix": prefix}
    node = await start_node(tmp_path, shards=SHARDS, metrics_port=0,
                            backpressure_interval=0.1, **kw)
    acme, globex = _two_customers()
    shard = shard_for(*acme, SHARDS)
    port = _metrics_port(node)
    pub = other = late = None
    try:
        other = await subscriber(node.port, "globex")
        pub = await publisher(node.port)
        await asyncio.sleep(0.3)  # subscribed
        n = 20
        for seq in range(1, n + 1):  # one request per seq: acme's frame comes first
            results = await pub.publish([Frame(*acme, seq, b"a" * 32),
                                         Frame(*globex, seq, b"g" * 16)])
            assert all(r.accepted for r in results), results
        # without parking the worker waits in deliver() for an acme subscriber and
        # globex gets at most the frames of the first batch
        await other.wait_for(n, 30)
        assert other.by_topic[globex] == list(range(1, n + 1))
        await metrics_reach(port, {"pqcnet_relayer_parked_topics": 1.0,
                                   "pqcnet_relayer_held_frames": 0.0,
                                   "pqcnet_relayer_park_replays_total": 0.0,
                                   "pqcnet_relayer_park_overflows_total": 0.0,
                                   "pqcnet_relayer_paused_shards": 0.0,
                                   f'pqcnet_relayer_shard_backlog_records{{shard="{shard}"}}': 0.0})
        await _billed(port, {"globex": n, "acme": 0})  # nothing parked billed
        m = scrape_metrics(port)
        # every record from acme's first one on is consumed and kept on the bus
        assert m["pqcnet_relayer_records_behind_park"] >= 2 * n - 1
        assert m["pqcnet_relayer_parked_frames_total"] == n
        if backend == "redis":
            pending = redis_pending(url, f"{prefix}:s:{shard}", "relayer")
            assert pending >= 1, pending  # the bus still holds them, unacknowledged

        interrupted: list[int] = []  # a spy: the real interrupt still runs
        real_interrupt = node.bus.interrupt

        def spy(s: int) -> None:
            interrupted.append(s)
            real_interrupt(s)

        node.bus.interrupt = spy  # type: ignore[method-assign]
        late = await subscriber(node.port, "acme")
        await late.wait_for(n, 30)
        assert late.by_topic[acme] == list(range(1, n + 1))  # in order, once, all
        # the join woke the parked shard's consume wait (on Redis: CLIENT UNBLOCK)
        assert interrupted == [shard]
        await metrics_reach(port, {"pqcnet_relayer_parked_topics": 0.0,
                                   "pqcnet_relayer_records_behind_park": 0.0,
                                   "pqcnet_relayer_park_replays_total": 1.0})
        await _billed(port, {"acme": n, "globex": n})  # each billed once
        m = scrape_metrics(port)
        # the replay re-read globex's frames: the marks suppressed them
        assert m["pqcnet_relayer_duplicates_frames_total"] >= n
        assert m["pqcnet_relayer_delivered_frames_total"] == 2 * n
        if backend == "redis":
            await eventually(lambda: redis_pending(url, f"{prefix}:s:{shard}",
                                               "relayer") == 0, 20)
        # both topics flow on, parking nothing
        results = await pub.publish([Frame(*acme, n + 1, b"a"), Frame(*globex, n + 1, b"g")])
        assert all(r.accepted for r in results)
        await late.wait_for(n + 1, 30)
        await other.wait_for(n + 1, 30)
        assert late.by_topic[acme] == list(range(1, n + 2))
        assert other.by_topic[globex] == list(range(1, n + 2))
        assert scrape_metrics(port)["pqcnet_relayer_parked_frames_total"] == n
    finally:
        await close_clients(late, other, pub)
        await node.stop()


async def test_the_parking_bound_makes_the_shard_hold(tmp_path: Path) -> None:
    """Past ``park_max_records`` the bus cannot keep more behind the parked topic: the
    shard holds as it did before parking, and its backlog pauses its publishers; the
    parked topic's subscriber releases everything, in order, once."""
    node = await start_node(tmp_path, shards=SHARDS, metrics_port=0, park_max_records=30,
                            backpressure_interval=0.1, high_water=40, low_water=5)
    acme, globex = _two_customers()
    port = _metrics_port(node)
    pub = other = late = None
    try:
        other = await subscriber(node.port, "globex")
        pub = await publisher(node.port)
        await asyncio.sleep(0.3)
        results = await pub.publish([Frame(*acme, s, b"a") for s in range(1, 6)])
        assert all(r.accepted for r in results)
        n = 60
        for first in range(1, n + 1, 10):
            results = await pub.publish([Frame(*globex, s, b"g") for s in range(first, first + 10)])
            assert all(r.accepted for r in results)
        await metrics_reach(port, {"pqcnet_relayer_park_overflows_total": 1.0,
                                   "pqcnet_relayer_parked_topics": 0.0,
                                   "pqcnet_relayer_held_frames": 5.0}, 30)
        held_at = len(other.frames)
        assert held_at < n  # the shard holds: globex's later frames wait
        await metrics_reach(port, {"pqcnet_relayer_paused_shards": 1.0}, 30)

        late = await subscriber(node.port, "acme")
        await late.wait_for(5, 30)
        await other.wait_for(n, 30)
        assert late.by_topic[acme] == [1, 2, 3, 4, 5]
        assert other.by_topic[globex] == list(range(1, n + 1))
        await metrics_reach(port, {"pqcnet_relayer_held_frames": 0.0,
                                   "pqcnet_relayer_paused_shards": 0.0}, 30)
        assert scrape_metrics(port)["pqcnet_relayer_park_overflows_total"] == 1
        await _billed(port, {"acme": 5, "globex": n})
    finally:
        await close_clients(late, other, pub)
        await node.stop()


async def test_a_relayer_killed_while_a_topic_is_parked_loses_nothing(tmp_path: Path) -> None:
    """SIGKILL with a parked topic: the restarted relayer replays from the parked
    record; the live customer's application (its process kept its cursor) sees each
    seq once, and the relayer sends it again at most the one batch whose marks the
    kill may have beaten (the rest was marked despite the bus acknowledgement staying
    at the parked record); the parked customer's frames come in order once its
    subscriber arrives."""
    acme, globex = _two_customers()
    proc = await RelayerProcess(write_config(tmp_path, shards=SHARDS)).start()
    cursor = MemoryCursor()  # the live application's: it outlives the relayer's crash
    seen: list[int] = []
    pub = other = late = None
    try:
        other = await _subscriber_with(proc.port, "globex", cursor)
        pub = await publisher(proc.port)
        await asyncio.sleep(0.3)
        n = 12
        for seq in range(1, n + 1):
            results = await pub.publish([Frame(*acme, seq, b"a"), Frame(*globex, seq, b"g")])
            assert all(r.accepted for r in results)
        await other.wait_for(n, 30)
        seen += other.by_topic[globex]
        await close_clients(pub, other)
        pub = other = None
        proc.kill()  # while acme is parked: the bus was acknowledged up to acme's seq 1
        await proc.stop()

        proc = await RelayerProcess(proc.config).start()
        other = await _subscriber_with(proc.port, "globex", cursor)
        late = await subscriber(proc.port, "acme")
        await late.wait_for(n, 30)
        assert late.by_topic[acme] == list(range(1, n + 1))
        pub = await publisher(proc.port)
        results = await pub.publish([Frame(*globex, n + 1, b"g")])
        assert all(r.accepted for r in results)
        await other.wait_for(1, 30)
        seen += other.by_topic[globex]
        assert seen == list(range(1, n + 2))
        assert other.client.duplicates_dropped <= 1  # not 1..n again: they were marked
    finally:
        await close_clients(late, other, pub)
        await proc.stop()


async def _subscriber_with(port: int, customer: str, cursor: MemoryCursor) -> Collector:
    client = await SubscriberClient.connect("127.0.0.1", port, identities()[2], cursor=cursor)
    await client.subscribe(customer)
    return Collector(client)


PARKED = ("acme", "down")


def _parking_worker(tmp_path: Path, redis: BusFactory | None = None, **cfg: Any) -> tuple[
        Any, Any, CollectSink, RelayerShardWorker]:
    """One shard (embedded, or Redis when given its bus factory), its worker (parking
    on) and a sink that has no subscriber for :data:`PARKED`."""
    bus, store, sink, worker = one_shard_worker(tmp_path, redis, park_max_records=10_000,
                                                **cfg)
    sink.absent.add(PARKED)
    return bus, store, sink, worker


async def test_a_parked_topic_keeps_its_mark_in_memory_past_the_lru(tmp_path: Path) -> None:
    """With room for one topic's mark, a parked topic's mark (ahead of the store's)
    must stay cached: read back from the store, its next frame would look like the
    end of a gap and the parked frames would be skipped as one."""
    bus, store, sink, worker = _parking_worker(tmp_path, max_topics=1, gap_timeout=0.05,
                                               poll_timeout=0.01)
    parked = PARKED
    try:
        await bus.publish(0, [encode(Frame(*parked, 1, b"x"))])
        for i in range(20):  # other topics push the parked one out of a 1-topic LRU
            await bus.publish(0, [encode(Frame("globex", f"g{i}", 1, b"y"))])
        await worker.step()
        await bus.publish(0, [encode(Frame(*parked, 2, b"x"))])
        for _ in range(5):
            await worker.step()
            await asyncio.sleep(0.06)  # past gap_timeout: a wrong mark would skip
        assert worker.stats.gaps == 0
        assert worker.parked_topics == 1 and worker.stats.parked == 2
        assert worker.behind_park == 22  # parked seq 1's record and every one after it
        assert sink.total() == 20
        sink.absent.clear()
        for _ in range(3):  # nothing joined: the parked topic is not looked at again
            await worker.step()
        assert worker.parked_topics == 1 and sink.by_topic[parked] == []
        sink.generation += 1
        for _ in range(3):
            await worker.step()
        assert sink.by_topic[parked] == [1, 2]
        assert worker.stats.park_replays == 1 and worker.parked_topics == 0
        assert worker.stats.duplicates == 20 and worker.stats.gaps == 0
        assert await bus.lag(0, "relayer") == 0
    finally:
        await bus.close()
        store.close()


@pytest.fixture(params=["embedded", "redis"])
def parking_backend(request: pytest.FixtureRequest) -> BusFactory | None:
    """None: the embedded bus; else the Redis bus factory (set up outside the test's
    event loop, which an async fixture needs)."""
    return request.getfixturevalue("redis_bus_factory") if request.param == "redis" else None


async def test_a_subscriber_for_a_parked_topic_ends_the_consume_wait(
        tmp_path: Path, parking_backend: BusFactory | None) -> None:
    """The worker waits up to ``poll_timeout`` in ``consume`` when the shard is idle
    (Redis: ``XREADGROUP BLOCK`` on the server); a subscriber that comes for a parked
    topic must not wait that out. With a 60 s poll timeout, the parked frame reaches
    the new subscriber once the bus's wait is interrupted — long before the timeout
    (without ``interrupt`` this takes 60 s and the 15 s limit fails)."""
    bus, store, sink, worker = _parking_worker(tmp_path, parking_backend, poll_timeout=60.0)
    parked = PARKED
    task = asyncio.create_task(worker.run())
    try:
        await bus.publish(0, [encode(Frame(*parked, 1, b"x"))])
        await eventually(lambda: worker.parked_topics == 1, 15)
        await asyncio.sleep(0.1)  # the worker is back in its (60 s) consume wait
        sink.absent.clear()
        sink.generation += 1  # a subscriber joined (what the hub does) ...
        bus.interrupt(0)  # ... and the node wakes the parked shard
        await eventually(lambda: sink.by_topic[parked] == [1], 15)
        assert worker.stats.park_replays == 1 and worker.parked_topics == 0
    finally:
        worker.stop()
        bus.interrupt(0)
        await asyncio.wait_for(task, 15)
        await bus.close()
        await store.aclose() if parking_backend is not None else store.close()


async def test_parked_records_survive_a_kafka_partition_move(tmp_path: Path,
                                                              kafka_bootstrap: str) -> None:
    """A second group member takes half the partitions while every partition has a
    parked topic: the relayer forgets the parked state of the partitions that went
    (their workers see the bus no longer owns them and reset; the gauge drops), the
    member reads them from the parked record on (the commit stayed there, read with a
    plain Kafka consumer), and when the partitions come back the relayer replays them:
    the parked customer's subscriber gets every seq once, in order, billed once."""
    shards = 4
    tag = uuid.uuid4().hex[:8]
    topic_name, group = f"pqcnet-park-{tag}", f"park-{tag}"
    node = await start_node(tmp_path, backend="kafka", kafka_bootstrap=kafka_bootstrap,
                            kafka_topic=topic_name, group=group, shards=shards,
                            kafka_session_timeout=3.0, metrics_port=0)
    other = KafkaBus(kafka_bootstrap, shards, topic=topic_name, rebalance=True,
                     session_timeout=3.0, revoke_grace=1.0)
    first_read: dict[int, Frame] = {}
    live = late = pub = None
    joined: asyncio.Task[None] | None = None
    try:
        await eventually(lambda: node.bus.assignment() == list(range(shards)), 60)
        live = await subscriber(node.port, "globex")
        pub = await publisher(node.port)
        await asyncio.sleep(0.3)
        idle = {s: ("acme", next(f"c{i}" for i in range(10_000)
                                 if shard_for("acme", f"c{i}", shards) == s))
                for s in range(shards)}
        busy = {s: ("globex", next(f"g{i}" for i in range(10_000)
                                   if shard_for("globex", f"g{i}", shards) == s))
                for s in range(shards)}
        for seq in (1, 2, 3):
            results = await pub.publish([Frame(*idle[s], seq, b"a") for s in range(shards)]
                                        + [Frame(*busy[s], seq, b"g") for s in range(shards)])
            assert all(r.accepted for r in results)
        await live.wait_for(3 * shards, 30)
        await eventually(lambda: sum(w.parked_topics for w in node.workers) == shards, 30)

        async def member() -> None:  # the second member reads (and so joins the group)
            while True:
                for s in other.assignment():
                    try:
                        batch = await other.consume(s, group, block=0.1)
                    except BusUnavailable:  # newly assigned: start at the commit
                        await other.rewind(s, group)
                        continue
                    if batch and s not in first_read:
                        first_read[s] = decode(batch[0].data)
                if not other.assignment():  # joins the group
                    with contextlib.suppress(BusUnavailable, BusError):
                        await other.consume(0, group, block=0.1)

        joined = asyncio.create_task(member())
        await eventually(lambda: len(node.bus.assignment()) == shards // 2
                         and len(other.assignment()) == shards // 2, 60)
        went = sorted(set(range(shards)) - set(node.bus.assignment()))
        # per worker: a sum of 2 was also reached for a moment by the stale state of the
        # shards that went (1 each) while the kept ones reset (0), before they re-parked
        await eventually(lambda: {w.shard: w.parked_topics for w in node.workers}
                         == {s: int(s not in went) for s in range(shards)})
        assert node.metrics_port is not None
        await metrics_reach(node.metrics_port, {"pqcnet_relayer_parked_topics": shards // 2})
        # read the partitions that went again from their commit, as a new owner does
        joined.cancel()
        await asyncio.gather(joined, return_exceptions=True)
        first_read.clear()
        for s in went:
            await other.rewind(s, group)
        joined = asyncio.create_task(member())
        await eventually(lambda: set(first_read) == set(went), 30)
        # the commit stayed at each partition's first parked record
        assert {s: (first_read[s].topic, first_read[s].seq) for s in went} == {
            s: (idle[s], 1) for s in went}
        joined.cancel()
        await asyncio.gather(joined, return_exceptions=True)
        await other.close()  # leaves the group: its partitions come back
        await eventually(lambda: node.bus.assignment() == list(range(shards)), 60)
        late = await subscriber(node.port, "acme")
        await late.wait_for(3 * shards, 60)
        assert {t: late.by_topic[t] for t in idle.values()} == {
            t: [1, 2, 3] for t in idle.values()}
        await eventually(lambda: sum(w.parked_topics for w in node.workers) == 0)
        assert live.by_topic == {t: [1, 2, 3] for t in busy.values()}
        assert node.metrics_port is not None
        port = node.metrics_port

        def billed() -> tuple[float, float]:  # a batch is metered after its marks' write
            m = scrape_metrics(port)
            return _volume(m, "acme"), _volume(m, "globex")

        await eventually(lambda: billed() == (3 * shards, 3 * shards), 15)
        await asyncio.sleep(0.5)
        assert billed() == (3 * shards, 3 * shards)  # and nothing billed twice after
    finally:
        if joined is not None:
            joined.cancel()
            await asyncio.gather(joined, return_exceptions=True)
        await close_clients(late, live, pub)
        await other.close()
        await node.stop()
