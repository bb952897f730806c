"""A quiet shard worker waits longer and longer in ``consume`` (``idle_poll_timeout``).

On Redis every consume wait is an ``XREAD BLOCK`` and the fenced script after it: at a
fixed 0.2 s, 32 idle shards made 160 waits a second (about 520 Redis commands a second
with the lease renewals and lag samples). Growing the wait of a quiet shard must not
delay anything: records end a wait at once, a worker with something else to look at
(parked topics) keeps the short wait, and ``stop`` with ``interrupt`` ends a long wait.
The waits are read where the worker asks the bus (the ``block`` it passes), on the
embedded and the Redis bus; on Kafka, a rebalance ends a long read at the revoke.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from pqcnet.relayer.bus.kafka import KafkaBus
from pqcnet.relayer.errors import BusUnavailable
from pqcnet.relayer.frame import Frame, encode
from tests.relayer.conftest import BusFactory
from tests.relayer.e2e import start_node
from tests.relayer.helpers import eventually, one_shard_worker

pytestmark = pytest.mark.timeout(120)


class Consumes:
    """``bus.consume`` recorded: (block asked, seconds it took, records returned)."""

    def __init__(self, bus: Any) -> None:
        self.calls: list[tuple[float, float, int]] = []
        #: each shard's last finished consume (one cancelled is not recorded)
        self.last: dict[int, tuple[float, float, int]] = {}
        self.started = 0
        self._consume = bus.consume
        bus.consume = self

    async def __call__(self, shard: int, group: str, **kw: Any) -> Any:
        self.started += 1
        t0 = time.monotonic()
        out = await self._consume(shard, group, **kw)
        self.calls.append((kw["block"], time.monotonic() - t0, len(out)))
        self.last[shard] = self.calls[-1]
        return out

    def blocks(self) -> list[float]:
        return [round(b, 3) for b, _, _ in self.calls]


@pytest.fixture(params=["embedded", "redis"])
def backend(request: pytest.FixtureRequest) -> BusFactory | None:
    """None: the embedded bus; else the Redis bus factory."""
    return request.getfixturevalue("redis_bus_factory") if request.param == "redis" else None


async def _close(bus: Any, store: Any, redis: BusFactory | None) -> None:
    await bus.close()
    await store.aclose() if redis is not None else store.close()


async def test_a_quiet_shard_doubles_its_wait_and_a_record_ends_it(
        tmp_path: Path, backend: BusFactory | None) -> None:
    bus, store, sink, worker = one_shard_worker(tmp_path, backend, poll_timeout=0.05,
                                       idle_poll_timeout=30.0)
    consumes = Consumes(bus)
    task = asyncio.create_task(worker.run())
    try:
        # 0.05 + 0.1 + ... + 1.6 s of empty reads: the seventh waits 3.2 s
        await eventually(lambda: consumes.started >= 7, 30)
        assert consumes.blocks()[:6] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6]
        assert all(n == 0 for _, _, n in consumes.calls)
        await asyncio.sleep(0.3)  # well into the 3.2 s wait
        await bus.publish(0, [encode(Frame("acme", "c", 1, b"x"))])
        await eventually(lambda: sink.by_topic[("acme", "c")] == [1], 15)
        await eventually(lambda: len(consumes.calls) >= 8, 15)
        block, took, n = consumes.calls[6]
        # the record ended the long wait, not its timeout
        assert (round(block, 3), n) == (3.2, 1) and took < block / 2, consumes.calls
        assert round(consumes.calls[7][0], 3) == 0.05  # records: short waits again
        assert worker.stats.delivered == 1 and worker.stats.resets == 0
        # quiet again: into another 3.2 s wait, which stop + interrupt end (the node's
        # stop does both)
        await eventually(lambda: consumes.started >= 7 + 7, 30)
        await asyncio.sleep(0.3)
    finally:
        worker.stop()
        bus.interrupt(0)
        await asyncio.wait_for(task, 15)
        await _close(bus, store, backend)
    block, took, n = consumes.calls[-1]
    assert (round(block, 3), n) == (3.2, 0) and took < block / 2, consumes.calls
    assert consumes.blocks()[7:13] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6]


async def test_waits_stay_short_without_idle_poll_timeout_or_with_a_parked_topic(
        tmp_path: Path, backend: BusFactory | None) -> None:
    """``idle_poll_timeout`` 0 (the worker's default) keeps ``poll_timeout``; so does a
    parked topic (its subscriber may come any moment) even with a long idle wait."""
    bus, store, sink, worker = one_shard_worker(tmp_path, backend, poll_timeout=0.02)
    consumes = Consumes(bus)
    task = asyncio.create_task(worker.run())
    try:
        await eventually(lambda: consumes.started >= 10, 15)
    finally:
        worker.stop()
        await asyncio.wait_for(task, 15)
        await _close(bus, store, backend)
    assert set(consumes.blocks()) == {0.02}, consumes.blocks()

    bus, store, sink, worker = one_shard_worker(tmp_path / "parked", backend, poll_timeout=0.02,
                                       idle_poll_timeout=30.0, park_max_records=100)
    sink.absent.add(("acme", "down"))
    consumes = Consumes(bus)
    await bus.publish(0, [encode(Frame("acme", "down", 1, b"x"))])
    task = asyncio.create_task(worker.run())
    try:
        await eventually(lambda: worker.parked_topics == 1, 15)
        seen = consumes.started
        await eventually(lambda: consumes.started >= seen + 10, 15)
    finally:
        worker.stop()
        bus.interrupt(0)
        await asyncio.wait_for(task, 15)
        await _close(bus, store, backend)
    parked_from = next(i for i, (_, _, n) in enumerate(consumes.calls) if n)
    assert set(consumes.blocks()[parked_from + 1:]) == {0.02}, consumes.blocks()
    assert worker.parked_topics == 1 and worker.stats.parked == 1


async def test_a_redis_relayers_stop_ends_its_shards_long_waits(tmp_path: Path,
                                                                redis_url: str) -> None:
    """``RelayerNode.stop`` interrupts the workers' waits: with ``idle_poll_timeout`` 60
    the shards sit in 6.4 s ``XREAD BLOCK``s on the Redis server when the stop comes;
    every shard's last read ends early with nothing (``CLIENT UNBLOCK``), none is
    cancelled (a cancelled read is not recorded) or waited out."""
    node = await start_node(tmp_path, backend="redis", redis_url=redis_url, shards=4,
                            redis_prefix=f"idle:{uuid.uuid4().hex[:8]}",
                            idle_poll_timeout=60.0)
    try:
        consumes = Consumes(node.bus)
        await eventually(lambda: node.bus.assignment() == [0, 1, 2, 3], 30)
        # 0.2 + 0.4 + ... + 3.2 s of empty reads: every shard is then in a 6.4 s one
        await eventually(lambda: consumes.started >= 4 * 6 and all(
            round(b, 3) == 3.2 for b, _, _ in consumes.last.values()), 60)
        await asyncio.sleep(0.5)
    finally:
        await node.stop()
    assert sorted(consumes.last) == [0, 1, 2, 3]
    for shard, (block, took, n) in consumes.last.items():
        assert round(block, 3) == 6.4 and n == 0 and took < block / 2, (shard, consumes.calls)


async def test_a_kafka_rebalance_ends_a_long_read_and_the_next_one_resets(
        kafka_bootstrap: str) -> None:
    """Kafka's eager rebalance revokes every partition and assigns the kept ones again.
    A quiet shard's long read must not sit through that: the revoke ends it with
    nothing (the pump drops the partition and wakes its reader), before the new
    assignment, and the next read raises ``BusUnavailable`` for the reset the
    assignment asks for (the committed offset, the stored marks). Only then does the
    record published after the move come out."""
    tag = uuid.uuid4().hex[:8]
    topic, group = f"pqcnet-idle-{tag}", f"idle-{tag}"
    a, b = (KafkaBus(kafka_bootstrap, 2, topic=topic, rebalance=True, session_timeout=1.0,
                     revoke_grace=0.5, client_id=f"{name}-{tag}") for name in "ab")
    await a.start()
    await b.start()
    waits: dict[int, asyncio.Task[Any]] = {}
    try:
        async with asyncio.timeout(60):  # A alone: both partitions, their resets taken
            while a.assignment() != [0, 1] or a._reset_needed:
                for s in (0, 1):
                    with contextlib.suppress(BusUnavailable):
                        await a.consume(s, group, block=0.1)
        waits = {s: asyncio.create_task(a.consume(s, group, block=60.0)) for s in (0, 1)}
        await asyncio.sleep(0.3)
        assert not any(w.done() for w in waits.values())
        async with asyncio.timeout(60):  # B joins: A's two revoked, one assigned again
            while not b.assignment() or len(a.assignment()) != 1:
                with contextlib.suppress(BusUnavailable):
                    await b.consume(0, group, block=0.1)
        (kept,) = a.assignment()
        # both 60 s reads ended at the revoke, with nothing
        assert [await asyncio.wait_for(waits[s], 5) for s in (0, 1)] == [[], []]
        await a.publish(kept, [b"after the move"])
        with pytest.raises(BusUnavailable, match="assigned to this relayer"):
            await a.consume(kept, group, block=5.0)
        await a.rewind(kept, group)
        async with asyncio.timeout(30):  # after the reset the record is read
            got: list[Any] = []
            while not got:
                got = await a.consume(kept, group, block=1.0)
        assert [d.data for d in got] == [b"after the move"]
    finally:
        for task in waits.values():
            task.cancel()
        await asyncio.gather(*waits.values(), return_exceptions=True)
        await b.close()
        await a.close()
