"""Embedded bus: a partitioned append-only log in RocksDB with consumer-group offsets.

The default for single-node use and ``make demo``. Keys (all big-endian so RocksDB's
byte order is log order)::

    b"L" shard:u16 offset:u64   -> record
    b"H" shard:u16              -> next offset to assign (head)
    b"G" shard:u16 group        -> committed offset (first unacked)

A publish writes records and the new head in one ``WriteBatch``, so a crash (even
SIGKILL) leaves either all of a batch or none of it; ``sync=True`` additionally
fsyncs the WAL for power loss. Commits are single puts, and kept in memory too (this
process is the database's only writer). Records below the minimum committed offset of
every group are deleted (``retain_acked=False``) from where the last trim stopped,
with point deletes when the span is short (:func:`delete_span` says why).

RocksDB allows one process per database, so this backend is single-process; a
publish resolves the futures of consumers blocked on its shard, so they wake without
polling (a bare future and a timer, not ``asyncio.wait_for``, which wraps every wait
in a task: one idle shard worker's wake-up cost several loop rounds).

Consumers read just-published records from a small in-memory *tail* of each shard
(the last records written, bounded by :data:`TAIL_RECORDS` and :data:`TAIL_BYTES`)
instead of opening a RocksDB iterator per consume call: records are immutable once
written and the tail is appended to only after the ``WriteBatch`` succeeded, so it
always mirrors ``[head - len(tail), head)`` of the log. A reader behind the tail
(restart, slow group) falls back to the iterator.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import rocksdict

from pqcnet._util.rocks import DurableWrites
from pqcnet.relayer.bus.base import Bus, Delivery, Offset, Wakeups
from pqcnet.relayer.errors import BusError
from pqcnet.relayer.frame import slot_setters

_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
#: groups a shard may have; bounds the per-shard cursor table
MAX_GROUPS = 64
_DELIVERY_SET = slot_setters(Delivery, "shard", "offset", "data")
_new = object.__new__


def _delivery(shard: int, offset: int, data: bytes,
              _set: tuple[Callable[[Any, Any], None], ...] = _DELIVERY_SET) -> Delivery:
    """``Delivery(shard, offset, data)``, cheaper (see ``frame.slot_setters``)."""
    d: Delivery = _new(Delivery)
    _set[0](d, shard)
    _set[1](d, offset)
    _set[2](d, data)
    return d


#: records kept in memory per shard for consumers that keep up (see module docstring)
TAIL_RECORDS = 2048
#: bytes of record data kept in memory per shard; bounds the tail with large payloads
TAIL_BYTES = 512 * 1024


#: a deletion of at most this many keys writes point tombstones (see :func:`delete_span`)
POINT_DELETES_MAX = 4096


def delete_span(db: rocksdict.Rdict, prefix: bytes, start: int, end: int) -> None:
    """Delete the keys ``prefix + u64(n)`` for ``start <= n < end`` (not fsynced: a
    deletion lost in a crash is repeated by the next one).

    Not always one ``delete_range``: RocksDB keeps range tombstones in the memtable
    and fragments them again on the first read after each new one, so a steady
    trickle of small range deletes (a trim per shard per second) makes every read
    cost O(tombstones) and the whole run O(n²) until the memtable flushes, which at
    low traffic takes an hour. Measured (benchmarks/README, "Trims that slowed down
    with time"): 300 rounds of one record, ack and trim on each of 32 shards took
    54.7 s with a range from offset 0 per trim and 0.13 s like this. So a short span
    is point deletes in one batch, and only a long one (a restart's first trim, a
    drained backlog) one range tombstone.
    """
    if end <= start:
        return
    if end - start > POINT_DELETES_MAX:
        db.delete_range(prefix + _U64.pack(start), prefix + _U64.pack(end))
        return
    batch = rocksdict.WriteBatch(raw_mode=True)
    pack = _U64.pack
    for n in range(start, end):
        batch.delete(prefix + pack(n))
    db.write(batch)


def open_rocks(path: str | Path) -> rocksdict.Rdict:
    """Open (creating) a raw-bytes RocksDB; a clear :class:`BusError` if it is locked."""
    Path(path).mkdir(parents=True, exist_ok=True)
    opts = rocksdict.Options(raw_mode=True)
    opts.create_if_missing(True)
    try:
        return rocksdict.Rdict(str(path), opts)
    except Exception as exc:  # rocksdict raises plain Exception on lock/corruption
        raise BusError(f"cannot open RocksDB at {path}: {exc}") from None


class EmbeddedBus(Bus):
    """RocksDB-backed partitioned log."""

    name = "embedded"
    batched_shards = True

    def __init__(self, path: str | Path, shards: int = 32, *, sync: bool = False) -> None:
        if shards < 1 or shards > 0xFFFF:
            raise ValueError("shards must be 1..65535")
        self._db = open_rocks(path)
        self._writes = DurableWrites(self._db, sync)
        self._shards = shards
        self._head = [self._load_int(b"H" + _U16.pack(s), 0) for s in range(shards)]
        self._read: dict[tuple[int, str], int] = {}  # in-memory read cursor per group
        #: the shard's head at a group's last rewind, until its cursor reached it
        self._catch_up: dict[tuple[int, str], int] = {}
        #: first offset not yet deleted, per shard (set by the first trim)
        self._trimmed: dict[int, int] = {}
        #: committed offset per (shard, group), as last written or read
        self._commits: dict[tuple[int, str], int] = {}
        #: consumers blocked on each shard (woken by a publish, a timeout or close)
        self._wakeups = Wakeups()
        self._tail: list[list[bytes]] = [[] for _ in range(shards)]
        self._tail_bytes = [0] * shards
        self._closed = False

    def _load_int(self, key: bytes, default: int) -> int:
        raw = self._db.get(key)
        return default if raw is None else int(_U64.unpack(raw)[0])

    def partitions(self) -> int:
        return self._shards

    def _check_open(self) -> None:
        if self._closed:
            raise BusError("embedded bus is closed")

    async def publish(self, shard: int, records: Sequence[bytes]) -> list[Offset]:
        self.check_shard(shard)
        start = self._head[shard]
        await self.publish_many({shard: records})
        return list(range(start, self._head[shard]))

    async def publish_many(self, batches: Mapping[int, Sequence[bytes]]) -> None:
        """Every shard's records in one RocksDB write batch: all durable, or none."""
        for shard in batches:
            self.check_shard(shard)
        self._check_open()
        batch = rocksdict.WriteBatch(raw_mode=True)
        pack = _U64.pack
        for shard, records in batches.items():
            if not records:
                continue
            prefix = b"L" + _U16.pack(shard)
            start = self._head[shard]
            for i, rec in enumerate(records, start):
                batch.put(prefix + pack(i), rec)
            batch.put(b"H" + _U16.pack(shard), pack(start + len(records)))
        self._writes.write(batch)
        for shard, records in batches.items():
            if records:
                self._head[shard] += len(records)
                self._remember(shard, records)
                self._wakeups.wake(shard)

    def _remember(self, shard: int, records: Sequence[bytes]) -> None:
        """Append durable records to the shard's tail; past a bound, keep the newer half."""
        tail = self._tail[shard]
        tail.extend(records)
        self._tail_bytes[shard] += sum(map(len, records))
        if len(tail) > TAIL_RECORDS or self._tail_bytes[shard] > TAIL_BYTES:
            keep, size = 0, 0  # newest records within half of each bound (amortised cut)
            for rec in reversed(tail):
                if keep >= TAIL_RECORDS // 2 or size + len(rec) > TAIL_BYTES // 2:
                    break
                keep, size = keep + 1, size + len(rec)
            del tail[: len(tail) - keep]
            self._tail_bytes[shard] = size

    def _forget_below(self, shard: int, offset: int) -> None:
        """Drop tail records below ``offset`` (they were deleted from the log)."""
        tail = self._tail[shard]
        cut = min(len(tail), offset - (self._head[shard] - len(tail)))
        if cut > 0:
            self._tail_bytes[shard] -= sum(map(len, tail[:cut]))
            del tail[:cut]

    def _committed(self, shard: int, group: str) -> int:
        """The group's committed offset, from memory after the first read: the trim
        and backpressure loops ask for every shard each second."""
        got = self._commits.get((shard, group))
        if got is None:
            got = self._load_int(b"G" + _U16.pack(shard) + group.encode(), 0)
            self._remember_commit(shard, group, got)
        return got

    def _remember_commit(self, shard: int, group: str, offset: int) -> None:
        """Cache a committed offset; at most shards * MAX_GROUPS entries (a caller asking
        for ever new group names reads RocksDB instead)."""
        if (shard, group) in self._commits or len(self._commits) < self._shards * MAX_GROUPS:
            self._commits[shard, group] = offset

    def interrupt(self, shard: int) -> None:
        self._wakeups.wake(shard)

    async def consume(
        self, shard: int, group: str, *, max_records: int = 512, block: float = 0.5
    ) -> list[Delivery]:
        self.check_shard(shard)
        self._check_open()
        key = (shard, group)
        if key not in self._read:
            if len({g for s, g in self._read if s == shard}) >= MAX_GROUPS:
                raise BusError(f"shard {shard} already has {MAX_GROUPS} groups")
            self._read[key] = self._committed(shard, group)
        if self._read[key] >= self._head[shard]:
            await self._wakeups.wait(shard, block)
            self._check_open()
            if self._read[key] >= self._head[shard]:  # timed out
                return []
        pos = self._read[key]
        head = self._head[shard]
        end = min(head, pos + max_records)
        tail = self._tail[shard]
        first = head - len(tail)
        if pos >= first:  # all of it is in the in-memory tail: no RocksDB read
            out = [_delivery(shard, off, rec)
                   for off, rec in zip(range(pos, end), tail[pos - first : end - first])]
            if out:
                self._read[key] = end
            return out
        prefix = b"L" + _U16.pack(shard)
        out = []
        it = self._db.iter()
        it.seek(prefix + _U64.pack(pos))
        while it.valid() and len(out) < end - pos:
            k = it.key()
            if not k.startswith(prefix):
                break
            out.append(Delivery(shard, int(_U64.unpack(k[3:])[0]), it.value()))
            it.next()
        if out:
            self._read[key] = int(out[-1].offset) + 1
        return out

    async def ack(self, shard: int, group: str, deliveries: Sequence[Delivery]) -> None:
        self.check_shard(shard)
        self._check_open()
        if not deliveries:
            return
        upto = max(int(d.offset) for d in deliveries) + 1
        self._writes.put(b"G" + _U16.pack(shard) + group.encode(), _U64.pack(upto))
        self._remember_commit(shard, group, upto)

    async def lag(self, shard: int, group: str) -> int:
        self.check_shard(shard)
        self._check_open()
        return self._head[shard] - self._committed(shard, group)

    def trim(self, shard: int, groups: Sequence[str]) -> int:
        """Delete records every group in ``groups`` has acked; returns the new log start."""
        low = min((self._committed(shard, g) for g in groups), default=0)
        start = self._trimmed.get(shard)
        if start is None:
            start = self._trimmed[shard] = self._log_start(shard)
        if low > start:
            delete_span(self._db, b"L" + _U16.pack(shard), start, low)
            self._trimmed[shard] = low
            self._forget_below(shard, low)
        return low

    def _log_start(self, shard: int) -> int:
        """The shard's first record still stored (its head if none is)."""
        prefix = b"L" + _U16.pack(shard)
        it = self._db.iter()
        it.seek(prefix)
        if it.valid() and it.key()[:3] == prefix:
            return int(_U64.unpack(it.key()[3:])[0])
        return self._head[shard]

    async def compact(self, shard: int, groups: Sequence[str]) -> None:
        self.trim(shard, groups)

    async def rewind(self, shard: int, group: str) -> None:
        self._read.pop((shard, group), None)
        if self._committed(shard, group) < self._head[shard]:
            self._catch_up[shard, group] = self._head[shard]
        else:
            self._catch_up.pop((shard, group), None)

    def caught_up(self, shard: int, group: str) -> bool:
        end = self._catch_up.get((shard, group))
        if end is None:
            return True
        if self._read.get((shard, group), 0) < end:
            return False
        del self._catch_up[shard, group]
        return True

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wakeups.wake_all()  # blocked consumers wake and see the closed bus
        self._db.close()
