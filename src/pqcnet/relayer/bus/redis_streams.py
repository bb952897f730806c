"""Redis Streams bus: one stream per shard, consumer groups, reclaim, safe trimming.

* publish: up to ``entry_records`` records are packed into one stream entry
  (``u32 length ‖ record`` each), so a group-committed batch costs one ``XADD``
  instead of one per frame — client-side command packing and reply parsing are what
  bound Redis throughput from Python. A record's offset is ``"<entry id>/<i>/<n>"``.
  No MAXLEN on the write (trimming there could drop unacked entries). Durable when
  Redis runs with AOF ``appendfsync always``. A group commit of several shards is one
  pipeline (``publish_many``): one round trip, not one per shard.
* consume: first the consumer's own pending entries (``XREADGROUP ... 0``, what it
  read but never acked before a crash), then entries idle longer than
  ``claim_idle_ms`` in *other* consumers' PELs (``XAUTOCLAIM``: a dead relayer's
  work), then new entries (``>``, blocking). The blocking read of a (shard, group)
  runs on a connection of its own whose server-side id is known, so :meth:`interrupt`
  can end its wait from another connection (``CLIENT UNBLOCK``, which makes it return
  as if timed out: atomic in Redis, so no entry is delivered and dropped).
* ack: ``XACK`` of every entry whose *last* record is in the acked prefix (an entry
  half-acked at a crash is redelivered whole; the sequencer drops the repeats), then
  a trim every ``trim_every`` acked entries with ``XTRIM MINID`` set to the
  oldest entry any group still needs (its oldest pending id, or the entry after its
  last-delivered id). So ``max_len`` is a *target*: the stream is never trimmed past
  an unacked entry; if consumers stall it grows and the lag drives backpressure.
  ``lag`` counts entries in Redis and scales them by the mean records per entry this
  process has published (an estimate; exact when ``entry_records=1``).

Every call runs under ``op_timeout``; connection failures and timeouts become
:class:`BusUnavailable` (retriable), which the ingress turns into overflow.

Clusters (``lease`` set; ``pqcnet relayer run`` with no ``owned_shards``): N relayers
share the streams and split the shards through leases
(:class:`~pqcnet.relayer.bus.leases.ShardLeases`). ``publish`` goes to any shard;
``consume`` hands out records only of shards whose lease this relayer holds (others
wait and return nothing); a shard just claimed first makes its worker reset (its
marks are reloaded from Redis, where the previous owner left them), then takes every
entry of other consumers' PELs at once (``XAUTOCLAIM`` with no idle time: the lease
says their owner is gone or has handed the shard back) before reading new ones. The
marks and volume writes are fenced by the lease (:meth:`seq_store`).

In a cluster every read and claim is *fenced* too (decision 0024): ``XREADGROUP``,
``XAUTOCLAIM`` and ``XCLAIM`` run in one script with a check that this relayer's lease
of the shard is still in Redis (:meth:`_fenced`), so a relayer whose lease ran out —
paused between its lease check and its read, however long — reads nothing: no entry
lands in its PEL after the new owner took the shard over. Scripts cannot block, so a
``>`` read that drained the stream remembers the stream's last entry id, and the next
read first waits for an entry past it with a plain ``XREAD BLOCK`` (no side effect:
it moves no cursor and fills no PEL), then reads under the fence. A refused read drops
the shard here at once (:meth:`ShardLeases.lost`).

Relayers of an older version (a rolling upgrade) or a foreign client of the group can
still read unfenced, so an owner also sweeps, every ``lease`` seconds, the other
consumers' PELs of its shards and takes entries idle for two leases
(:meth:`_claim_stale`), handing them to its worker as they come (``XCLAIM`` returns
them), without re-reading its own PEL; a taken-over shard counts as caught up only
after the first sweep three leases after its claim.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from pqcnet._util.tasks import cancel_and_wait
from pqcnet.relayer.bus.base import Bus, Delivery, Offset
from pqcnet.relayer.bus.leases import ShardLeases
from pqcnet.relayer.errors import BusError, BusUnavailable
from pqcnet.relayer.seqstore import RedisSeqStore, SeqStore, StreamAck, client_name

T = TypeVar("T")
log = logging.getLogger(__name__)
_FIELD = b"d"
_U32 = struct.Struct(">I")
#: records packed into one stream entry at most
ENTRY_RECORDS = 256
#: CLIENT UNBLOCKs tried 10 ms apart while a read is on its way to Redis (≈ 0.2 s)
UNBLOCK_TRIES = 20

# KEYS[1] stream, KEYS[2] the shard's lease; ARGV[1] our lease value, ARGV[2] the op,
# then its arguments. {0} when the lease is not ours; else {1, reply...}.
#   read   group consumer count cursor [after] -> {1, entries, tail}: tail is the
#          stream's last entry id ('0-0': none) when a '>' read drained it, '' otherwise;
#          with ``after`` (an entry id) it reads only when an entry past it exists, and
#          otherwise returns {1, {}, after} without looking at the lease: a wait that
#          ended with nothing to read is not a read (as when the wait was its own call)
#   autoclaim group consumer min_idle start count -> {1, XAUTOCLAIM reply}
#   claim  group consumer min_idle id... -> {1, XCLAIM reply}
_FENCED = """
local op = ARGV[2]
if op == 'read' and ARGV[7]
   and not redis.call('XREAD', 'COUNT', 1, 'STREAMS', KEYS[1], ARGV[7]) then
  return {1, {}, ARGV[7]}
end
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return {0} end
if op == 'read' then
  local r = redis.call('XREADGROUP', 'GROUP', ARGV[3], ARGV[4], 'COUNT', ARGV[5],
                       'STREAMS', KEYS[1], ARGV[6])
  local entries = (r and r[1][2]) or {}
  local tail = ''
  if ARGV[6] == '>' and #entries < tonumber(ARGV[5]) then
    local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
    tail = (last[1] and last[1][1]) or '0-0'
  end
  return {1, entries, tail}
elseif op == 'autoclaim' then
  return {1, redis.call('XAUTOCLAIM', KEYS[1], ARGV[3], ARGV[4], ARGV[5], ARGV[6],
                        'COUNT', ARGV[7])}
elseif op == 'claim' then
  return {1, redis.call('XCLAIM', KEYS[1], ARGV[3], ARGV[4], ARGV[5], unpack(ARGV, 6))}
end
return redis.error_reply('unknown fenced op ' .. op)
"""


def _pack(records: Sequence[bytes]) -> bytes:
    return b"".join(_U32.pack(len(r)) + r for r in records)


def _unpack(blob: bytes) -> list[bytes] | None:
    out, pos = [], 0
    while pos < len(blob):
        if pos + 4 > len(blob):
            return None
        (n,) = _U32.unpack_from(blob, pos)
        pos += 4
        if pos + n > len(blob):
            return None
        out.append(blob[pos : pos + n])
        pos += n
    return out


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def _next_id(entry_id: str) -> str:
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _entries(raw: Any) -> list[tuple[Any, dict[Any, Any] | None]]:
    """``(id, fields)`` of a script's raw stream entries (``[id, [field, value, ...]]``;
    a deleted entry still in a PEL comes with no fields)."""
    out = []
    for e in raw or ():
        if not isinstance(e, list) or not e:
            continue
        f = e[1] if len(e) > 1 else None
        out.append((e[0], dict(zip(f[::2], f[1::2], strict=True)) if f else None))
    return out


class RedisStreamsBus(Bus):
    """Shards as Redis streams ``{prefix}:s:{shard}``."""

    name = "redis"
    batched_shards = True

    def __init__(
        self,
        url: str,
        shards: int = 32,
        *,
        prefix: str = "pqcnet:relayer",
        consumer: str = "relayer-0",
        max_len: int = 1_000_000,
        claim_idle_ms: int = 30_000,
        op_timeout: float = 2.0,
        trim_every: int = 64,
        entry_records: int = ENTRY_RECORDS,
        lease: float | None = None,
        revoke_grace: float = 5.0,
    ) -> None:
        if shards < 1:
            raise ValueError("shards must be >= 1")
        self.client: aioredis.Redis = aioredis.from_url(
            url, socket_timeout=None, socket_connect_timeout=op_timeout,
            max_connections=shards * 2 + 16, client_name=client_name(consumer, "bus"),
        )
        self._url = url
        #: (shard, group) -> the client of its blocking reads (one connection each)
        self._blockers: dict[tuple[int, str], aioredis.Redis] = {}
        #: (shard, group) -> that connection's CLIENT ID (refreshed on each connect)
        self._block_ids: dict[tuple[int, str], int] = {}
        #: (shard, group)s whose blocking read is under way
        self._blocking: set[tuple[int, str]] = set()
        self._unblocks: set[asyncio.Task[None]] = set()
        self._shards, self.prefix, self.consumer = shards, prefix, consumer
        #: target stream length; trimming never removes unacked entries
        self.max_len = max_len
        #: ms an entry must sit unacked in another consumer's PEL before we take it
        self.claim_idle_ms = claim_idle_ms
        #: seconds any single Redis call may take before the bus counts as unavailable
        self.op_timeout = op_timeout
        self.trim_every = trim_every
        self.entry_records = max(1, entry_records)
        self._per_entry = [1.0] * shards  # running mean of records per entry we wrote
        self._groups: set[tuple[int, str]] = set()
        self._phase: dict[tuple[int, str], str] = {}  # "pending" cursor id, or ">"
        self._claimed: set[tuple[int, str]] = set()
        #: (shard, group) -> loop time of the next sweep for stale foreign entries
        self._sweep_at: dict[tuple[int, str], float] = {}
        #: entries taken from other consumers' PELs by the periodic sweep
        self.stale_claimed = 0
        #: entries taken from other consumers' PELs when a shard was (re)claimed
        self.taken_over = 0
        #: reads and claims refused because our lease of the shard was gone from Redis
        self.fenced_out = 0
        #: (shard, group) -> the stream's last entry id when a fenced '>' read drained
        #: it: the next read waits for an entry past it first (scripts cannot block)
        self._tail: dict[tuple[int, str], str] = {}
        self._acks_since_trim = [0] * shards
        #: shard leases of a cluster (None: this relayer works on the shards it is given)
        self.leases: ShardLeases | None = None
        if lease is not None:
            self.leases = ShardLeases(self.client, prefix, consumer, shards, lease=lease,
                                      revoke_grace=revoke_grace, drain=self._drain,
                                      on_change=self._ownership_changed)
        self._fence_script = self.client.register_script(_FENCED)
        self._reset_needed: set[int] = set()
        self._out: dict[int, set[str]] = {}  # shard -> entry ids handed out, not acked
        #: (shard, group) -> the stream's last id at its rewind, until a read of new
        #: entries reached it or found none (see :meth:`caught_up`)
        self._catch_up: dict[tuple[int, str], tuple[int, int]] = {}
        #: (shard, group) -> loop time from which a sweep has seen every entry a former
        #: owner read as its lease ran out (a cluster: three leases after the claim)
        self._settle: dict[tuple[int, str], float] = {}
        self._changed = asyncio.Event()

    def key(self, shard: int) -> str:
        """Stream key of ``shard``."""
        return f"{self.prefix}:s:{shard}"

    def partitions(self) -> int:
        return self._shards

    async def _call(self, aw: Awaitable[T], limit: float | None = None) -> T:
        try:
            async with asyncio.timeout(limit or self.op_timeout):
                return await aw
        except TimeoutError:
            raise BusUnavailable("redis call timed out") from None
        except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as exc:
            raise BusUnavailable(f"redis unavailable: {exc}") from None
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                self._groups.clear()
            raise BusError(f"redis error: {exc}") from None

    async def _ensure_group(self, shard: int, group: str) -> None:
        if (shard, group) in self._groups:
            return
        try:
            await self._call(self.client.xgroup_create(self.key(shard), group, id="0",
                                                       mkstream=True))
        except BusError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add((shard, group))

    def seq_store(self) -> RedisSeqStore:
        """Marks and volume on the same Redis server (same durability as the stream);
        in a cluster every write is fenced by the shard's lease."""
        fence = self.leases.fence if self.leases is not None else None
        return RedisSeqStore(self.client, self.prefix, self.consumer, fence=fence)

    async def start(self) -> None:
        if self.leases is not None and self.leases._task is None:
            try:
                await self.leases.start()
            except (aioredis.ConnectionError, aioredis.TimeoutError, OSError,
                    TimeoutError) as exc:
                raise BusUnavailable(f"redis unavailable claiming shards: {exc}") from None
            self._reset_needed.clear()  # no worker has read anything yet: nothing stale

    def assignment(self) -> list[int]:
        if self.leases is None:
            return list(range(self._shards))
        return sorted(self.leases.owned)

    def owns(self, shard: int) -> bool:
        return self.leases is None or self.leases.holds(shard)

    def in_assignment(self, shard: int) -> bool:
        return self.leases is None or self.leases.assigned(shard)

    def _ownership_changed(self, gained: set[int], lost: set[int]) -> None:
        for s in gained | lost:
            self._reset_needed.add(s)  # stale in-memory marks: the worker reloads them
            self._out.pop(s, None)
            for sg in [sg for sg in self._claimed if sg[0] == s]:
                self._claimed.discard(sg)
                self._settle.pop(sg, None)
            for sg in [sg for sg in self._phase if sg[0] == s]:
                self._phase[sg] = "0"
                self._tail.pop(sg, None)
        self._changed.set()
        if self.on_assignment is not None:
            self.on_assignment(gained, lost)
        if self.on_moved is not None:  # a lease lost is another member's (or expired)
            self.on_moved(gained, lost)

    async def _drain(self, shard: int) -> None:
        """Until every entry of ``shard`` handed out is acked (a lease hand-back)."""
        while self._out.get(shard):  # noqa: ASYNC110 - the workers ack from other tasks
            await asyncio.sleep(0.02)

    async def healthy(self) -> bool:
        try:
            return bool(await self._call(self.client.ping(), 1.0))
        except BusError:
            return False

    def _add(self, pipe: Any, shard: int, records: Sequence[bytes]) -> list[int]:
        """Queue ``records``' XADDs on ``pipe``; returns the records of each entry."""
        key, step = self.key(shard), self.entry_records
        sizes = []
        for i in range(0, len(records), step):
            chunk = records[i : i + step]
            pipe.xadd(key, {_FIELD: _pack(chunk)})
            sizes.append(len(chunk))
        self._per_entry[shard] = 0.9 * self._per_entry[shard] + 0.1 * (len(records) / len(sizes))
        return sizes

    async def publish(self, shard: int, records: Sequence[bytes]) -> list[Offset]:
        self.check_shard(shard)
        if not records:
            return []
        pipe = self.client.pipeline(transaction=False)
        sizes = self._add(pipe, shard, records)
        ids: list[Any] = await self._call(pipe.execute())
        return [f"{_s(eid)}/{i}/{n}" for eid, n in zip(ids, sizes, strict=True) for i in range(n)]

    async def publish_many(self, batches: Mapping[int, Sequence[bytes]]) -> None:
        """Every shard's XADDs in one pipeline: one round trip for a whole group commit
        (one per shard before: a 256-frame request over 64 topics touched 32 shards).
        Not atomic — a failure raises for all of them and the caller sends all to the
        overflow queue, so records that did land are there twice; the shard workers
        drop the second copy as a duplicate, as after a publish that timed out."""
        for shard in batches:
            self.check_shard(shard)
        pipe = self.client.pipeline(transaction=False)
        queued = False
        for shard, records in batches.items():
            if records:
                self._add(pipe, shard, records)
                queued = True
        if queued:
            await self._call(pipe.execute())

    async def consume(
        self, shard: int, group: str, *, max_records: int = 512, block: float = 0.5
    ) -> list[Delivery]:
        self.check_shard(shard)
        leases = self.leases
        if leases is not None:
            if shard in self._reset_needed:
                self._reset_needed.discard(shard)
                raise BusUnavailable(f"shard {shard} changed owner: resetting")
            if not leases.holds(shard):  # not ours (any more): nothing to hand out
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(block):
                        await self._changed.wait()
                return []
        await self._ensure_group(shard, group)
        sg = (shard, group)
        if sg not in self._claimed:  # once per (re)start or claim: take over others' work
            if await self._take_pending(shard, group):
                self._phase[sg] = "0"  # now ours: read with our own, through the pending path
            self._claimed.add(sg)
            if leases is not None:  # a read the former owner had on the way lands in its
                # PEL after this claim; the sweep takes it once idle for two leases
                self._settle[sg] = asyncio.get_running_loop().time() + 3 * leases.lease
        if leases is not None and (stale := await self._claim_stale(shard, group, leases)):
            return self._deliveries(shard, group, stale)
        cursor = self._phase.get(sg, "0")
        count = max(1, int(max_records / self._per_entry[shard]))  # entries, not records
        if cursor != ">":
            out = await self._read(shard, group, cursor, count, None)
            if out:
                self._phase[sg] = _s(out[-1][0])
                return self._deliveries(shard, group, out)
            self._phase[sg] = ">"
        ms = max(1, int(block * 1000))
        entries = await self._read(shard, group, ">", count, ms)
        end = self._catch_up.get(sg)
        if end is not None and (not entries or _id_key(_s(entries[-1][0])) >= end):
            del self._catch_up[sg]  # every entry up to the end at the rewind handed out
        return self._deliveries(shard, group, entries)

    async def _take_pending(self, shard: int, group: str) -> int:
        """Move other consumers' pending entries of ``shard`` into our PEL; how many.

        Without a lease only entries idle for ``claim_idle_ms`` (their consumer is
        probably dead); with one, all of them at once (XAUTOCLAIM pages until done).
        """
        idle = 0 if self.leases is not None else self.claim_idle_ms
        start, total = "0-0", 0
        for _ in range(10_000):  # bounded: a PEL holds at most a few batches per consumer
            res: Any
            if self.leases is None:
                res = await self._call(self.client.xautoclaim(
                    self.key(shard), group, self.consumer, idle, start, count=256))
            else:
                res = (await self._fenced(shard, "autoclaim", group, self.consumer,
                                          idle, start, 256))[0]
            total += len(res[1]) if res else 0
            start = _s(res[0]) if res else "0-0"
            if start == "0-0":
                break
        if total:
            self.taken_over += total
            log.info("took over entries another member read and never acknowledged",
                     extra={"shard": shard, "entries": total})
        return total

    async def _claim_stale(self, shard: int, group: str, leases: ShardLeases) -> list[Any]:
        """Every ``lease`` seconds: entries of ``shard`` idle for two leases in *other*
        consumers' PELs, moved into ours (``XCLAIM``, which returns them). Only a
        relayer that read after losing the lease leaves such entries; ours in flight
        are never touched."""
        now = asyncio.get_running_loop().time()
        sg = (shard, group)
        if now < self._sweep_at.get(sg, 0.0):
            return []
        self._sweep_at[sg] = now + leases.lease
        settles = now >= self._settle.get(sg, float("inf"))
        key, idle = self.key(shard), max(1, int(2 * leases.lease * 1000))
        summary: Any = await self._call(self.client.xpending(key, group))
        out: list[Any] = []
        for c in summary.get("consumers") or ():
            name = _s(c["name"])
            if name == self.consumer or not int(c["pending"]):
                continue
            rows: Any = await self._call(self.client.xpending_range(
                key, group, "-", "+", 256, consumername=name, idle=idle))
            ids = [r["message_id"] for r in rows]
            settles = settles and len(ids) < 256  # more than a page: not all taken yet
            if ids:
                claimed = await self._fenced(shard, "claim", group, self.consumer, idle,
                                             *ids)
                out += _entries(claimed[0])
        if out:
            self.stale_claimed += len(out)
            log.warning("took entries a former owner read after its lease ran out",
                        extra={"shard": shard, "entries": len(out)})
        if settles:  # what a former owner read late since the claim is ours now
            self._settle.pop(sg, None)
        return out

    async def _fenced(self, shard: int, op: str, *args: Any,
                      wait: tuple[str, str, int] | None = None) -> list[Any]:
        """``op`` (see :data:`_FENCED`) on ``shard``'s stream only while our lease of
        ``shard`` is in Redis — the check and the op are one script, so no read or
        claim of a relayer whose lease ran out reaches the stream. Its reply; when the
        lease is not ours, the refusal is counted, the shard dropped here at once, and
        :class:`BusUnavailable` raised (the worker resets, as after any owner change).
        ``wait`` (a ``read``'s group, the entry id it reads after, ms): first wait up to
        that long for an entry past the id, see :meth:`_wait_then`."""
        assert self.leases is not None
        fence = self.leases.fence(shard)
        if fence is not None:
            keys, argv = [self.key(shard), fence[0]], [fence[1], op, *args]
            res: Any = await (self._call(self._fence_script(keys=keys, args=argv))
                              if wait is None else
                              self._wait_then((shard, wait[0]), wait[1], wait[2], keys, argv))
            if int(res[0]):
                return list(res[1:])
            self.fenced_out += 1
            log.warning("a read of a shard whose lease ran out was refused",
                        extra={"shard": shard, "op": op})
            self.leases.lost({shard}, f"{op} refused: the lease is not ours in Redis")
        self._reset_needed.discard(shard)  # this raise is the reset
        raise BusUnavailable(f"shard {shard} changed owner: resetting")

    async def _wait_then(self, sg: tuple[int, str], after: str, block_ms: int,
                         keys: list[str], argv: list[Any]) -> Any:
        """``XREAD BLOCK`` for an entry of ``sg``'s stream past ``after`` (a plain read
        for no group: it moves no cursor and fills no pending list; ``CLIENT UNBLOCK``
        ends it) and the fenced script, pipelined on ``sg``'s blocking connection: Redis
        holds the script until the wait ends and runs it at once then — no round trip
        between the wake-up and the read (decision 0024). The script's reply."""
        self._blocking.add(sg)
        try:
            pipe = self._blocker(sg).pipeline(transaction=False)
            pipe.xread({keys[0]: after}, count=1, block=block_ms)
            pipe.eval(_FENCED, len(keys), *keys, *argv)
            replies = await self._call(pipe.execute(), self.op_timeout + block_ms / 1000)
        finally:
            self._blocking.discard(sg)
        return replies[1]

    async def _read_fenced(self, shard: int, group: str, cursor: str, count: int,
                           block_ms: int | None) -> list[Any]:
        """A cluster's read: under the lease fence. A blocking ``>`` read whose last
        read drained the stream first waits for an entry past the stream's last id
        then (interruptible), and reads only if one came."""
        sg = (shard, group)
        tail = self._tail.pop(sg, None) if cursor == ">" and block_ms else None
        if tail is not None and block_ms:
            res = await self._fenced(shard, "read", group, self.consumer, count, cursor,
                                     tail, wait=(group, tail, block_ms))
        else:
            res = await self._fenced(shard, "read", group, self.consumer, count, cursor)
        if tail := _s(res[1]):
            self._tail[sg] = tail
        return _entries(res[0])

    async def _read(self, shard: int, group: str, cursor: str, count: int,
                    block_ms: int | None) -> list[Any]:
        if self.leases is not None:
            return await self._read_fenced(shard, group, cursor, count, block_ms)
        limit = self.op_timeout + (block_ms or 0) / 1000
        sg = (shard, group)
        client = self.client if block_ms is None else self._blocker(sg)
        if block_ms is not None:
            self._blocking.add(sg)
        try:
            res: Any = await self._call(client.xreadgroup(
                group, self.consumer, {self.key(shard): cursor}, count=count,
                block=block_ms), limit)
        finally:
            self._blocking.discard(sg)
        if not res:
            return []
        if isinstance(res, dict):
            raise BusError("unexpected RESP3 reply; connect with protocol 2")
        return list(res[0][1])

    def _blocker(self, sg: tuple[int, str]) -> aioredis.Redis:
        """The client of ``sg``'s blocking reads: one connection, whose id is read
        again on every (re)connect."""
        client = self._blockers.get(sg)
        if client is None:
            async def connected(conn: Any) -> None:
                await conn.on_connect()
                await conn.send_command("CLIENT", "ID")
                self._block_ids[sg] = int(await conn.read_response())

            # a cluster's reads pipeline the wait and the fenced read (_wait_then): a
            # pipeline takes a connection from the pool, so the pool holds the one
            client = self._blockers[sg] = aioredis.from_url(
                self._url, socket_timeout=None, socket_connect_timeout=self.op_timeout,
                single_connection_client=self.leases is None, redis_connect_func=connected,
                client_name=client_name(self.consumer, "read"))
        return client

    def interrupt(self, shard: int) -> None:
        """End ``shard``'s blocking reads now (``CLIENT UNBLOCK`` from the pool): each
        returns nothing, as at its timeout. Best effort: an unblock that fails leaves
        the read to its timeout."""
        for sg in self._blocking:
            if sg[0] == shard:
                task = asyncio.get_running_loop().create_task(self._unblock(sg))
                self._unblocks.add(task)
                task.add_done_callback(self._unblocks.discard)

    async def _unblock(self, sg: tuple[int, str]) -> None:
        """``CLIENT UNBLOCK`` ``sg``'s reading connection; again every 10 ms while the
        read is under way here but not yet blocked in Redis (Redis answers 0), up to
        :data:`UNBLOCK_TRIES` times."""
        try:
            for _ in range(UNBLOCK_TRIES):
                cid = self._block_ids.get(sg)
                if cid is not None and await self._call(self.client.client_unblock(cid)):
                    return
                if sg not in self._blocking:  # the read returned meanwhile
                    return
                await asyncio.sleep(0.01)
        except BusError as exc:  # BusUnavailable included
            log.info("could not end a blocking read early", extra={"error": str(exc)})

    def _deliveries(self, shard: int, group: str, entries: Sequence[Any]) -> list[Delivery]:
        out = []
        handed = self._out.setdefault(shard, set()) if self.leases is not None else None
        for entry_id, fields in entries:
            eid = _s(entry_id)
            if handed is not None:
                handed.add(eid)
            blob = fields.get(_FIELD) if fields else None
            records = _unpack(blob) if blob else None
            if not records:
                # a deleted (or foreign) entry still in a PEL: one empty record, so the
                # worker acks it (counted as corrupt) instead of looping on it
                out.append(Delivery(shard, f"{eid}/0/1", b""))
                continue
            n = len(records)
            out += [Delivery(shard, f"{eid}/{i}/{n}", r) for i, r in enumerate(records)]
        return out

    @staticmethod
    def _done_entries(deliveries: Sequence[Delivery]) -> list[str]:
        """The entries whose *last* record is in ``deliveries`` (the whole entry done)."""
        done = []
        for d in deliveries:
            eid, i, n = str(d.offset).split("/")
            if int(i) == int(n) - 1:
                done.append(eid)
        return done

    async def ack(self, shard: int, group: str, deliveries: Sequence[Delivery]) -> None:
        self.check_shard(shard)
        done = self._done_entries(deliveries)
        if not done:
            return
        await self._call(self.client.xack(self.key(shard), group, *done))
        await self._after_ack(shard, done)

    def ack_in_store(self, shard: int, group: str, deliveries: Sequence[Delivery],
                     store: SeqStore) -> StreamAck | None:
        """The ``XACK`` rides in the marks script when ``store`` writes to this bus's
        Redis (:meth:`seq_store`): fenced by the same lease check, one round trip."""
        self.check_shard(shard)
        if not isinstance(store, RedisSeqStore) or store.client is not self.client:
            return None
        return StreamAck(self.key(shard), group, tuple(self._done_entries(deliveries)))

    async def acked(self, shard: int, ack: StreamAck) -> None:
        if ack.ids:
            await self._after_ack(shard, ack.ids)

    async def _after_ack(self, shard: int, done: Sequence[str]) -> None:
        handed = self._out.get(shard)
        if handed:
            handed.difference_update(done)
        self._acks_since_trim[shard] += len(done)
        if self._acks_since_trim[shard] >= self.trim_every:
            self._acks_since_trim[shard] = 0
            await self.trim(shard)

    async def trim(self, shard: int) -> int:
        """Trim ``shard`` down toward ``max_len`` without touching any unacked entry."""
        key = self.key(shard)
        length = int(await self._call(self.client.xlen(key)))
        if length <= self.max_len:
            return 0
        groups = await self._call(self.client.xinfo_groups(key))
        floor: tuple[int, int] | None = None
        floor_id = ""
        for g in groups:
            name = _s(g["name"])
            if int(g["pending"]):
                summary = await self._call(self.client.xpending(key, name))
                candidate = _s(summary["min"])
            else:
                candidate = _next_id(_s(g["last-delivered-id"]))
            if floor is None or _id_key(candidate) < floor:
                floor, floor_id = _id_key(candidate), candidate
        if not floor_id:
            return 0
        return int(await self._call(self.client.xtrim(key, minid=floor_id, approximate=True)))

    async def lag(self, shard: int, group: str) -> int:
        return (await self.lags([shard], group, strict=True))[shard]

    async def lags(self, shards: Iterable[int], group: str, *,
                   strict: bool = False) -> dict[int, int]:
        """Every shard's ``XINFO GROUPS`` in one pipeline: the backpressure sample
        asks for all owned shards every ``backpressure_interval``, and 32 calls of their
        own were 64 round trips a second, most of an idle relayer's Redis traffic after
        its wake-ups. A shard whose reply is an error is left out (``strict``: raised)."""
        order = list(shards)
        for s in order:
            self.check_shard(s)
        out = {s: 0 for s in order  # not ours to deliver
               if self.leases is not None and s not in self.leases.owned}
        mine = [s for s in order if s not in out]
        if not mine:
            return out
        for s in mine:
            await self._ensure_group(s, group)
        pipe = self.client.pipeline(transaction=False)
        for s in mine:
            pipe.xinfo_groups(self.key(s))
        replies = await self._call(pipe.execute(raise_on_error=False))
        for s, reply in zip(mine, replies, strict=True):
            if isinstance(reply, Exception):
                if "NOGROUP" in str(reply) or "no such key" in str(reply):
                    self._groups.discard((s, group))  # made again by the next sample
                if strict:
                    raise BusError(f"redis error: {reply}")
                continue
            out[s] = await self._lag_of(s, group, reply)
        return out

    async def _lag_of(self, shard: int, group: str, groups: Any) -> int:
        """``group``'s records of ``shard`` from its ``XINFO GROUPS`` reply."""
        for g in groups:
            if _s(g["name"]) == group:
                undelivered: Any = g.get("lag")
                if undelivered is None:  # Redis cannot tell (entries deleted): be conservative
                    undelivered = await self._call(self.client.xlen(self.key(shard)))
                entries = int(undelivered) + int(g["pending"])
                return round(entries * self._per_entry[shard]) if entries else 0
        return 0

    async def rewind(self, shard: int, group: str) -> None:
        sg = (shard, group)
        self._phase[sg] = "0"
        self._tail.pop(sg, None)
        self._out.pop(shard, None)  # what was handed out is read again from the PEL
        # the stream's end now: caught up once new reads pass it (the PELs of this
        # consumer and of former owners come first, through the pending path)
        self._catch_up[sg] = (2**63, 0)  # not caught up even if XINFO fails below
        try:
            info: Any = await self._call(self.client.xinfo_stream(self.key(shard)))
        except BusError as exc:
            if "no such key" not in str(exc).lower():
                raise
            del self._catch_up[sg]  # no stream yet: nothing was acknowledged into it
            return
        self._catch_up[sg] = _id_key(_s(info["last-generated-id"]))

    def caught_up(self, shard: int, group: str) -> bool:
        return (shard, group) not in self._catch_up and (shard, group) not in self._settle

    async def close(self) -> None:
        if self.leases is not None:
            await self.leases.close()
        await cancel_and_wait(*self._unblocks)
        for client in self._blockers.values():
            await client.aclose()
        self._blockers.clear()
        await self.client.aclose()
