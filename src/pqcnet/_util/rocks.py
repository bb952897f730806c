"""Durable RocksDB writes that do not stop the rest of the process during the fsync.

rocksdict keeps the GIL through a write made with ``WriteOptions.sync = True``: for the
whole fsync of the WAL no other thread of the process runs Python. Measured here
(2026-12-07, ``benchmarks/README.md``): a thread doing synced 300-byte writes in a loop
left a ticking main thread stalled for 1.9 s of 2 s, with single stalls of 290 ms;
in the CA service, that write was 35 % of all samples holding the GIL. The same write
without ``sync`` followed by ``flush_wal(True)`` — RocksDB's ``FlushWAL`` with
``SyncWAL``: everything written so far is in the WAL file and fsynced, like a synced
write, when it returns — releases the GIL while it syncs: the ticking thread stalled
0.03 s of 2 s.

So every store that offers ``sync`` writes through :class:`DurableWrites`, which does
both steps: a store cannot write and forget the sync.
"""

from __future__ import annotations

from rocksdict import Rdict, WriteBatch, WriteOptions


class DurableWrites:
    """The writes of one store to its RocksDB database; with ``sync`` each is durable
    (power-loss safe) when it returns. Without, a process crash still loses nothing
    (the WAL is in the page cache)."""

    __slots__ = ("_db", "_options", "sync")

    def __init__(self, db: Rdict, sync: bool) -> None:
        self._db = db
        self.sync = sync
        self._options = WriteOptions()
        self._options.sync = False  # the sync is flush_wal's (module docstring)

    def write(self, batch: WriteBatch) -> None:
        self._db.write(batch, self._options)
        self._synced()

    def put(self, key: bytes, value: bytes) -> None:
        self._db.put(key, value, self._options)
        self._synced()

    def delete(self, key: bytes) -> None:
        self._db.delete(key, self._options)
        self._synced()

    def _synced(self) -> None:
        if self.sync:
            self._db.flush_wal(True)


__all__ = ["DurableWrites"]
