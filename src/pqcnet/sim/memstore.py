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

**Copy-on-write base.** Every simulated node anchors the directives it applies in its
own ledger, so every node needs one, starting from the same onboarding state (genesis
plus every node's registration). ``MemoryStore(base=...)`` layers a node's writes over a
frozen base store that all nodes share: reads fall through to the base, writes and
deletes (tombstones) stay in the node's layer. A thousand ledgers then cost one copy of
the bootstrap vertices plus each node's own writes. The base must not be written after
layers are made on it.
"""

from __future__ import annotations

import bisect
import heapq
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
    """One column family: sorted keys, values; ``None`` marks a deletion over ``base``."""

    __slots__ = ("base", "data", "keys")

    def __init__(self, base: _Family | None = None) -> None:
        self.base = base
        self.data: dict[bytes, bytes | None] = {}
        self.keys: list[bytes] = []

    def get(self, key: bytes) -> bytes | None:
        if key in self.data:
            return self.data[key]
        return self.base.get(key) if self.base is not None else None

    def put(self, key: bytes, value: bytes) -> None:
        if key not in self.data:
            bisect.insort(self.keys, key)
        self.data[key] = value

    def delete(self, key: bytes) -> None:
        if self.base is not None and self.base.get(key) is not None:
            if key not in self.data:
                bisect.insort(self.keys, key)
            self.data[key] = None  # tombstone over the base
        elif key in self.data:
            del self.data[key]
            del self.keys[bisect.bisect_left(self.keys, key)]

    def ordered(self, first: bytes) -> Iterator[bytes]:
        """Keys (of this layer and the base, once each) from ``first`` on, in order."""
        mine = self.keys[bisect.bisect_left(self.keys, first):] if first else self.keys
        if self.base is None:
            yield from list(mine)
            return
        last = None
        for key in heapq.merge(list(mine), self.base.ordered(first)):
            if key != last:
                last = key
                yield key


class MemoryStore(Store):
    """The ledger's column families in memory, key-ordered like RocksDB; optionally a
    copy-on-write layer over a frozen ``base`` store."""

    def __init__(self, base: MemoryStore | None = None) -> None:
        # the parent opens RocksDB; this holds dicts instead
        self.path = Path("<memory>")
        self.base = base
        below: dict[str, _Family] = base._fams if base is not None else {}
        self._fams: dict[str, _Family] = {cf: _Family(below.get(cf)) for cf in COLUMN_FAMILIES}

    def get(self, cf: str, key: bytes) -> bytes | None:
        return self._fams[cf].get(key)

    def has(self, cf: str, key: bytes) -> bool:
        return self._fams[cf].get(key) is not None

    def items(self, cf: str, prefix: bytes = b"", *,
              start: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        fam = self._fams[cf]
        first = start if start is not None else prefix
        for key in fam.ordered(first):
            if prefix and not key.startswith(prefix):
                break
            value = fam.get(key)
            if value is not None:
                yield key, value

    def keys(self, cf: str, prefix: bytes = b"") -> Iterator[bytes]:
        for key, _ in self.items(cf, prefix):
            yield key

    def raw_put(self, cf: str, key: bytes, raw: bytes) -> None:
        self._fams[cf].put(key, raw)

    def raw_get(self, cf: str, key: bytes) -> bytes | None:
        return self._fams[cf].get(key)

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
