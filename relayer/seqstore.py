"""Where a shard worker persists its dedup high-water marks (``next_seq`` per topic).

Persisting ``next_seq`` after delivery and *before* acking the bus is what makes
duplicate suppression survive a restart: a replayed record below the mark is
recognised as already delivered. Two implementations behind one small protocol:
RocksDB (embedded and Kafka backends; node-local) and a Redis hash per shard
(Redis backend, so any relayer taking over the shard sees the same marks).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import redis.asyncio as aioredis
import rocksdict

from relayer.bus.embedded import open_rocks
from relayer.errors import BusUnavailable
from relayer.frame import Topic, topic_from_key, topic_key

_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")


class SeqStore(Protocol):
    """Durable map shard -> topic -> next_seq."""

    async def load(self, shard: int) -> dict[Topic, int]:
        """All marks of ``shard``."""
        ...

    async def save(self, shard: int, marks: Mapping[Topic, int]) -> None:
        """Durably update marks of ``shard``."""
        ...


class RocksSeqStore:
    """Marks in RocksDB under ``b"S" shard:u16 topic_key``."""

    def __init__(self, path: str | Path | None = None, *, db: rocksdict.Rdict | None = None,
                 sync: bool = False) -> None:
        if db is None:
            if path is None:
                raise ValueError("RocksSeqStore needs a path or an open db")
            db = open_rocks(path)
            self._owned = True
        else:
            self._owned = False
        self._db = db
        self._wo = rocksdict.WriteOptions()
        self._wo.sync = sync

    async def load(self, shard: int) -> dict[Topic, int]:
        prefix = b"S" + _U16.pack(shard)
        out: dict[Topic, int] = {}
        it = self._db.iter()
        it.seek(prefix)
        while it.valid() and it.key().startswith(prefix):
            out[topic_from_key(it.key()[3:])] = int(_U64.unpack(it.value())[0])
            it.next()
        return out

    async def save(self, shard: int, marks: Mapping[Topic, int]) -> None:
        if not marks:
            return
        prefix = b"S" + _U16.pack(shard)
        batch = rocksdict.WriteBatch(raw_mode=True)
        for topic, nxt in marks.items():
            batch.put(prefix + topic_key(topic), _U64.pack(nxt))
        self._db.write(batch, self._wo)

    def close(self) -> None:
        """Close the database if this store opened it."""
        if self._owned:
            self._db.close()


class RedisSeqStore:
    """Marks in one Redis hash per shard: ``{prefix}:seq:{shard}`` topic_key -> next_seq."""

    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        self._r = client
        self._prefix = prefix

    def key(self, shard: int) -> str:
        """The hash holding ``shard``'s marks."""
        return f"{self._prefix}:seq:{shard}"

    async def load(self, shard: int) -> dict[Topic, int]:
        try:
            raw = await self._r.hgetall(self.key(shard))
        except (aioredis.ConnectionError, aioredis.TimeoutError) as exc:
            raise BusUnavailable(f"redis unavailable loading marks: {exc}") from None
        return {topic_from_key(_b(k)): int(v) for k, v in raw.items()}

    async def save(self, shard: int, marks: Mapping[Topic, int]) -> None:
        if not marks:
            return
        mapping = {topic_key(t): n for t, n in marks.items()}
        try:
            await self._r.hset(self.key(shard), mapping=mapping)  # type: ignore[arg-type]
        except (aioredis.ConnectionError, aioredis.TimeoutError) as exc:
            raise BusUnavailable(f"redis unavailable saving marks: {exc}") from None


def _b(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()
