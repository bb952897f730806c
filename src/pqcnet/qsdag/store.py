"""The RocksDB seam: column families, checksummed values, atomic write batches.

Everything the ledger persists goes through :class:`Store`, the one place that
knows about ``rocksdict``. Three properties the ledger relies on:

* **Atomicity** — all effects of anchoring one vertex (the vertex, its metadata,
  children index, tips, author head, orphan removal, view rows) go into one
  :class:`Batch`, written as one RocksDB ``WriteBatch``; after a crash either all of
  them are there or none. With ``sync=False`` (default) a batch survives a killed
  process (it is in the WAL in the OS page cache) but not a power loss;
  ``sync=True`` fsyncs each write.
* **Grouping** — inside :meth:`Store.grouped` (a bulk import), committed batches are
  applied to an in-memory overlay that every read sees at once, and written together
  as one ``WriteBatch`` per group (:data:`GROUP_BATCHES` batches or
  :data:`GROUP_BYTES`, and when the block ends). Why: per vertex, the RocksDB write
  call, the ``WriteBatch`` object and the rows a later vertex of the group overwrites
  (tips, author heads, the next position) cost main-thread CPU that bulk import
  cannot spread across cores. A group holds whole batches only, so after a crash the
  store holds a prefix of the commits: every vertex complete or absent, as before;
  what a crash may lose is the unwritten tail of an import that had not returned.
* **Integrity** — every value is stored as ``blake2b-128(cf ‖ key ‖ value) ‖ value``;
  a value altered on disk (or moved under another key) raises
  :class:`~pqcnet.qsdag.errors.CorruptRecord` instead of being served. (Vertex ids are the
  security boundary; this checksum only detects storage damage.)
* **One place to close** — rocksdict keeps the DB open while any column-family
  handle lives, so the store owns all handles and drops them in :meth:`close`.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

from rocksdict import ColumnFamily, Options, Rdict, WriteBatch

from pqcnet._util.rocks import DurableWrites
from pqcnet.qsdag.errors import CorruptRecord, LedgerStateError

#: Column families and what they hold (keys → values).
COLUMN_FAMILIES: dict[str, str] = {
    "meta": "ledger-wide counters: next position, genesis id, network",
    "vertices": "vertex id → wire-encoded vertex",
    "vmeta": "vertex id → u64 depth ‖ u64 position ‖ u64 timestamp_ms",
    "positions": "u64 position → vertex id (anchoring order)",
    "children": "parent id ‖ child id → empty",
    "tips": "vertex id → empty (anchored vertices without children)",
    "heads": "author → u64 last counter",
    "by_author": "author ‖ 0x00 ‖ u64 counter → vertex id",
    "orphans": "vertex id → wire-encoded vertex waiting for parents/counters",
    "evidence": "evidence digest → SlashingEvidence protobuf",
    "keys": "node ‖ 0x00 ‖ u32 version → KeyRecord; node ‖ 0x01 → u32 current version",
    "v_relay": "view: node → relay record JSON",
    "v_att": "view: node ‖ 0x00 ‖ u64 counter → attestation JSON; node ‖ 0x01 → last counter",
    "v_route": "view: topic → route JSON",
    "v_policy": "view: policy hash → anchor JSON",
    "v_slash": "view: node → slash notices JSON (active and lifted)",
    "slash_tags": "view: vertex id → active slash ids in its ancestry (only if any)",
}
#: u64 rows and key parts: positions, author heads, counters, next position.
U64 = struct.Struct(">Q")
#: A ``vmeta`` value: depth, position, timestamp_ms.
VMETA = struct.Struct(">QQQ")
VIEW_FAMILIES = ("keys", "v_relay", "v_att", "v_route", "v_policy", "v_slash", "slash_tags")
#: Most batches one :meth:`Store.grouped` write holds (bounds what a crash can lose
#: of an import in progress, and the overlay's memory).
GROUP_BATCHES = 256
#: Most value bytes one grouped write holds (vertices may be up to ~270 KiB each).
GROUP_BYTES = 4 * 1024 * 1024
_SUM = 16


# blake2b state after absorbing the column-family name, one per family: copying a
# state is cheaper than re-hashing the prefix on every put/get (hot path).
_BASES = {cf: hashlib.blake2b(cf.encode(), digest_size=_SUM) for cf in COLUMN_FAMILIES}


def _checksum(cf: str, key: bytes, value: bytes) -> bytes:
    """blake2b-128(cf ‖ u32 len(key) ‖ key ‖ value)."""
    h = _BASES[cf].copy()
    h.update(len(key).to_bytes(4, "big") + key)
    h.update(value)
    return h.digest()


def _opts() -> Options:
    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    opts.create_missing_column_families(True)
    return opts


class Batch:
    """Writes collected for one atomic commit: the last value per (cf, key), None for
    a delete — exactly what applying the operations in order leaves."""

    __slots__ = ("_after", "pending", "size")

    def __init__(self) -> None:
        #: (cf, key) -> value or None (deleted): lets a batch read its own writes
        self.pending: dict[tuple[str, bytes], bytes | None] = {}
        self._after: list[Callable[[], None]] = []
        #: value bytes put (bounds a group)
        self.size = 0

    def after_commit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the batch is applied — written, or (inside
        :meth:`Store.grouped`) in the group every read sees. Write-through caches use
        this, so a failed commit never leaves a cache ahead of the store; a failed
        group write raises :class:`LedgerStateError` and the owner must re-read its
        caches (:meth:`Ledger.import_ <pqcnet.qsdag.ledger.Ledger.import_>` does)."""
        self._after.append(fn)

    def put(self, cf: str, key: bytes, value: bytes) -> None:
        self.pending[(cf, key)] = value
        self.size += len(value)

    def delete(self, cf: str, key: bytes) -> None:
        self.pending[(cf, key)] = None


class _Group:
    """Committed batches not written yet (:meth:`Store.grouped`)."""

    __slots__ = ("batches", "max_batches", "max_bytes", "pending", "size")

    def __init__(self, max_batches: int, max_bytes: int) -> None:
        self.pending: dict[tuple[str, bytes], bytes | None] = {}
        self.batches = 0
        self.size = 0
        self.max_batches = max_batches
        self.max_bytes = max_bytes


class Store:
    """A RocksDB database with the ledger's column families."""

    #: the open group of :meth:`grouped` (None: every commit is written at once)
    _group: _Group | None = None

    def __init__(self, path: str | Path, *, sync: bool = False) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            self._db = Rdict(str(self.path), _opts(),
                             column_families={cf: Options(raw_mode=True)
                                              for cf in COLUMN_FAMILIES})
        except Exception as exc:  # rocksdict raises plain Exception for IO/lock errors
            raise LedgerStateError(f"cannot open ledger at {self.path}: {exc}") from None
        self._cfs = {cf: self._db.get_column_family(cf) for cf in COLUMN_FAMILIES}
        self._handles: dict[str, ColumnFamily] = {
            cf: self._db.get_column_family_handle(cf) for cf in COLUMN_FAMILIES
        }
        self._writes = DurableWrites(self._db, sync)

    def _check(self, cf: str, key: bytes, raw: bytes) -> bytes:
        value = raw[_SUM:]
        if len(raw) < _SUM or raw[:_SUM] != _checksum(cf, key, value):
            raise CorruptRecord(f"stored value failed its checksum: {cf}/{key.hex()}")
        return value

    def get(self, cf: str, key: bytes) -> bytes | None:
        """The value under ``key`` or None; raises :class:`CorruptRecord` if damaged."""
        group = self._group
        if group is not None and (cf, key) in group.pending:
            return group.pending[(cf, key)]
        raw = self._cfs[cf].get(key)
        return None if raw is None else self._check(cf, key, raw)

    def has(self, cf: str, key: bytes) -> bool:
        group = self._group
        if group is not None and (cf, key) in group.pending:
            return group.pending[(cf, key)] is not None
        return self._cfs[cf].get(key) is not None

    def items(self, cf: str, prefix: bytes = b"", *,
              start: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        """Checked (key, value) pairs in key order, under ``prefix``, from ``start``."""
        self.flush()  # ordered reads come from RocksDB alone
        first = start if start is not None else prefix
        it = self._cfs[cf].items(from_key=first) if first else self._cfs[cf].items()
        for key, raw in it:
            assert isinstance(key, bytes) and isinstance(raw, bytes)
            if prefix and not key.startswith(prefix):
                break
            yield key, self._check(cf, key, raw)

    def keys(self, cf: str, prefix: bytes = b"") -> Iterator[bytes]:
        """Keys in order, optionally under ``prefix`` (values not read)."""
        self.flush()
        it = self._cfs[cf].keys(from_key=prefix) if prefix else self._cfs[cf].keys()
        for key in it:
            assert isinstance(key, bytes)
            if prefix and not key.startswith(prefix):
                break
            yield key

    def raw_put(self, cf: str, key: bytes, raw: bytes) -> None:
        """Write bytes without a checksum — only for corruption tests and tooling."""
        self.flush()
        self._cfs[cf][key] = raw

    def raw_get(self, cf: str, key: bytes) -> bytes | None:
        """Stored bytes including the checksum prefix."""
        self.flush()
        value: bytes | None = self._cfs[cf].get(key)
        return value

    def batch(self) -> Batch:
        return Batch()

    def commit(self, batch: Batch) -> None:
        """Apply a batch atomically (inside :meth:`grouped`: to the group, written
        with it; reads see it at once either way)."""
        group = self._group
        if group is None:
            self._write(batch.pending)
        else:
            group.pending.update(batch.pending)
            group.batches += 1
            group.size += batch.size
            if group.batches >= group.max_batches or group.size >= group.max_bytes:
                self.flush()
        for fn in batch._after:
            fn()

    def _write(self, rows: dict[tuple[str, bytes], bytes | None]) -> None:
        wb = WriteBatch(raw_mode=True)
        handles = self._handles
        for (cf, key), value in rows.items():
            if value is None:
                wb.delete(key, handles[cf])
            else:
                wb.put(key, _checksum(cf, key, value) + value, handles[cf])
        self._writes.write(wb)

    @contextlib.contextmanager
    def grouped(self, max_batches: int = GROUP_BATCHES,
                max_bytes: int = GROUP_BYTES) -> Iterator[None]:
        """Commits inside the block are written together, one ``WriteBatch`` per
        ``max_batches`` commits or ``max_bytes`` of values (module docstring);
        everything is written when the block ends, also when it ends with an
        exception. Not reentrant."""
        if self._group is not None:
            raise LedgerStateError("store commits are already grouped")
        if max_batches < 1 or max_bytes < 1:
            raise LedgerStateError(f"a group needs room for one commit, got "
                                   f"{max_batches} batches / {max_bytes} bytes")
        self._group = _Group(max_batches, max_bytes)
        try:
            yield
        finally:
            try:
                self.flush()
            finally:
                self._group = None

    def flush(self) -> None:
        """Write the open group's commits now (a no-op outside :meth:`grouped`)."""
        group = self._group
        if group is None or not group.pending:
            return
        rows, group.pending = group.pending, {}
        batches, group.batches, group.size = group.batches, 0, 0
        try:
            self._write(rows)
        except Exception as exc:  # rocksdict raises plain Exception for IO errors
            raise LedgerStateError(f"writing {batches} grouped commits to {self.path} "
                                   f"failed: {exc}") from None

    def clear(self, cf: str) -> None:
        """Delete every row of a column family (used by view rebuilds)."""
        batch = self.batch()
        for key in list(self.keys(cf)):
            batch.delete(cf, key)
        self.commit(batch)

    def close(self) -> None:
        """Flush and release the database (all handles are dropped)."""
        if getattr(self, "_db", None) is None:
            return
        try:
            self.flush()
        finally:
            self._cfs.clear()
            self._handles.clear()
            self._db.close()
            self._db = None  # type: ignore[assignment]
