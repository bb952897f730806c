"""An in-memory store behind the real QS-DAG ledger (one per simulated validator).

:class:`pqcnet.qsdag.Ledger` takes its :class:`~pqcnet.qsdag.store.Store` as a
constructor argument; this is the same interface on sorted in-memory column families,
so the ledger's rules, orphan handling, views and slashing run unchanged. A thousand
RocksDB instances would cost file handles and memtables for nothing a simulation needs.

Batches are atomic exactly like the RocksDB ones: nothing is visible until
:meth:`MemoryStore.commit`, and the ``after_commit`` hooks run after it. The store object
survives a simulated crash (it is the node's disk): a restarted node reopens a fresh
``Ledger`` on it and the ledger reloads its state as from RocksDB.

Checksums are not kept (they detect disk damage, which is not simulated).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from pathlib import Path

from pqcnet.qsdag.store import COLUMN_FAMILIES, Batch, Store


class MemoryBatch(Batch):
    """Writes collected for one atomic commit (no RocksDB WriteBatch underneath)."""

    def __init__(self) -> None:
        self.pending = {}
        self._after: list[Callable[[], None]] = []

    def put(self, cf: str, key: bytes, value: bytes) -> None:
        self.pending[(cf, key)] = value

    def delete(self, cf: str, key: bytes) -> None:
        self.pending[(cf, key)] = None


class _Family:
    __slots__ = ("data", "keys")

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.keys: list[bytes] = []

    def put(self, key: bytes, value: bytes) -> None:
        if key not in self.data:
            bisect.insort(self.keys, key)
        self.data[key] = value

    def delete(self, key: bytes) -> None:
        if self.data.pop(key, None) is not None:
            del self.keys[bisect.bisect_left(self.keys, key)]


class MemoryStore(Store):
    """The ledger's column families in memory, key-ordered like RocksDB."""

    def __init__(self) -> None:  # the parent opens RocksDB; this holds dicts instead
        self.path = Path("<memory>")
        self._fams = {cf: _Family() for cf in COLUMN_FAMILIES}

    def get(self, cf: str, key: bytes) -> bytes | None:
        return self._fams[cf].data.get(key)

    def has(self, cf: str, key: bytes) -> bool:
        return key in self._fams[cf].data

    def items(self, cf: str, prefix: bytes = b"", *,
              start: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        fam = self._fams[cf]
        first = start if start is not None else prefix
        keys = fam.keys[bisect.bisect_left(fam.keys, first):] if first else list(fam.keys)
        for key in keys:
            if prefix and not key.startswith(prefix):
                break
            value = fam.data.get(key)
            if value is not None:
                yield key, value

    def keys(self, cf: str, prefix: bytes = b"") -> Iterator[bytes]:
        for key, _ in self.items(cf, prefix):
            yield key

    def raw_put(self, cf: str, key: bytes, raw: bytes) -> None:
        self._fams[cf].put(key, raw)

    def raw_get(self, cf: str, key: bytes) -> bytes | None:
        return self._fams[cf].data.get(key)

    def batch(self) -> Batch:
        return MemoryBatch()

    def commit(self, batch: Batch) -> None:
        for (cf, key), value in batch.pending.items():
            if value is None:
                self._fams[cf].delete(key)
            else:
                self._fams[cf].put(key, value)
        for fn in batch._after:
            fn()

    def clear(self, cf: str) -> None:
        self._fams[cf] = _Family()

    def close(self) -> None:
        """Nothing to release: the data is the simulated node's disk and stays."""
