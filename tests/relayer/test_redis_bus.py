"""Redis Streams backend against the real Redis: contract, restart, reclaim, safe trim,
and exactly-once ordered delivery with concurrent publishers."""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Any

import pytest
import redis.asyncio as aioredis

from pqcnet.relayer.bus.redis_streams import RedisStreamsBus
from pqcnet.relayer.errors import BusError, BusUnavailable
from pqcnet.relayer.frame import Frame, encode, shard_for
from pqcnet.relayer.seqstore import RedisSeqStore
from pqcnet.relayer.worker import RelayerShardWorker, WorkerConfig
from tests.relayer.conftest import BusFactory
from tests.relayer.helpers import (
    CollectSink,
    assert_exactly_once_in_order,
    redis_cli,
    redis_monitor,
)

pytestmark = [pytest.mark.services, pytest.mark.timeout(90)]


async def test_contract_and_restart(redis_bus_factory: BusFactory) -> None:
    bus = redis_bus_factory(consumer="a", entry_records=1)  # one record per entry: exact
    ids = await bus.publish(1, [b"a", b"b", b"c"])
    assert len(ids) == 3 and len(set(ids)) == 3
    assert await bus.lag(1, "g") == 3
    got = await bus.consume(1, "g", max_records=2, block=0.1)
    assert [d.data for d in got] == [b"a", b"b"]
    await bus.ack(1, "g", got[:1])
    assert await bus.lag(1, "g") == 2
    assert await bus.consume(2, "g", block=0.05) == []
    await bus.close()
    bus = redis_bus_factory(consumer="a", entry_records=1)  # restart: own pending first
    got = await bus.consume(1, "g", block=0.1)
    assert [d.data for d in got] == [b"b"]
    got += await bus.consume(1, "g", block=0.1)
    assert [d.data for d in got] == [b"b", b"c"]
    await bus.ack(1, "g", got)
    assert await bus.lag(1, "g") == 0
    assert await bus.healthy()


async def test_dead_consumer_entries_are_reclaimed(redis_bus_factory: BusFactory) -> None:
    dead = redis_bus_factory(consumer="dead")
    await dead.publish(0, [b"x", b"y"])
    assert len(await dead.consume(0, "g", block=0.1)) == 2  # read, never acked: then it dies
    await dead.close()
    heir = redis_bus_factory(consumer="heir", claim_idle_ms=0)
    got = await heir.consume(0, "g", block=0.1)
    assert [d.data for d in got] == [b"x", b"y"]
    await heir.ack(0, "g", got)
    assert await heir.lag(0, "g") == 0


async def test_packed_entry_is_acked_only_when_complete(redis_bus_factory: BusFactory) -> None:
    bus = redis_bus_factory(consumer="a")
    assert isinstance(bus, RedisStreamsBus)
    offs = await bus.publish(2, [b"r0", b"r1", b"r2", b"r3", b"r4"])
    assert len({str(o).split("/")[0] for o in offs}) == 1  # one XADD, one entry
    got = await bus.consume(2, "g", block=0.1)
    assert [d.data for d in got] == [b"r0", b"r1", b"r2", b"r3", b"r4"]
    await bus.ack(2, "g", got[:3])  # entry not complete: stays pending
    await bus.rewind(2, "g")
    again = await bus.consume(2, "g", block=0.1)
    assert [d.data for d in again] == [d.data for d in got]  # redelivered whole
    await bus.ack(2, "g", again)
    assert await bus.lag(2, "g") == 0
    assert int((await bus.client.xpending(bus.key(2), "g"))["pending"]) == 0


async def test_trim_never_drops_unacked(redis_bus_factory: BusFactory) -> None:
    bus = redis_bus_factory(max_len=10, trim_every=1, entry_records=1)
    assert isinstance(bus, RedisStreamsBus)
    await bus.publish(0, [str(i).encode() for i in range(200)])
    got = await bus.consume(0, "g", max_records=120, block=0.1)
    await bus.ack(0, "g", got[:100])  # 100 acked, 20 pending, 80 undelivered
    await bus.trim(0)
    assert int(await bus.client.xlen(bus.key(0))) >= 100
    await bus.rewind(0, "g")
    rest = await bus.consume(0, "g", max_records=500, block=0.1)
    rest += await bus.consume(0, "g", max_records=500, block=0.1)
    assert [int(d.data) for d in rest] == list(range(100, 200))
    await bus.ack(0, "g", rest)
    await bus.trim(0)
    assert int(await bus.client.xlen(bus.key(0))) <= 110  # approximate trim: close to the floor


async def test_concurrent_publishers_exactly_once_across_restart(
    redis_bus_factory: BusFactory,
) -> None:
    topics = [(f"cust{i % 4}", f"chan{i}") for i in range(16)]
    rng = random.Random(3)
    sink = CollectSink()

    async def publish_all(bus: RedisStreamsBus, n: int) -> None:
        async def one(c: str, ch: str) -> None:
            for seq in range(1, n + 1):
                rec = encode(Frame(c, ch, seq, b"p" * 32))
                await bus.publish(shard_for(c, ch, 4), [rec] * (2 if rng.random() < 0.2 else 1))
        await asyncio.gather(*(one(c, ch) for c, ch in topics))

    async def run(bus: RedisStreamsBus) -> list[asyncio.Task[None]]:
        store = RedisSeqStore(bus.client, bus.prefix)
        cfg = WorkerConfig(poll_timeout=0.05)
        return [asyncio.create_task(RelayerShardWorker(bus, s, store, sink, cfg).run())
                for s in range(4)]

    bus = redis_bus_factory(consumer="r1")
    assert isinstance(bus, RedisStreamsBus)
    tasks = await run(bus)
    await publish_all(bus, 40)
    await sink.wait_for(16 * 40)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await bus.close()
    bus = redis_bus_factory(consumer="r1")  # restart; publishers retry from seq 1 and go on
    assert isinstance(bus, RedisStreamsBus)
    tasks = await run(bus)
    await publish_all(bus, 60)
    await sink.wait_for(16 * 60)
    await asyncio.sleep(0.3)
    assert_exactly_once_in_order(sink.by_topic, {t: 60 for t in topics})
    for s in range(4):
        assert await bus.lag(s, "relayer") == 0
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_publish_many_one_round_trip_each_shard_in_order(
        redis_bus_factory: BusFactory) -> None:
    """A cross-shard group commit is one pipeline; each shard's stream holds exactly its
    own records, in order, packed by ``entry_records`` (counted with XLEN, not through
    the bus), and a shard with nothing to write gets no entry."""
    bus = redis_bus_factory(consumer="a", entry_records=2)
    assert isinstance(bus, RedisStreamsBus) and bus.batched_shards
    calls = 0
    execute = bus.client.pipeline

    def counting(*a: object, **k: object) -> object:
        nonlocal calls
        calls += 1
        return execute(*a, **k)  # type: ignore[arg-type]

    bus.client.pipeline = counting  # type: ignore[method-assign]
    await bus.publish_many({0: [b"a0", b"a1", b"a2"], 3: [b"d0"], 2: []})
    assert calls == 1
    assert await bus.client.xlen(bus.key(0)) == 2  # 3 records, 2 per entry
    assert await bus.client.xlen(bus.key(3)) == 1
    assert await bus.client.exists(bus.key(2)) == 0
    assert [d.data for d in await bus.consume(0, "g", block=0.1)] == [b"a0", b"a1", b"a2"]
    assert [d.data for d in await bus.consume(3, "g", block=0.1)] == [b"d0"]
    assert await bus.consume(2, "g", block=0.05) == []
    with pytest.raises(ValueError):
        await bus.publish_many({bus.partitions(): [b"x"]})  # no such shard: nothing sent
    assert calls == 1


async def test_lags_ask_for_every_shard_in_one_round_trip(
        redis_bus_factory: BusFactory, redis_url: str) -> None:
    """The backpressure sample (every ``backpressure_interval``, all owned shards) is
    one pipeline: ``redis-cli MONITOR`` sees one ``XINFO GROUPS`` per shard, all from
    one connection. The counts are each group's undelivered plus pending records. A
    shard whose stream went away is left out while the others answer, and the next
    sample makes its group again."""
    bus = redis_bus_factory(consumer="a", shards=8, entry_records=1)
    assert isinstance(bus, RedisStreamsBus)
    await bus.publish(2, [b"a", b"b", b"c"])
    await bus.publish(5, [b"x"] * 5)
    got = await bus.consume(5, "g", max_records=2, block=0.1)
    await bus.ack(5, "g", got[:1])  # 3 undelivered + 1 read and not acknowledged
    await bus.lags(range(8), "g")  # the groups exist before the monitored sample
    async with redis_monitor(redis_url) as lines:
        lags = await bus.lags(range(8), "g")
    assert lags == {0: 0, 1: 0, 2: 3, 3: 0, 4: 0, 5: 4, 6: 0, 7: 0}
    assert lags == {s: await bus.lag(s, "g") for s in range(8)}
    prefix = bus.key(0).rsplit(":", 1)[0]
    xinfo = [line for line in lines if '"XINFO"' in line and prefix in line]
    assert len(xinfo) == 8 and len({line.split()[2] for line in xinfo}) == 1, xinfo
    redis_cli(redis_url, "DEL", bus.key(3))
    assert await bus.lags(range(8), "g") == {s: n for s, n in lags.items() if s != 3}
    assert (await bus.lags(range(8), "g"))[3] == 0
    with pytest.raises(BusError):
        redis_cli(redis_url, "DEL", bus.key(3))
        await bus.lag(3, "g")  # one shard asked on its own: its error is raised


async def _blocked_reader(admin: Any, cmd: str = "xreadgroup") -> int | None:
    """Id of the client blocked in ``cmd``, as Redis lists it (CLIENT LIST)."""
    for c in await admin.client_list():
        if c.get("cmd") == cmd and "b" in c.get("flags", ""):
            return int(c["id"])
    return None


@pytest.mark.parametrize("lease", [None, 5.0], ids=["alone", "cluster"])
async def test_interrupt_ends_a_blocking_read_and_loses_nothing(
        redis_bus_factory: BusFactory, redis_url: str, lease: float | None) -> None:
    """``interrupt`` ends a 30 s blocking consume at once, seen from Redis's side: the
    client blocked in XREADGROUP (a cluster member: in the XREAD its fenced read waits
    behind, decision 0024) is gone (CLIENT LIST) and the consume returns nothing.
    300 rounds of a publish racing an interrupt of the read waiting for it hand every
    entry out once, in order — CLIENT UNBLOCK is atomic in Redis, never a cancelled
    read that could drop what it was given. After Redis kills the reading connection
    (CLIENT KILL), its new connection's id is the one interrupted; a read interrupted
    before it reached Redis is unblocked once it does (the unblock is tried again)."""
    bus = redis_bus_factory(consumer="a", entry_records=1, lease=lease)
    writer = redis_bus_factory(consumer="w", entry_records=1)
    admin = aioredis.from_url(redis_url)
    cmd = "xreadgroup" if lease is None else "xread"
    try:
        if lease is not None:
            await bus.start()  # the lone member: every shard is its own
        for round_ in range(2):
            # the group exists; a member's shard is drained, so its next read waits
            assert await bus.consume(0, "g", block=0.01) == []
            waiting = asyncio.create_task(bus.consume(0, "g", block=30.0))
            async with asyncio.timeout(10):
                while (reader := await _blocked_reader(admin, cmd)) is None:  # noqa: ASYNC110 - Redis's state
                    await asyncio.sleep(0.02)
            bus.interrupt(0)
            assert await asyncio.wait_for(waiting, 5) == []
            assert await _blocked_reader(admin, cmd) is None
            if round_ == 0:  # Redis drops the connection: the next read reconnects
                await admin.client_kill_filter(_id=reader)
                with contextlib.suppress(BusUnavailable):
                    await bus.consume(0, "g", block=0.05)
        # a first blocking read, interrupted while its connection is still being made
        if lease is None:
            fresh = redis_bus_factory(consumer="b", entry_records=1)
        else:  # another member would not own shard 0: the same bus, a new connection
            assert isinstance(bus, RedisStreamsBus)
            assert await bus.consume(0, "g", block=0.01) == []  # drained: the next one waits
            fresh = bus
            await bus._blockers.pop((0, "g")).aclose()
        assert isinstance(fresh, RedisStreamsBus)
        waiting = asyncio.create_task(fresh.consume(0, "g", block=30.0))
        async with asyncio.timeout(10):
            while (0, "g") not in fresh._blocking:  # noqa: ASYNC110 - the bus's own state
                await asyncio.sleep(0)
        fresh.interrupt(0)
        assert await asyncio.wait_for(waiting, 5) == []
        published: list[bytes] = []
        got: list[bytes] = []
        for i in range(300):
            reader_task = asyncio.create_task(bus.consume(0, "g", block=5.0))
            await asyncio.sleep(random.uniform(0, 0.003))
            published.append(str(i).encode())
            await writer.publish(0, [published[-1]])
            bus.interrupt(0)
            batch = await asyncio.wait_for(reader_task, 10)
            got += [d.data for d in batch]
            await bus.ack(0, "g", batch)
        while batch := await bus.consume(0, "g", block=0.2):
            got += [d.data for d in batch]
            await bus.ack(0, "g", batch)
        assert got == published
        assert await bus.lag(0, "g") == 0
    finally:
        await admin.aclose()


async def test_its_connections_say_whose_they_are(redis_bus_factory: BusFactory,
                                                  redis_url: str) -> None:
    """``redis-cli CLIENT LIST`` names a relayer's connections after its node id (a
    character Redis refuses in a name becomes ``_``), and none is left after close."""
    bus = redis_bus_factory(consumer="edge relayer\n7")
    await bus.start()
    await bus.publish(0, [encode(Frame("acme", "ch", 1, b"x"))])
    name = "name=pqcnet-relayer:edge_relayer_7:bus "
    assert name in redis_cli(redis_url, "CLIENT", "LIST")
    await bus.close()
    assert name not in redis_cli(redis_url, "CLIENT", "LIST")
