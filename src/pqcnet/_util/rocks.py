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

So every store that offers ``sync`` writes with :func:`unsynced` options and calls
:func:`sync_wal` after each write it must make durable.
"""

from __future__ import annotations

from typing import Protocol

from rocksdict import WriteOptions


class _Db(Protocol):
    def flush_wal(self, sync: bool) -> None: ...


def unsynced() -> WriteOptions:
    """Write options of a store that syncs with :func:`sync_wal` (never ``sync``)."""
    options = WriteOptions()
    options.sync = False
    return options


def sync_wal(db: _Db, sync: bool) -> None:
    """Make what was written to ``db`` so far durable when ``sync`` is set (power-loss
    safety); a process crash loses nothing either way (the WAL is in the page cache)."""
    if sync:
        db.flush_wal(True)


__all__ = ["sync_wal", "unsynced"]
