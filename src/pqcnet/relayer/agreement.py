"""Per-frame agreement on gap skips between the relayers of a cluster (decision 0020).

The gap fence (:mod:`pqcnet.relayer.gapfence`) keeps the ingress and the shard worker of
*one* process from both acknowledging a frame and skipping its seq. A relayer of a
cluster also acknowledges frames for shards another relayer owns; without more, the
owner could skip the seq of such a frame before it read it from the bus and drop it
afterwards: an acknowledged frame never delivered (counted as ``late_on_bus``).

Two Lua scripts in the store the cluster already shares (Redis: the marks store) make
the two relayers agree, per frame, on one of "acknowledged, so it will be delivered" or
"skipped, so it is refused". Redis runs each script alone, so they are ordered:

* :meth:`GapAgreement.confirm` — a relayer that does not own the frame's shard, after
  its append and before its ack: a seq inside a range the owner reserved is *refused*
  (``LateFrame``; the copy on the bus is dropped by the owner), any other seq at or
  above the owner's durable mark is recorded as a marker ("acknowledged elsewhere").
* :meth:`GapAgreement.reserve` — the owner, before it skips ``[lo, hi)``: if a marker
  lies in the range the skip waits (the frame is on the bus or in the other relayer's
  overflow queue); otherwise the range is recorded (the gaps hash, and as *pending* until
  the save that moves the marks past it) and the skip goes ahead.

A worker that starts (a restart, a shard taken over) loads the pending ranges
(:meth:`GapAgreement.load_pending`): frames of a range reserved by a relayer that died
before its save are refused frames, dropped rather than delivered. The save that moves
a topic's mark deletes its pending range and the markers below the mark in the same
script (:class:`pqcnet.relayer.seqstore.RedisSeqStore`), so markers are bounded by the
frames in flight across the cluster.

Keys (``{prefix}`` the store's): ``{prefix}:acked:{shard}`` a sorted set of markers,
all of score 0, member ``topic_key ‖ seq`` (20 zero-padded digits, so lexical order is
seq order and ``ZRANGEBYLEX`` finds a topic's markers in a range);
``{prefix}:pending:{shard}`` a hash ``topic_key -> "lo-hi"``. Seqs are compared as Lua
numbers (exact below 2**53).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import redis.asyncio as aioredis

from pqcnet.relayer.errors import BusUnavailable
from pqcnet.relayer.frame import Topic, topic_from_key, topic_key
from pqcnet.relayer.gapfence import MAX_RANGES_PER_TOPIC

#: digits of a marker's seq (u64 fits)
SEQ_DIGITS = 20
#: the one definition of a marker's member, prepended to every script that builds one
#: (the confirm, the reserve, and the marks save that deletes them): ``tk`` a topic key,
#: ``digits`` a seq in decimal
MEMBER_LUA = f"""
local function member(tk, digits)
  return tk .. string.rep('0', {SEQ_DIGITS} - #digits) .. digits
end
"""

# KEYS per shard: gaps hash, marks hash, acked zset. ARGV: number of shards, then per
# shard: n topics, then (topic_key, "seq,seq,...") * n. Returns one string per shard:
# a '1' (refused) or '0' per frame, in the order of the ARGV. The markers' members are
# built here (topic_key ‖ the seq zero-padded to SEQ_DIGITS) so the client sends each
# topic key once per request.
_CONFIRM = MEMBER_LUA + """
local out = {}
local a = 2
for s = 0, tonumber(ARGV[1]) - 1 do
  local gaps, marks, acked = KEYS[3 * s + 1], KEYS[3 * s + 2], KEYS[3 * s + 3]
  local n = tonumber(ARGV[a])
  a = a + 1
  local flags = {}
  local add = {}
  for _ = 1, n do
    local tk, seqs = ARGV[a], ARGV[a + 1]
    a = a + 2
    local mark = tonumber(redis.call('HGET', marks, tk) or '0')
    local ranges = {}
    local raw = redis.call('HGET', gaps, tk)
    if raw then
      for lo, hi in string.gmatch(raw, '(%d+)-(%d+)') do
        ranges[#ranges + 1] = {tonumber(lo), tonumber(hi)}
      end
    end
    for digits in string.gmatch(seqs, '%d+') do
      local seq = tonumber(digits)
      local refused = '0'
      for _, r in ipairs(ranges) do
        if seq >= r[1] and seq < r[2] then
          refused = '1'
          break
        end
      end
      if refused == '0' and seq >= mark then
        add[#add + 1] = 0
        add[#add + 1] = member(tk, digits)
      end
      flags[#flags + 1] = refused
    end
  end
  for i = 1, #add, 4000 do
    redis.call('ZADD', acked, unpack(add, i, math.min(i + 3999, #add)))
  end
  out[#out + 1] = table.concat(flags)
end
return out
"""

# KEYS lease, gaps hash, acked zset, pending hash. ARGV lease value ('' = no lease),
# ranges kept per topic, then (topic_key, lo, hi) * n. Returns
# {-1} if the lease is not ours, else one 1 (reserved) or 0 (a marker holds it) each.
_RESERVE = MEMBER_LUA + """
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then return {-1} end
local keep = tonumber(ARGV[2])
local out = {}
for i = 3, #ARGV, 3 do
  local tk = ARGV[i]
  local held = redis.call('ZRANGEBYLEX', KEYS[3], '[' .. member(tk, ARGV[i + 1]),
                          '(' .. member(tk, ARGV[i + 2]), 'LIMIT', 0, 1)
  if #held > 0 then
    out[#out + 1] = 0
  else
    local range = ARGV[i + 1] .. '-' .. ARGV[i + 2]
    local ranges = {}
    local old = redis.call('HGET', KEYS[2], tk)
    local present = false
    if old then
      for r in string.gmatch(old, '[^,]+') do
        ranges[#ranges + 1] = r
        if r == range then present = true end
      end
    end
    if not present then ranges[#ranges + 1] = range end
    local first = math.max(1, #ranges - keep + 1)
    redis.call('HSET', KEYS[2], tk, table.concat(ranges, ',', first, #ranges))
    redis.call('HSET', KEYS[4], tk, range)
    out[#out + 1] = 1
  end
end
return out
"""

#: ``(topic, lo, hi)``: seqs ``lo .. hi-1`` of ``topic``
Span = tuple[Topic, int, int]


class GapAgreement:
    """The two scripts and the pending ranges, over one Redis client."""

    def __init__(self, client: aioredis.Redis, prefix: str, *,
                 marks_key: Callable[[int], str], gaps_key: Callable[[int], str],
                 fence: Callable[[int], tuple[str, str] | None] | None = None) -> None:
        self._r = client
        self._prefix = prefix
        #: the marks store's hashes of a shard (its marks, its recorded ranges)
        self._marks_key, self._gaps_key = marks_key, gaps_key
        #: a Redis cluster's shard lease ``(key, value)``: a reservation by a relayer
        #: that lost it is refused (None: no leases, e.g. a Kafka group)
        self._fence = fence
        self._confirm = client.register_script(_CONFIRM)
        self._reserve = client.register_script(_RESERVE)

    def acked_key(self, shard: int) -> str:
        """The sorted set of markers of ``shard``."""
        return f"{self._prefix}:acked:{shard}"

    def pending_key(self, shard: int) -> str:
        """The hash of ``shard``'s reserved ranges not saved past yet."""
        return f"{self._prefix}:pending:{shard}"

    async def confirm(self, by_shard: Mapping[int, Sequence[tuple[Topic, int]]]
                      ) -> dict[int, list[bool]]:
        """Record ``(topic, seq)`` of frames appended here for shards owned elsewhere;
        True for each one refused (its seq lies in a reserved or skipped range).
        Raises :class:`BusUnavailable` if the store does not answer: the frames must
        not be acknowledged then (their publisher retries with the same seq)."""
        keys: list[str] = []
        args: list[bytes | int] = [len(by_shard)]
        order: list[list[int]] = []  # per shard: frame indexes in the script's order
        for shard, frames in by_shard.items():
            keys += [self._gaps_key(shard), self._marks_key(shard), self.acked_key(shard)]
            per_topic: dict[Topic, list[int]] = {}
            for i, (topic, _) in enumerate(frames):
                per_topic.setdefault(topic, []).append(i)
            args.append(len(per_topic))
            for topic, idxs in per_topic.items():
                args += [topic_key(topic), ",".join(str(frames[i][1]) for i in idxs).encode()]
            order.append([i for idxs in per_topic.values() for i in idxs])
        try:
            got = await self._confirm(keys=keys, args=args)
        except aioredis.RedisError as exc:
            raise BusUnavailable(f"redis unavailable confirming frames: {exc}") from None
        out: dict[int, list[bool]] = {}
        for (shard, frames), idxs, flags in zip(by_shard.items(), order, got, strict=True):
            refused = [False] * len(frames)
            for i, flag in zip(idxs, flags if isinstance(flags, bytes) else flags.encode(),
                               strict=True):
                refused[i] = flag == 0x31  # b"1"
            out[shard] = refused
        return out

    async def reserve(self, shard: int, spans: Sequence[Span]) -> list[bool]:
        """Reserve each span for a skip: True if reserved (skip it now), False if a
        frame of it was acknowledged elsewhere (hold the skip). Raises
        :class:`BusUnavailable` if the store does not answer or the lease is lost."""
        if not spans:
            return []
        lease = self._fence(shard) if self._fence is not None else None
        if self._fence is not None and lease is None:
            raise BusUnavailable(f"shard {shard} is not leased here: no gap reserved")
        args: list[bytes | str | int] = [lease[1] if lease else "", MAX_RANGES_PER_TOPIC]
        for topic, lo, hi in spans:
            args += [topic_key(topic), lo, hi]
        keys = [lease[0] if lease else self.pending_key(shard), self._gaps_key(shard),
                self.acked_key(shard), self.pending_key(shard)]
        try:
            got = [int(x) for x in await self._reserve(keys=keys, args=args)]
        except aioredis.RedisError as exc:
            raise BusUnavailable(f"redis unavailable reserving a gap: {exc}") from None
        if got == [-1]:
            raise BusUnavailable(f"shard {shard}: lease lost, no gap reserved")
        return [x == 1 for x in got]

    async def load_pending(self, shard: int) -> dict[Topic, tuple[int, int]]:
        """Ranges of ``shard`` reserved and not saved past (a relayer died between)."""
        try:
            raw = await self._r.hgetall(self.pending_key(shard))
        except aioredis.RedisError as exc:
            raise BusUnavailable(f"redis unavailable loading reserved gaps: {exc}") from None
        out: dict[Topic, tuple[int, int]] = {}
        for k, v in raw.items():
            lo, _, hi = (v if isinstance(v, bytes) else v.encode()).partition(b"-")
            out[topic_from_key(k if isinstance(k, bytes) else k.encode())] = (int(lo), int(hi))
        return out
