"""Local RocksDB overflow queue, and the publisher that falls back to it.

When the bus is down or slower than ``publish_timeout``, frames the ingress has
accepted still have to be durable *before* the publisher gets its ACK. They go to a
per-shard FIFO in a node-local RocksDB, and a replay task moves them to the bus, in
order, once it answers again. While a shard has anything queued, new frames for that
shard queue behind it, so the bus sees each shard's frames in arrival order.

A publish that timed out may still have reached the bus; its replay then produces a
duplicate, which the shard worker's sequence window suppresses. So the overflow path
trades a possible duplicate on the bus for never losing an acknowledged frame.

Keys: ``b"Q" shard:u16 n:u64 -> record`` (n increases per shard, survives restarts).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import rocksdict

from pqcnet.relayer.bus.base import Bus
from pqcnet.relayer.bus.embedded import open_rocks
from pqcnet.relayer.errors import BusError, OverflowFull

log = logging.getLogger(__name__)
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")

#: records the overflow queue may hold in total; bounds local disk during an outage
MAX_OVERFLOW_RECORDS = 1_000_000
#: records moved to the bus per replay publish
REPLAY_BATCH = 512
#: records one coalesced ingress publish may carry to the bus
MAX_COALESCE = 4096


class OverflowQueue:
    """Durable per-shard FIFO in RocksDB."""

    def __init__(self, path: str | Path, shards: int, *, max_records: int = MAX_OVERFLOW_RECORDS,
                 sync: bool = False) -> None:
        self._db = open_rocks(path)
        self._wo = rocksdict.WriteOptions()
        self._wo.sync = sync
        self.max_records = max_records
        self._head = [0] * shards  # next n to read
        self._tail = [0] * shards  # next n to write
        seen: set[int] = set()
        it = self._db.iter()
        it.seek(b"Q")
        while it.valid() and it.key()[:1] == b"Q":  # key order: a shard's first key is its head
            shard, n = _U16.unpack(it.key()[1:3])[0], _U64.unpack(it.key()[3:11])[0]
            if shard not in seen:
                seen.add(shard)
                self._head[shard] = n
            self._tail[shard] = n + 1
            it.next()

    def depth(self, shard: int) -> int:
        """Records queued for ``shard``."""
        return self._tail[shard] - self._head[shard]

    def total(self) -> int:
        """Records queued over all shards."""
        return sum(t - h for h, t in zip(self._head, self._tail))

    def append(self, shard: int, records: Sequence[bytes]) -> None:
        """Durably queue ``records``; :class:`OverflowFull` (nothing written) at the bound."""
        if self.total() + len(records) > self.max_records:
            raise OverflowFull(f"overflow queue holds {self.total()} records "
                               f"(bound {self.max_records}); retry later")
        batch = rocksdict.WriteBatch(raw_mode=True)
        n = self._tail[shard]
        for i, rec in enumerate(records):
            batch.put(b"Q" + _U16.pack(shard) + _U64.pack(n + i), rec)
        self._db.write(batch, self._wo)
        self._tail[shard] = n + len(records)

    def peek(self, shard: int, limit: int) -> list[bytes]:
        """Up to ``limit`` oldest records of ``shard`` (not removed)."""
        out: list[bytes] = []
        end = min(self._tail[shard], self._head[shard] + limit)
        for n in range(self._head[shard], end):
            rec = self._db.get(b"Q" + _U16.pack(shard) + _U64.pack(n))
            if rec is None:  # pragma: no cover - would mean external tampering
                raise BusError(f"overflow queue entry {shard}/{n} missing")
            out.append(rec)
        return out

    def remove(self, shard: int, count: int) -> None:
        """Drop the ``count`` oldest records of ``shard`` (after they reached the bus)."""
        start = self._head[shard]
        self._db.delete_range(b"Q" + _U16.pack(shard) + _U64.pack(start),
                              b"Q" + _U16.pack(shard) + _U64.pack(start + count))
        self._head[shard] = start + count

    def close(self) -> None:
        """Close the database."""
        self._db.close()


@dataclass(frozen=True, slots=True)
class Accepted:
    """Where an accepted batch went."""

    #: True: the local overflow queue; False: the bus
    overflowed: bool


class BufferedPublisher:
    """Publish to the bus, or durably to the overflow queue when the bus cannot take it."""

    def __init__(self, bus: Bus, queue: OverflowQueue, *, publish_timeout: float = 2.0,
                 replay_timeout: float = 15.0, replay_interval: float = 0.5) -> None:
        self.bus, self.queue = bus, queue
        #: seconds a bus publish may take before the frames go to overflow instead
        self.publish_timeout = publish_timeout
        #: seconds one replay batch may take: a broker just back (Kafka leader election,
        #: producer id refresh) can be slow for a few seconds; nobody waits on a replay
        self.replay_timeout = max(replay_timeout, publish_timeout)
        self.replay_interval = replay_interval
        self.bus_down = False
        self.replayed = 0
        self._kick = asyncio.Event()
        self._locks = [asyncio.Lock() for _ in range(bus.partitions())]
        n = bus.partitions()
        self._pending: list[deque[tuple[Sequence[bytes], asyncio.Future[Accepted]]]] = [
            deque() for _ in range(n)]
        self._flushing = [False] * n
        self._flushers: set[asyncio.Task[None]] = set()

    async def publish(self, shard: int, records: Sequence[bytes]) -> Accepted:
        """Durably accept ``records`` for ``shard`` (bus or overflow).

        Group commit: while one bus publish for a shard is in flight, later callers'
        records wait and then go out together in the next one, so many small ingress
        requests cost few bus round trips. Each caller still returns only once its
        own records are durable.
        """
        fut: asyncio.Future[Accepted] = asyncio.get_running_loop().create_future()
        self._pending[shard].append((records, fut))
        if not self._flushing[shard]:
            self._flushing[shard] = True
            task = asyncio.create_task(self._flush(shard))
            self._flushers.add(task)
            task.add_done_callback(self._flushers.discard)
        return await asyncio.shield(fut)

    async def _flush(self, shard: int) -> None:
        try:
            while self._pending[shard]:
                items: list[tuple[Sequence[bytes], asyncio.Future[Accepted]]] = []
                count = 0
                while self._pending[shard] and (not items or count < MAX_COALESCE):
                    item = self._pending[shard].popleft()
                    items.append(item)
                    count += len(item[0])
                try:
                    acc = await self._publish_now(shard, [r for rs, _ in items for r in rs])
                except Exception as exc:
                    for _, f in items:
                        if not f.done():
                            f.set_exception(exc)
                    continue
                for _, f in items:
                    if not f.done():
                        f.set_result(acc)
        finally:
            self._flushing[shard] = False

    async def _publish_now(self, shard: int, records: Sequence[bytes]) -> Accepted:
        async with self._locks[shard]:  # keeps each shard's frames in arrival order
            if not self.bus_down and self.queue.depth(shard) == 0:
                try:
                    async with asyncio.timeout(self.publish_timeout):
                        await self.bus.publish(shard, records)
                    return Accepted(False)
                except (TimeoutError, BusError) as exc:
                    if isinstance(exc, BusError) and not exc.retriable:
                        raise
                    self.bus_down = True
                    log.warning("bus unavailable: using overflow queue",
                                extra={"shard": shard, "error": str(exc) or "timeout"})
            self.queue.append(shard, records)
            self._kick.set()
            return Accepted(True)

    async def replay_once(self) -> int:
        """Move queued records to the bus while it answers; returns records moved."""
        moved = 0
        for shard in range(self.bus.partitions()):
            while self.queue.depth(shard):
                async with self._locks[shard]:
                    batch = self.queue.peek(shard, REPLAY_BATCH)
                    async with asyncio.timeout(self.replay_timeout):
                        await self.bus.publish(shard, batch)
                    self.queue.remove(shard, len(batch))
                moved += len(batch)
        self.replayed += moved
        return moved

    async def run(self) -> None:
        """Replay loop: probe the bus, drain the queue, clear ``bus_down``."""
        while True:
            try:
                async with asyncio.timeout(self.replay_interval):
                    await self._kick.wait()
            except TimeoutError:
                pass
            self._kick.clear()
            if not self.bus_down and self.queue.total() == 0:
                continue
            if not await self.bus.healthy():
                continue
            try:
                moved = await self.replay_once()
            except (TimeoutError, BusError) as exc:
                log.warning("overflow replay paused: %s", str(exc) or "timeout",
                            extra={"error": str(exc) or "timeout"})
                continue
            if moved:
                log.info("overflow replayed", extra={"records": moved})
            self.bus_down = False
