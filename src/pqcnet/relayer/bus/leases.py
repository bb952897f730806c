"""Shard ownership for N relayers sharing one set of Redis streams: leases in Redis.

Redis Streams have consumer groups but no partition assignment, so relayers of one
cluster (same ``redis_prefix`` and group) agree on who works on which shard through
*leases* (decision 0019, ``docs/explanation/relayer-cluster.md``):

* **lease** — key ``{prefix}:lease:{shard}``, value ``<token>:<node_id>`` (token: random
  per process), taken with ``SET NX PX lease_ms`` (a Lua script: also over a value of
  our own ``node_id``, i.e. our previous life after a crash — node ids are unique per
  cluster). The holder renews every ``lease/3`` s (compare-and-``PEXPIRE``); a lease not
  renewed expires after ``lease`` s and any relayer may claim the shard.
* **members** — sorted set ``{prefix}:members``, score = expiry in Redis server time
  (``TIME`` in the script: no clock skew between hosts). Live members decide the fair
  share ``ceil(shards / members)``; a relayer claims free shards up to it and releases
  shards above it (after its worker acked what it had consumed, up to ``revoke_grace``),
  so a joining relayer gets shards within a few renew rounds and a dead one's shards
  are taken over once its leases expired.
* **fencing** — a shard worker persists dedup marks and metered volume only while its
  lease still holds (:meth:`ShardLeases.fence`, checked inside the same Lua script as
  the write, see :class:`pqcnet.relayer.seqstore.RedisSeqStore`): a relayer that lost
  a lease without noticing (paused, partitioned) can neither meter nor ack that shard.
* **journal** — every claim / release / loss is appended to the bounded stream
  ``{prefix}:owners`` (``node``, ``shard``, ``event``, server time), so who owned what
  and when can be read with ``redis-cli XRANGE`` (proof audits, incidents). One
  relayer's entries land in the order its ownership changed (:class:`OwnershipJournal`).
  A Kafka cluster with ``redis_url`` writes its group assignments there too.

A relayer that cannot reach Redis stops counting on its leases ``lease`` s after its
last successful renewal, whatever it believes, and drops every shard.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from pqcnet._util.tasks import cancel_and_wait

log = logging.getLogger(__name__)

#: default seconds a shard lease lasts without renewal
LEASE_SECONDS = 3.0
#: entries kept in the ownership journal stream (approximate MAXLEN)
JOURNAL_LEN = 10_000
#: ownership changes of one relayer waiting for their journal write (more are dropped,
#: with a warning: only while Redis is slower than the group changes)
JOURNAL_PENDING = 1_024

# KEYS[1] lease; ARGV value, px, node_id. Free, ours, or our previous life's -> take it.
_CLAIM = """
local cur = redis.call('GET', KEYS[1])
if (not cur) or cur == ARGV[1] or string.sub(cur, 18) == ARGV[3] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
# KEYS leases; ARGV value, px -> 1/0 per key
_RENEW = """
local out = {}
for i, k in ipairs(KEYS) do
  if redis.call('GET', k) == ARGV[1] then
    redis.call('PEXPIRE', k, ARGV[2])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""
# KEYS[1] lease; ARGV value
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS[1] members zset; ARGV node, px -> live members (server clock)
_MEMBERS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


class ShardLeases:
    """This relayer's leases on the shards of one stream set."""

    def __init__(self, client: aioredis.Redis, prefix: str, node_id: str, shards: int, *,
                 lease: float = LEASE_SECONDS, revoke_grace: float = 5.0,
                 drain: Callable[[int], Awaitable[None]] | None = None,
                 on_change: Callable[[set[int], set[int]], None] | None = None) -> None:
        if lease <= 0:
            raise ValueError("lease must be > 0")
        self._r, self.prefix, self.node_id, self.shards = client, prefix, node_id, shards
        self.lease = lease
        self.revoke_grace = revoke_grace
        #: value of every lease we hold: a fresh token per process
        self.value = f"{secrets.token_hex(8)}:{node_id}"
        #: shards whose lease we hold (and believe valid)
        self.owned: set[int] = set()
        #: owned shards being handed back (workers stop taking new records)
        self.releasing: set[int] = set()
        #: live members at the last round, sorted
        self.members: list[str] = []
        self._drain = drain
        self._on_change = on_change
        self.journal = OwnershipJournal(client, prefix, node_id)
        self._valid_until = 0.0
        self._task: asyncio.Task[None] | None = None
        self._releases: set[asyncio.Task[None]] = set()
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._members = client.register_script(_MEMBERS)

    @property
    def px(self) -> int:
        return max(1, int(self.lease * 1000))

    def key(self, shard: int) -> str:
        """Lease key of ``shard``."""
        return f"{self.prefix}:lease:{shard}"

    @property
    def members_key(self) -> str:
        return f"{self.prefix}:members"

    @property
    def journal_key(self) -> str:
        return f"{self.prefix}:owners"

    def holds(self, shard: int) -> bool:
        """Whether our workers may take new records of ``shard`` now."""
        return self.assigned(shard) and time.monotonic() < self._valid_until

    def assigned(self, shard: int) -> bool:
        """Whether ``shard`` is ours until a round reports it lost or handed back —
        :meth:`holds` without the time bound: past ``_valid_until`` the next round
        either renews the lease (then it never lapsed) or loses it (then the change is
        reported)."""
        return shard in self.owned and shard not in self.releasing

    def fence(self, shard: int) -> tuple[str, str] | None:
        """(lease key, our value) a write for ``shard`` must find in Redis, or None when
        we do not own it (the write is refused without asking Redis)."""
        return (self.key(shard), self.value) if shard in self.owned else None

    # ---------------------------------------------------------------- rounds
    async def start(self) -> None:
        """First round now (a lone relayer owns everything before its workers start),
        then a round every ``lease / 3`` s in the background."""
        await self.round()
        self._task = asyncio.create_task(self._loop(), name="shard-leases")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                await self.round()
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("shard lease round failed", extra={"error": str(exc)})
            except Exception:  # a bug must not stop the renewals for good
                log.exception("shard lease round failed")
            if self.owned and time.monotonic() >= self._valid_until:
                self._lose(set(self.owned), "expired (no successful round)")

    async def round(self) -> None:
        """Heartbeat, renew what we hold, claim up to our share, release above it."""
        started = time.monotonic()
        async with asyncio.timeout(self.lease / 2):
            raw = await self._members(keys=[self.members_key], args=[self.node_id, self.px])
            self.members = sorted(_s(m) for m in raw)
            if self.owned:
                held = sorted(self.owned)
                res = await self._renew(keys=[self.key(s) for s in held],
                                        args=[self.value, self.px])
                lost = {s for s, ok in zip(held, res, strict=True) if not int(ok)}
                if lost:
                    self._lose(lost, "lease taken or expired")
            self._valid_until = started + self.lease * 0.9
            await self._rebalance()

    def share(self) -> int:
        """Shards this relayer should own: ``ceil(shards / live members)``."""
        return math.ceil(self.shards / max(1, len(self.members)))

    def _preferred(self) -> list[int]:
        """Shard order to claim in: ours-by-index first (``s % n == k``), so relayers
        mostly reach for disjoint shards."""
        n = max(1, len(self.members))
        k = self.members.index(self.node_id) if self.node_id in self.members else 0
        return sorted(range(self.shards), key=lambda s: (s % n != k, s))

    async def _rebalance(self) -> None:
        share = self.share()
        keeping = len(self.owned) - len(self.releasing)
        if keeping < share:
            free = await self._free()
            got: set[int] = set()
            for s in (s for s in self._preferred() if s in free):
                if keeping + len(got) >= share:
                    break
                if int(await self._claim(keys=[self.key(s)],
                                         args=[self.value, self.px, self.node_id])):
                    got.add(s)
            if got:  # owned and the bus told in one step: no worker reads in between
                self.owned |= got
                self._changed(got, set())
                self.journal.record(got, "claimed")
                await self.journal.flush()
        elif keeping > share:
            order = self._preferred()
            spare = sorted(self.owned - self.releasing, key=order.index, reverse=True)
            for s in spare[: keeping - share]:
                self.releasing.add(s)
                task = asyncio.create_task(self._hand_back(s), name=f"lease-release-{s}")
                self._releases.add(task)
                task.add_done_callback(self._releases.discard)

    async def _free(self) -> set[int]:
        """Shards without a live lease, or whose lease is our previous life's — or ours
        without our knowing it (a round cut off between the claim and its bookkeeping)."""
        values = await self._r.mget([self.key(s) for s in range(self.shards)])
        return {s for s, v in enumerate(values)
                if s not in self.owned and (v is None or _s(v)[17:] == self.node_id)}

    async def _hand_back(self, shard: int) -> None:
        """Let the worker finish what it consumed, then delete our lease."""
        try:
            if self._drain is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.revoke_grace):
                        await self._drain(shard)
            await self._release(keys=[self.key(shard)], args=[self.value])
            self.journal.record({shard}, "released")
            await self.journal.flush()
        except (RedisError, OSError) as exc:  # the lease then simply expires
            log.warning("shard lease release failed", extra={"shard": shard, "error": str(exc)})
        finally:
            self.releasing.discard(shard)
            if shard in self.owned:
                self.owned.discard(shard)
                self._changed(set(), {shard})

    def lost(self, shards: set[int], why: str) -> None:
        """Drop ``shards`` now: Redis showed their leases are not ours any more (a
        fenced read or write was refused) — the next round would have found out."""
        if gone := shards & self.owned:
            self._lose(gone, why)

    def _lose(self, shards: set[int], why: str) -> None:
        self.owned -= shards
        self.releasing -= shards
        log.warning("shard leases lost", extra={"shards": sorted(shards), "reason": why})
        self._changed(set(), shards)
        self.journal.post(shards, "lost")

    def _changed(self, gained: set[int], lost: set[int]) -> None:
        log.info("shard ownership changed", extra={
            "node": self.node_id, "gained": sorted(gained), "lost": sorted(lost),
            "owned": len(self.owned), "members": len(self.members)})
        if self._on_change is not None:
            self._on_change(gained, lost)

    async def close(self) -> None:
        """Stop renewing, hand every lease back and leave the members (clean stop: the
        others take the shards over at once instead of after ``lease`` s)."""
        await cancel_and_wait(self._task)
        for t in list(self._releases):
            t.cancel()
        await asyncio.gather(*self._releases, return_exceptions=True)
        held = set(self.owned)
        self.owned.clear()
        self.releasing.clear()
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(self.lease / 2):
                for s in sorted(held):
                    await self._release(keys=[self.key(s)], args=[self.value])
                await self._r.zrem(self.members_key, self.node_id)
                if held:
                    self.journal.record(held, "released")
        await self.journal.close(self.lease / 2)


class OwnershipJournal:
    """One relayer's entries of the ownership journal ``{prefix}:owners``, written in
    the order its ownership changed.

    A change is queued where it happens (:meth:`record`, synchronous) and one writer at
    a time sends everything queued in one pipeline (:meth:`flush`). Writing each change
    from its own task raced: two pipelines on two pooled connections land in either
    order, and a ``claimed`` before the ``lost`` / ``released`` it follows reads as this
    relayer never owning the shard. Best effort, as before: a failed write is logged
    and its entries dropped (written later they would carry a wrong server time)."""

    def __init__(self, client: aioredis.Redis, prefix: str, node_id: str, *,
                 pending: int = JOURNAL_PENDING) -> None:
        self._r, self.prefix, self.node_id = client, prefix, node_id
        self._pending = pending
        self._queue: deque[tuple[tuple[int, ...], str]] = deque()
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def key(self) -> str:
        return f"{self.prefix}:owners"

    def record(self, shards: Iterable[int], event: str) -> None:
        """Queue ``event`` (claimed / released / lost) for ``shards``, in call order."""
        if len(self._queue) >= self._pending:
            log.warning("ownership journal entry dropped (writes behind)",
                        extra={"event": event, "shards": sorted(shards)})
            return
        self._queue.append((tuple(sorted(shards)), event))

    def post(self, shards: Iterable[int], event: str) -> None:
        """:meth:`record` and flush in the background (callers that cannot wait)."""
        self.record(shards, event)
        task = asyncio.create_task(self.flush(), name="ownership-journal")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def flush(self) -> None:
        """Write everything queued, oldest first (returns once it is written or the
        write failed)."""
        async with self._lock:
            if not self._queue:
                return
            batch = list(self._queue)
            self._queue.clear()
            pipe = self._r.pipeline(transaction=False)
            for shards, event in batch:
                for s in shards:
                    pipe.xadd(self.key, {"node": self.node_id, "shard": s, "event": event},
                              maxlen=JOURNAL_LEN, approximate=True)
            try:
                await pipe.execute()
            except (RedisError, OSError) as exc:
                log.info("ownership journal not written",
                         extra={"entries": len(batch), "error": str(exc)})

    async def close(self, grace: float) -> None:
        """Write what is queued (up to ``grace`` s), then stop the background writes."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self.flush()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def journal(entries: Iterable[Any] | None) -> list[tuple[str, int, str]]:
    """``(node, shard, event)`` of raw ``XRANGE`` entries of the ownership journal."""
    out = []
    for _id, fields in entries or ():
        f = {_s(k): _s(v) for k, v in fields.items()}
        out.append((f["node"], int(f["shard"]), f["event"]))
    return out
