"""Where a shard worker persists its dedup high-water marks (``next_seq`` per topic).

Persisting ``next_seq`` after delivery and *before* acking the bus is what makes
duplicate suppression survive a restart: a replayed record below the mark is
recognised as already delivered. The seq ranges a worker skipped (gaps) are written in
the same atomic write as the marks that move past them, so the gap fence refuses a
retry inside one after a restart, or at another relayer of the cluster, instead of
acknowledging it as a duplicate (docs/decisions/0012-late-frames.md).
Two implementations behind one small protocol:
RocksDB (embedded and Kafka backends; node-local) and a Redis hash per shard
(Redis backend, so any relayer taking over the shard sees the same marks). On the
Redis backend the bus's acknowledgement of the batch rides in the same script as its
marks (:class:`StreamAck`): one round trip per batch fewer, and a crash can no longer
fall between the two writes.
"""

from __future__ import annotations

import re
import struct
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import redis.asyncio as aioredis
import rocksdict

from pqcnet._util.rocks import DurableWrites
from pqcnet.relayer.agreement import MEMBER_LUA, GapAgreement
from pqcnet.relayer.bus.embedded import open_rocks
from pqcnet.relayer.errors import BusUnavailable
from pqcnet.relayer.frame import Topic, topic_from_key, topic_key
from pqcnet.relayer.gapfence import MAX_RANGES_PER_TOPIC, SeqRanges
from pqcnet.relayer.metering import VolumeDelta

_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
_VOLKEY = struct.Struct(">QB")  # epoch, qos (then the topic key)
_VOLVAL = struct.Struct(">QQ")  # bytes, frames (cumulative)
#: volume totals a RocksDB store keeps in memory (LRU, ≈ 170 B each); the rest are read
#: back from the database when next updated. Without a bound every (epoch, customer,
#: channel, qos) ever metered stayed in memory until its epoch was pruned.
VOL_CACHE = 65_536
# KEYS lease (any key when unfenced), marks hash, volb, volf, landed, gaps hash, pending
# hash, acked zset (decision 0020), stream (the acknowledged entries' stream, or any key);
# ARGV lease value ('' = unfenced), token, shard, n marks, (topic, next) * n, n gaps,
# (topic, ranges) * g, n done, topic * d (pending ranges the marks now pass), n acks,
# group, entry id * a (XACK, last: after the marks), then (field, bytes, frames) * k.
# Nothing is written unless the lease is ours. The markers below each saved mark are
# deleted (they were read).
_SAVE = MEMBER_LUA + """
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] ~= '' then redis.call('HSET', KEYS[5], ARGV[3], ARGV[2]) end
local i = 4
if redis.call('EXISTS', KEYS[8]) == 1 then
  for j = i + 1, i + 2 * tonumber(ARGV[i]), 2 do
    local s = ARGV[j + 1]
    redis.call('ZREMRANGEBYLEX', KEYS[8], '[' .. ARGV[j], '(' .. member(ARGV[j], s))
  end
end
for _, key in ipairs({KEYS[2], KEYS[6]}) do
  local n = tonumber(ARGV[i])
  i = i + 1
  while n > 0 do
    local m = math.min(n, 200)
    redis.call('HSET', key, unpack(ARGV, i, i + 2 * m - 1))
    i = i + 2 * m
    n = n - m
  end
end
local d = tonumber(ARGV[i])
if d > 0 then redis.call('HDEL', KEYS[7], unpack(ARGV, i + 1, i + d)) end
i = i + 1 + d
local a = tonumber(ARGV[i])
local group = ARGV[i + 1]
i = i + 2
local acks = i
i = i + a
while i <= #ARGV do
  redis.call('HINCRBY', KEYS[3], ARGV[i], ARGV[i + 1])
  redis.call('HINCRBY', KEYS[4], ARGV[i], ARGV[i + 2])
  i = i + 3
end
while a > 0 do
  local m = math.min(a, 200)
  redis.call('XACK', KEYS[9], group, unpack(ARGV, acks, acks + m - 1))
  acks = acks + m
  a = a - m
end
return 1
"""


@dataclass(frozen=True, slots=True)
class StreamAck:
    """``XACK`` of stream entries, made by :meth:`RedisSeqStore.save` in the same script
    as the marks (after them): what a Redis bus gives its own store instead of acking
    on its own (:meth:`~pqcnet.relayer.bus.base.Bus.ack_in_store`)."""

    stream: str
    group: str
    ids: tuple[str, ...]


def _pack_ranges(ranges: SeqRanges) -> bytes:
    """Skipped ranges as ``lo-hi,lo-hi`` (ASCII: readable with ``redis-cli``)."""
    return b",".join(b"%d-%d" % r for r in ranges)


def _unpack_ranges(raw: bytes | str) -> SeqRanges:
    out: SeqRanges = []
    for part in _b(raw).split(b","):
        lo, _, hi = part.partition(b"-")
        out.append((int(lo), int(hi)))
    return out


def _merged(old: bytes | str | None, new: SeqRanges) -> bytes:
    """Recorded ranges plus ``new`` (one already there, reserved before the skip, is not
    added twice), the most recent :data:`MAX_RANGES_PER_TOPIC` kept."""
    ranges = _unpack_ranges(old) if old else []
    ranges += [r for r in new if r not in ranges]
    return _pack_ranges(ranges[-MAX_RANGES_PER_TOPIC:])


def _volkey(epoch: int, customer: str, channel: str, qos: int) -> bytes:
    return _VOLKEY.pack(epoch, qos) + topic_key((customer, channel))


def _unvolkey(raw: bytes) -> tuple[int, str, str, int]:
    epoch, qos = _VOLKEY.unpack_from(raw)
    customer, channel = topic_from_key(raw[_VOLKEY.size:])
    return int(epoch), customer, channel, int(qos)


class SeqStore(Protocol):
    """Durable map shard -> topic -> next_seq, plus this node's delivered volume."""

    async def load(self, shard: int) -> dict[Topic, int]:
        """All marks of ``shard`` (tools and tests; workers use :meth:`load_topics`)."""
        ...

    async def load_topics(self, shard: int, topics: Sequence[Topic]) -> dict[Topic, int]:
        """The marks of just ``topics`` in ``shard`` (topics without one are absent)."""
        ...

    async def save(self, shard: int, marks: Mapping[Topic, int],
                   volume: VolumeDelta | None = None, *, token: bytes = b"",
                   gaps: Mapping[Topic, SeqRanges] | None = None,
                   ack: StreamAck | None = None) -> None:
        """Durably update marks of ``shard``, add ``volume`` and record the skipped
        ``gaps`` (new ranges per topic; the most recent :data:`MAX_RANGES_PER_TOPIC` are
        kept), in one atomic write; a non-empty ``token`` is recorded in the same write
        (:meth:`landed`). One writer per shard (a lease or the group protocol), so the
        gaps' read-modify-write is safe. ``ack``: stream entries acknowledged in the same
        write, after the marks (only a store on the bus's own Redis is given one)."""
        ...

    async def load_gaps(self, shard: int, topics: Sequence[Topic]) -> dict[Topic, SeqRanges]:
        """The skipped ranges recorded for ``topics`` of ``shard`` (absent: none)."""
        ...

    async def landed(self, shard: int, token: bytes) -> bool:
        """Whether the last write of ``shard`` carrying a token carried ``token``: after a
        save that failed without telling whether it was applied (the connection closed
        under it), the worker asks this before counting the batch's volume."""
        ...

    async def load_volume(self) -> VolumeDelta:
        """Everything this node's workers have counted so far (for the meter at start)."""
        ...

    async def prune_volume(self, before_epoch: int) -> None:
        """Delete this node's persisted volume of epochs older than ``before_epoch``."""
        ...


class RocksSeqStore:
    """Marks in RocksDB under ``b"S" shard:u16 topic_key``."""

    def __init__(self, path: str | Path | None = None, *, db: rocksdict.Rdict | None = None,
                 sync: bool = False, vol_cache: int = VOL_CACHE) -> None:
        if db is None:
            if path is None:
                raise ValueError("RocksSeqStore needs a path or an open db")
            db = open_rocks(path)
            self._owned = True
        else:
            self._owned = False
        self._db = db
        self._writes = DurableWrites(self._db, sync)
        #: cache of the persisted totals this process wrote (one writer per shard, so
        #: a cached value is the database's); bounded by ``vol_cache``
        self._vol: OrderedDict[bytes, tuple[int, int]] = OrderedDict()
        self._vol_cache = vol_cache

    async def load(self, shard: int) -> dict[Topic, int]:
        prefix = b"S" + _U16.pack(shard)
        out: dict[Topic, int] = {}
        it = self._db.iter()
        it.seek(prefix)
        while it.valid() and it.key().startswith(prefix):
            out[topic_from_key(it.key()[3:])] = int(_U64.unpack(it.value())[0])
            it.next()
        return out

    async def load_topics(self, shard: int, topics: Sequence[Topic]) -> dict[Topic, int]:
        if not topics:
            return {}
        prefix = b"S" + _U16.pack(shard)
        raw: list[bytes | None] = self._db.get([prefix + topic_key(t) for t in topics]) or []
        return {t: int(_U64.unpack(v)[0]) for t, v in zip(topics, raw, strict=True)
                if v is not None}

    async def landed(self, shard: int, token: bytes) -> bool:
        return bool(token) and self._db.get(b"T" + _U16.pack(shard)) == token

    async def load_gaps(self, shard: int, topics: Sequence[Topic]) -> dict[Topic, SeqRanges]:
        if not topics:
            return {}
        prefix = b"G" + _U16.pack(shard)
        raw: list[bytes | None] = self._db.get([prefix + topic_key(t) for t in topics]) or []
        return {t: _unpack_ranges(v) for t, v in zip(topics, raw, strict=True) if v}

    async def save(self, shard: int, marks: Mapping[Topic, int],
                   volume: VolumeDelta | None = None, *, token: bytes = b"",
                   gaps: Mapping[Topic, SeqRanges] | None = None,
                   ack: StreamAck | None = None) -> None:
        if ack is not None:
            raise TypeError("a RocksDB store cannot acknowledge stream entries")
        if not marks and not volume and not gaps:
            return
        prefix = b"S" + _U16.pack(shard)
        batch = rocksdict.WriteBatch(raw_mode=True)
        if token:
            batch.put(b"T" + _U16.pack(shard), token)
        for topic, nxt in marks.items():
            batch.put(prefix + topic_key(topic), _U64.pack(nxt))
        for topic, ranges in (gaps or {}).items():
            key = b"G" + _U16.pack(shard) + topic_key(topic)
            batch.put(key, _merged(self._db.get(key), ranges))
        updated: dict[bytes, tuple[int, int]] = {}
        for (epoch, customer, channel, qos), (nbytes, nframes) in (volume or {}).items():
            # one writer per shard, so read-modify-write of the shard's own totals is safe
            key = b"V" + _U16.pack(shard) + _volkey(epoch, customer, channel, qos)
            cur = self._vol.get(key)
            if cur is None:
                raw = self._db.get(key)
                cur = (0, 0) if raw is None else _VOLVAL.unpack(raw)
            updated[key] = (cur[0] + nbytes, cur[1] + nframes)
            batch.put(key, _VOLVAL.pack(*updated[key]))
        self._writes.write(batch)
        for key, total in updated.items():
            self._vol[key] = total
            self._vol.move_to_end(key)
        while len(self._vol) > self._vol_cache:
            self._vol.popitem(last=False)

    async def load_volume(self) -> VolumeDelta:
        out: VolumeDelta = {}
        it = self._db.iter()
        it.seek(b"V")
        while it.valid() and it.key()[:1] == b"V":
            key = _unvolkey(it.key()[3:])
            b, f = _VOLVAL.unpack(it.value())
            agg = out.setdefault(key, [0, 0])
            agg[0] += b
            agg[1] += f
            it.next()
        return out

    async def prune_volume(self, before_epoch: int) -> None:
        batch = rocksdict.WriteBatch(raw_mode=True)
        it = self._db.iter()
        it.seek(b"V")
        while it.valid() and it.key()[:1] == b"V":
            key = it.key()
            if _unvolkey(key[3:])[0] < before_epoch:
                batch.delete(key)
                self._vol.pop(key, None)
            it.next()
        self._writes.write(batch)

    def close(self) -> None:
        """Close the database if this store opened it."""
        if self._owned:
            self._db.close()


def client_name(node_id: str, what: str) -> str:
    """The name a relayer's Redis connections carry (``CLIENT SETNAME`` on connect),
    so ``redis-cli CLIENT LIST`` tells whose they are: ``pqcnet-relayer:<node>:<what>``
    (a character Redis refuses in a name — a space, a newline — becomes ``_``)."""
    return re.sub(r"[^!-~]", "_", f"pqcnet-relayer:{node_id}:{what}")


class RedisSeqStore:
    """Marks in one Redis hash per shard: ``{prefix}:seq:{shard}`` topic_key -> next_seq.

    Volume goes to two hashes per node (``{prefix}:volb:{node}`` bytes and
    ``{prefix}:volf:{node}`` frames, ``HINCRBY``), written by the same Lua script as the
    marks: marks are shared by whoever owns a shard, volume is each relayer's own. The
    script also ends the gap agreement's pending ranges and markers the marks pass
    (:mod:`pqcnet.relayer.agreement`).

    With a ``fence`` (a Redis cluster's shard leases) the script first checks the
    shard's lease still holds our value: a relayer that lost the lease gets
    :class:`BusUnavailable` and neither moves the marks nor meters.
    """

    def __init__(self, client: aioredis.Redis, prefix: str, node_id: str = "relayer", *,
                 fence: Callable[[int], tuple[str, str] | None] | None = None) -> None:
        self._r = client
        self._prefix = prefix
        self._node = node_id
        self._fence = fence
        self._save = client.register_script(_SAVE)
        #: the cluster's per-frame agreement on gap skips (decision 0020), same keys
        self.agreement = GapAgreement(client, prefix, marks_key=self.key,
                                      gaps_key=self.gaps_key, fence=fence)

    @property
    def client(self) -> aioredis.Redis:
        """The Redis client (the node writes the ownership journal with it)."""
        return self._r

    async def aclose(self) -> None:
        """Close the Redis client (only a store that owns its client, e.g. a Kafka
        cluster's shared marks; the Redis bus closes its own)."""
        await self._r.aclose()

    def key(self, shard: int) -> str:
        """The hash holding ``shard``'s marks."""
        return f"{self._prefix}:seq:{shard}"

    def gaps_key(self, shard: int) -> str:
        """The hash holding ``shard``'s skipped ranges (topic_key -> ``lo-hi,...``)."""
        return f"{self._prefix}:gaps:{shard}"

    async def _hmget(self, key: str, topics: Sequence[Topic], what: str
                     ) -> list[bytes | str | None]:
        """``HMGET key`` for ``topics`` (one value or None each, in order)."""
        if not topics:
            return []
        try:
            return list(await self._r.hmget(key, [topic_key(t) for t in topics]))
        except (aioredis.ConnectionError, aioredis.TimeoutError) as exc:
            raise BusUnavailable(f"redis unavailable {what}: {exc}") from None

    async def load_gaps(self, shard: int, topics: Sequence[Topic]) -> dict[Topic, SeqRanges]:
        raw = await self._hmget(self.gaps_key(shard), topics, "loading gaps")
        return {t: _unpack_ranges(v) for t, v in zip(topics, raw, strict=True) if v}

    async def _gap_fields(self, shard: int, gaps: Mapping[Topic, SeqRanges] | None
                          ) -> dict[bytes, bytes]:
        """The gaps hash fields after adding ``gaps`` (read first: one writer per shard)."""
        if not gaps:
            return {}
        topics = list(gaps)
        old = await self._hmget(self.gaps_key(shard), topics, "saving gaps")
        return {topic_key(t): _merged(o, gaps[t]) for t, o in zip(topics, old, strict=True)}

    async def load(self, shard: int) -> dict[Topic, int]:
        try:
            raw = await self._r.hgetall(self.key(shard))
        except (aioredis.ConnectionError, aioredis.TimeoutError) as exc:
            raise BusUnavailable(f"redis unavailable loading marks: {exc}") from None
        return {topic_from_key(_b(k)): int(v) for k, v in raw.items()}

    async def load_topics(self, shard: int, topics: Sequence[Topic]) -> dict[Topic, int]:
        raw = await self._hmget(self.key(shard), topics, "loading marks")
        return {t: int(v) for t, v in zip(topics, raw, strict=True) if v is not None}

    def _token_key(self) -> str:
        return f"{self._prefix}:landed:{self._node}"

    async def landed(self, shard: int, token: bytes) -> bool:
        if not token:
            return False
        try:
            got = await self._r.hget(self._token_key(), str(shard))
        except (aioredis.ConnectionError, aioredis.TimeoutError) as exc:
            raise BusUnavailable(f"redis unavailable checking a write: {exc}") from None
        return got is not None and _b(got) == token.hex().encode()

    async def save(self, shard: int, marks: Mapping[Topic, int],
                   volume: VolumeDelta | None = None, *, token: bytes = b"",
                   gaps: Mapping[Topic, SeqRanges] | None = None,
                   ack: StreamAck | None = None) -> None:
        if not marks and not volume and not gaps and not (ack and ack.ids):
            return
        gap_fields = await self._gap_fields(shard, gaps)
        lease: tuple[str, str] | None = None
        if self._fence is not None:
            lease = self._fence(shard)
            if lease is None:
                raise BusUnavailable(f"shard {shard} is not leased here: marks not saved")
        args: list[bytes | str | int] = [lease[1] if lease else "", token.hex(), str(shard),
                                         len(marks)]
        for t, n in marks.items():
            args += [topic_key(t), n]
        args.append(len(gap_fields))
        for field, value in gap_fields.items():
            args += [field, value]
        done = [topic_key(t) for t in gaps or () if t in marks]
        args.append(len(done))
        args += done
        if ack is not None:
            args += [len(ack.ids), ack.group, *ack.ids]
        else:
            args += [0, ""]
        for (epoch, customer, channel, qos), (nbytes, nframes) in (volume or {}).items():
            args += [_volkey(epoch, customer, channel, qos), nbytes, nframes]
        keys = [lease[0] if lease else self.key(shard), self.key(shard),
                f"{self._prefix}:volb:{self._node}", f"{self._prefix}:volf:{self._node}",
                self._token_key(), self.gaps_key(shard), self.agreement.pending_key(shard),
                self.agreement.acked_key(shard), ack.stream if ack else self.key(shard)]
        try:
            ok = await self._save(keys=keys, args=args)
        except (aioredis.ConnectionError, aioredis.TimeoutError) as exc:
            raise BusUnavailable(f"redis unavailable saving marks: {exc}") from None
        if not int(ok):
            raise BusUnavailable(f"shard {shard}: lease lost, marks and volume not saved")

    async def load_volume(self) -> VolumeDelta:
        try:
            b = await self._r.hgetall(f"{self._prefix}:volb:{self._node}")
            f = await self._r.hgetall(f"{self._prefix}:volf:{self._node}")
        except (aioredis.ConnectionError, aioredis.TimeoutError) as exc:
            raise BusUnavailable(f"redis unavailable loading volume: {exc}") from None
        return {_unvolkey(_b(k)): [int(v), int(f.get(k, 0))] for k, v in b.items()}

    async def prune_volume(self, before_epoch: int) -> None:
        keys = (f"{self._prefix}:volb:{self._node}", f"{self._prefix}:volf:{self._node}")
        try:
            for key in keys:
                old = [k async for k, _ in self._r.hscan_iter(key)
                       if _unvolkey(_b(k))[0] < before_epoch]
                for i in range(0, len(old), 1000):
                    await self._r.hdel(key, *old[i : i + 1000])
        except (aioredis.ConnectionError, aioredis.TimeoutError) as exc:
            raise BusUnavailable(f"redis unavailable pruning volume: {exc}") from None


def _b(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()
