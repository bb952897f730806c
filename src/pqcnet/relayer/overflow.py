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
import contextlib
import logging
import struct
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import rocksdict

from pqcnet._util.rocks import DurableWrites
from pqcnet.relayer.bus.base import Bus
from pqcnet.relayer.bus.embedded import delete_span, open_rocks
from pqcnet.relayer.errors import BusError, OverflowFull, RelayerError

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
        self._writes = DurableWrites(self._db, sync)
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
        self._writes.write(batch)
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

    def scan(self, shard: int) -> Iterator[bytes]:
        """Every record queued for ``shard``, oldest first, read lazily (the queue may
        hold :data:`MAX_OVERFLOW_RECORDS`); nothing is removed."""
        prefix = b"Q" + _U16.pack(shard)
        it = self._db.iter()
        it.seek(prefix + _U64.pack(self._head[shard]))
        while it.valid() and it.key()[:3] == prefix:
            yield cast(bytes, it.value())
            it.next()

    def remove(self, shard: int, count: int) -> None:
        """Drop the ``count`` oldest records of ``shard`` (after they reached the bus)."""
        start = self._head[shard]
        delete_span(self._db, b"Q" + _U16.pack(shard), start, start + count)
        self._head[shard] = start + count

    def close(self) -> None:
        """Close the database."""
        self._db.close()


@dataclass(frozen=True, slots=True)
class Accepted:
    """Where an accepted batch went."""

    #: True: the local overflow queue; False: the bus
    overflowed: bool


_ON_BUS = Accepted(False)
_OVERFLOWED = Accepted(True)


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
        #: requests of several shards waiting for the cross-shard group commit
        self._pending_many: deque[tuple[Mapping[int, Sequence[bytes]],
                                        asyncio.Future[dict[int, Accepted]]]] = deque()
        self._flushing_many = False

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

    async def publish_many(self, batches: Mapping[int, Sequence[bytes]]
                           ) -> dict[int, Accepted | RelayerError]:
        """:meth:`publish` for the records of several shards (one ingress request): per
        shard, where its records went or why they were refused (another exception is
        raised).

        On a bus that writes several shards at once (:attr:`Bus.batched_shards`, the
        embedded log) the group commit spans shards: while one write is in flight, later
        requests wait and go out together in the next — one durable write for many
        requests of many shards, instead of one per shard per request. Otherwise each
        shard goes through :meth:`publish` (its own group commit), concurrently.
        """
        if not self.bus.batched_shards:
            shards = list(batches)
            got = await asyncio.gather(*(self.publish(s, batches[s]) for s in shards),
                                       return_exceptions=True)
            for r in got:  # a bug is not a refusal
                if isinstance(r, BaseException) and not isinstance(r, RelayerError):
                    raise r
            return dict(zip(shards, cast(list[Accepted | RelayerError], got), strict=True))
        fut: asyncio.Future[dict[int, Accepted]] = asyncio.get_running_loop().create_future()
        self._pending_many.append((batches, fut))
        if not self._flushing_many:
            self._flushing_many = True
            task = asyncio.create_task(self._flush_many())
            self._flushers.add(task)
            task.add_done_callback(self._flushers.discard)
        try:
            return dict(await asyncio.shield(fut))
        except RelayerError as exc:  # one write for all shards: the same outcome for each
            return dict.fromkeys(batches, exc)

    async def _flush_many(self) -> None:
        pending = self._pending_many
        try:
            while pending:
                items: list[tuple[Mapping[int, Sequence[bytes]],
                                  asyncio.Future[dict[int, Accepted]]]] = []
                merged: dict[int, list[bytes]] = {}
                count = 0
                while pending and (not items or count < MAX_COALESCE):
                    batches, fut = pending.popleft()
                    items.append((batches, fut))
                    for shard, records in batches.items():  # arrival order per shard
                        merged.setdefault(shard, []).extend(records)
                        count += len(records)
                try:
                    acc = await self._publish_now_many(merged)
                except Exception as exc:
                    for _, f in items:
                        if not f.done():
                            f.set_exception(exc)
                    continue
                for batches, f in items:
                    if not f.done():
                        f.set_result({s: acc[s] for s in batches})
        finally:
            self._flushing_many = False

    async def _publish_now_many(self, merged: dict[int, list[bytes]]) -> dict[int, Accepted]:
        """One bus write for the shards with nothing queued in overflow; the others (and
        all of them when the bus is down or slow) go to the overflow queue. The queue's
        bound is checked for all of them before anything is written (a request is taken
        whole or refused whole, except after a bus write that timed out — which may have
        landed, as with :meth:`publish`)."""
        shards = sorted(merged)
        async with contextlib.AsyncExitStack() as held:
            for shard in shards:  # ascending: never a lock cycle with another holder
                await held.enter_async_context(self._locks[shard])
            direct = {} if self.bus_down else {
                s: merged[s] for s in shards if self.queue.depth(s) == 0}
            self._check_room(merged, [s for s in shards if s not in direct])
            if direct:
                try:
                    async with asyncio.timeout(self.publish_timeout):
                        await self.bus.publish_many(direct)
                except (TimeoutError, BusError) as exc:
                    if isinstance(exc, BusError) and not exc.retriable:
                        raise
                    self.bus_down = True
                    log.warning("bus unavailable: using overflow queue",
                                extra={"shards": len(direct), "error": str(exc) or "timeout"})
                    direct = {}
                    self._check_room(merged, shards)
            out = dict.fromkeys(direct, _ON_BUS)
            for shard in shards:
                if shard not in direct:
                    self.queue.append(shard, merged[shard])
                    out[shard] = _OVERFLOWED
                    self._kick.set()
            return out

    def _check_room(self, merged: Mapping[int, Sequence[bytes]], shards: Sequence[int]) -> None:
        need = sum(len(merged[s]) for s in shards)
        if need and self.queue.total() + need > self.queue.max_records:
            raise OverflowFull(f"overflow queue holds {self.queue.total()} records "
                               f"(bound {self.queue.max_records}); retry later")

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
