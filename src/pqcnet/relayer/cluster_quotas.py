"""Per-customer quotas over a whole relayer cluster (``quota_scope: cluster``).

With ``quota_scope: host`` (the default) each relayer host keeps its own buckets, so a
customer whose publishers reach H hosts of a cluster may publish H times its plan.
With ``cluster`` the buckets live in the Redis the cluster already shares (the bus of
backend redis, or ``redis_url`` of a Kafka cluster), one frames bucket and one bytes
bucket per customer, and every relayer draws from them.

A Redis round trip per frame would cost more than the rest of ingress, so each relayer
draws *chunks* (a tenth of a second of a customer's rate, at most its burst) ahead of
need: before a request's frames are checked (:meth:`ClusterQuotas.prepare`, called by
the ingress), every customer of the request whose local tokens would fall below a
chunk gets a draw started in the background, for what the request needs plus two
chunks (one background draw at a time); a request waits for a draw only when its
customer's local tokens do not cover it at all, and such waits take turns (a lock:
each re-checks first, since an earlier grant may have been spent by concurrent
requests, or may cover it). The frames then take from the local tokens as host
buckets do; one script call carries every customer of a draw. (Awaiting every draw — a
round trip of a busy Redis inline in every fourth request of a customer — cost a
fifth of a saturated relayer's throughput: benchmarks/README.md.)

What it guarantees: the cluster admits no more than the shared buckets grant — over
any window, the plan's rate times the window plus its burst plus what each relayer
holds unspent (at most two chunks and one request's frames each). A relayer that stops
(drained, restarted, scaled in) gives its unspent whole tokens back to the shared
buckets, up to their burst (:meth:`ClusterQuotas.aclose`); one killed outright cannot,
and a running relayer keeps what it drew while its customer's traffic moves to another
— then the customer is admitted a little *below* its plan for a moment, never above.
The shared bucket refills by the Redis server's clock (``TIME`` in the script), so
relayers' clocks do not matter.

When Redis cannot be reached (an error or no answer within ``timeout``), the relayer
falls back to host buckets at the full plan for :data:`FALLBACK_S` seconds and then
tries again — a Redis outage never stops ingress, and a cluster in fallback admits at
most H times the plan, as ``host`` scope does. Fallbacks are logged, counted and
exposed (``pqcnet_relayer_quota_cluster_calls_total{outcome="error"}``,
``pqcnet_relayer_quota_cluster_fallback``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from pqcnet.relayer.authz import MAX_QUOTA_CUSTOMERS, Quotas, QuotaSpec, QuotasSpec, rates
from pqcnet.relayer.errors import QuotaExceeded

log = logging.getLogger(__name__)

#: Seconds of a customer's rate drawn at once from the shared bucket (at most its burst).
CHUNK_S = 0.1
#: Seconds a relayer stays on host buckets after Redis failed it.
FALLBACK_S = 5.0
#: Seconds an idle shared bucket outlives the time it takes to refill (then it is
#: gone, and comes back full — as it would be).
IDLE_TTL_S = 60.0

# For each key (one shared bucket): refill by the server's clock, grant
# min(wanted, whole tokens), and when short say how long until one more frame's worth
# (``unit``: 1 frame, or a mean frame's bytes) would be there. A negative ``wanted``
# gives tokens back (up to the burst; the grant is then what went back, negative).
# KEYS bucket keys; ARGV per key: rate/s, burst, wanted, unit, ttl ms -> per key:
# granted, wait s
_DRAW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local out = {}
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[5 * i - 4])
  local burst = tonumber(ARGV[5 * i - 3])
  local want = tonumber(ARGV[5 * i - 2])
  local unit = tonumber(ARGV[5 * i - 1])
  local have = redis.call('HMGET', key, 'tokens', 'at')
  local tokens = tonumber(have[1]) or burst
  local at = tonumber(have[2]) or now
  if now > at then
    tokens = math.min(burst, tokens + (now - at) * rate)
    at = now
  end
  local grant = math.min(want, math.floor(tokens))
  if want < 0 then grant = math.max(want, tokens - burst) end
  tokens = tokens - grant
  redis.call('HSET', key, 'tokens', tostring(tokens), 'at', tostring(at))
  redis.call('PEXPIRE', key, ARGV[5 * i])
  local wait = 0
  if grant < want then wait = math.max(0, math.min(unit, burst) - tokens) / rate end
  out[2 * i - 1] = tostring(grant)
  out[2 * i] = tostring(wait)
end
return out
"""

#: frames, bytes
_UNITS = ("frames", "bytes")


def _script_args(rate: float, burst: float, want: int, unit: int) -> list[str]:
    """One bucket's ARGV of the script (its key idle-expires once refilled, plus
    :data:`IDLE_TTL_S`)."""
    ttl_ms = int((burst / rate + IDLE_TTL_S) * 1000)
    return [repr(rate), repr(burst), str(want), str(unit), str(ttl_ms)]


def chunk(rate: float, burst: float) -> float:
    """Tokens drawn beyond a request's need: :data:`CHUNK_S` of the rate, at least one,
    at most the burst."""
    return min(burst, max(1.0, rate * CHUNK_S))


class _Pool:
    """A customer's tokens drawn from the shared buckets and not spent yet, and its
    rates (kept here: looked up once per customer and reload, not per frame)."""

    __slots__ = ("bytes_rate", "dry_until", "frames_rate", "tokens", "wait")

    def __init__(self, q: QuotaSpec) -> None:
        #: frames, bytes
        self.tokens = [0.0, 0.0]
        #: seconds until the shared bucket has what the last draw lacked
        self.wait = CHUNK_S
        #: until when (clock) drawing again is pointless: the last draw came up short
        self.dry_until = 0.0
        self.frames_rate, self.bytes_rate = q.frames_per_s, q.bytes_per_s


class ClusterQuotas(Quotas):
    """:class:`Quotas` drawn from shared buckets in Redis (see the module text)."""

    #: the ingress awaits :meth:`prepare` before a request's frames are checked
    needs_prepare = True

    def __init__(self, spec: QuotasSpec | None, client: aioredis.Redis, prefix: str, *,
                 timeout: float, clock: Callable[[], float] = time.monotonic,
                 max_customers: int = MAX_QUOTA_CUSTOMERS) -> None:
        super().__init__(spec, max_customers=max_customers)
        self.client, self.prefix, self.timeout, self._clock = client, prefix, timeout, clock
        self._draw = client.register_script(_DRAW)
        self._pools: OrderedDict[str, _Pool] = OrderedDict()
        #: the background draw in flight (one at a time)
        self._drawing: asyncio.Task[None] | None = None
        #: requests the local tokens do not cover draw one at a time
        self._lock = asyncio.Lock()
        #: until when (clock) takes use this host's buckets (the inherited ones): Redis
        #: failed a draw
        self._fallback_until = 0.0
        #: script calls by outcome: ``ok``, ``error`` (each error starts a fallback)
        self.calls = {"ok": 0, "error": 0}
        #: tokens given back to the shared buckets at stop (frames and bytes together)
        self.returned = 0.0

    @property
    def in_fallback(self) -> bool:
        return self._clock() < self._fallback_until

    def _key(self, unit: str, customer: str) -> str:
        return f"{self.prefix}:quota:{unit}:{customer}"

    def _pool(self, customer: str) -> _Pool:
        pool = self._pools.get(customer)
        if pool is None:
            pool = self._pools[customer] = _Pool(self.quota(customer))
            while len(self._pools) > self.max_customers:
                self._pools.popitem(last=False)
        else:
            self._pools.move_to_end(customer)
        return pool

    def _shortfalls(self, demand: dict[str, list[int]], now: float
                    ) -> list[tuple[str, int, float, float, int, int]]:
        """(customer, unit index, rate, burst, tokens to draw, a frame's worth of them)
        wherever this request would leave less than a chunk — what it needs plus two
        chunks — unless the customer's last draw found the shared bucket dry."""
        asks = []
        for customer, need in demand.items():
            pool = self._pools.get(customer)
            if pool is not None and now < pool.dry_until:
                continue
            for u, (rate, burst) in enumerate(rates(self.quota(customer))):
                if rate <= 0:
                    continue
                have = pool.tokens[u] if pool is not None else 0.0
                c = chunk(rate, burst)
                if have - need[u] < c:
                    asks.append((customer, u, rate, burst,
                                 math.ceil(need[u] + 2 * c - have),
                                 math.ceil(need[1] / max(1, need[0])) if u else 1))
        return asks

    def _uncovered(self, demand: dict[str, list[int]]) -> list[str]:
        """Customers of the request whose local tokens do not cover it."""
        out = []
        for customer, need in demand.items():
            pool = self._pools.get(customer)
            q = self.quota(customer)
            if any(rate > 0 and (pool.tokens[u] if pool is not None else 0.0) < need[u]
                   for u, rate in enumerate((q.frames_per_s, q.bytes_per_s))):
                out.append(customer)
        return out

    async def prepare(self, demand: dict[str, list[int]]) -> None:
        """Before a request's frames are checked (``demand``: customer -> [frames,
        payload bytes]). Covered by the local tokens: start a background draw if they
        run low, and go on. Not covered: wait for a draw of our own, one at a time (a
        lock; concurrent requests may have spent an earlier grant, so each re-checks)."""
        if self.in_fallback:
            return
        if not self._uncovered(demand):
            if self._drawing is None:
                asks = self._shortfalls(demand, self._clock())
                if asks:
                    self._drawing = asyncio.create_task(self._background(asks),
                                                        name="cluster-quota-draw")
            return
        async with self._lock:
            if self._drawing is not None:  # a background draw may cover us
                await asyncio.shield(self._drawing)
            if self.in_fallback or not self._uncovered(demand):
                return
            asks = self._shortfalls(demand, self._clock())
            if asks:
                await self._draw_chunks(asks)

    async def _background(self, asks: list[tuple[str, int, float, float, int, int]]
                          ) -> None:
        try:
            await self._draw_chunks(asks)
        finally:
            self._drawing = None

    async def _draw_chunks(self, asks: list[tuple[str, int, float, float, int, int]]
                           ) -> None:
        """One script call for ``asks``; the grants go into the local pools. Redis
        failing it starts :data:`FALLBACK_S` on host buckets."""
        keys, args = [], []
        for customer, u, rate, burst, want, unit in asks:
            keys.append(self._key(_UNITS[u], customer))
            args += _script_args(rate, burst, want, unit)
        try:
            got = await asyncio.wait_for(self._draw(keys=keys, args=args), self.timeout)
            grants = [(float(got[2 * k]), float(got[2 * k + 1])) for k in range(len(asks))]
        except (RedisError, OSError, TimeoutError) as exc:
            self._fall_back(exc)
            return
        except Exception as exc:  # an answer not understood: same, but say where
            log.exception("cluster quotas: unexpected draw failure")
            self._fall_back(exc)
            return
        self.calls["ok"] += 1
        now, dry = self._clock(), dict[str, float]()
        for (customer, u, *_), (granted, wait) in zip(asks, grants, strict=True):
            pool = self._pool(customer)
            pool.tokens[u] += granted
            dry[customer] = max(dry.get(customer, 0.0), wait)
        for customer, wait in dry.items():  # one of its buckets short: it waits
            pool = self._pool(customer)
            pool.wait = wait if wait > 0 else CHUNK_S
            pool.dry_until = now + wait if wait > 0 else 0.0

    def _fall_back(self, exc: BaseException) -> None:
        self.calls["error"] += 1
        self._fallback_until = self._clock() + FALLBACK_S
        log.warning("cluster quotas: Redis failed (%s); host buckets for %gs",
                    exc.__class__.__name__, FALLBACK_S)

    def take(self, customer: str, frames: int, nbytes: int, now: float) -> None:
        if now < self._fallback_until:
            super().take(customer, frames, nbytes, now)
            return
        pool = self._pool(customer)
        tokens = pool.tokens
        short = (0 if pool.frames_rate > 0 and tokens[0] < frames else
                 1 if pool.bytes_rate > 0 and tokens[1] < nbytes else -1)
        if short >= 0:
            self.refused += frames
            rate = pool.bytes_rate if short else pool.frames_rate
            raise QuotaExceeded(
                f"customer {customer!r} is over its cluster quota of {rate:g} "
                f"{_UNITS[short]}/s (retry in {pool.wait:.3g}s)", retry_after=pool.wait)
        if pool.frames_rate > 0:
            tokens[0] -= frames
        if pool.bytes_rate > 0:
            tokens[1] -= nbytes

    def reload(self, spec: QuotasSpec, now: float) -> None:
        super().reload(spec, now)  # the host buckets of a fallback too
        for customer, pool in self._pools.items():
            q = self.quota(customer)
            pool.frames_rate, pool.bytes_rate = q.frames_per_s, q.bytes_per_s

    async def aclose(self) -> None:
        """Stop: give the unspent whole tokens back (one script call, bounded by
        ``timeout``; a failure only logs), then close the connection."""
        if self._drawing is not None:
            self._drawing.cancel()
            await asyncio.gather(self._drawing, return_exceptions=True)
        try:
            await self._give_back()
        finally:
            await self.client.aclose()

    async def _give_back(self) -> None:
        if self.in_fallback:  # Redis just failed us: do not delay the stop on it
            return
        keys, args = [], []
        for customer, pool in self._pools.items():
            for u, (rate, burst) in enumerate(rates(self.quota(customer))):
                whole = math.floor(pool.tokens[u])
                if rate > 0 and whole >= 1:
                    keys.append(self._key(_UNITS[u], customer))
                    args += _script_args(rate, burst, -whole, 1)
                    pool.tokens[u] -= whole
        if not keys:
            return
        try:
            got = await asyncio.wait_for(self._draw(keys=keys, args=args), self.timeout)
        except Exception as exc:  # stopping anyway: the tokens are lost, as on a kill
            self.calls["error"] += 1
            log.warning("cluster quotas: unspent tokens not given back (%s)",
                        exc.__class__.__name__)
            return
        self.calls["ok"] += 1
        self.returned = -sum(float(g) for g in got[0::2])
        log.info("cluster quotas: gave back %g unspent tokens of %d buckets",
                 self.returned, len(keys))


__all__ = ["CHUNK_S", "FALLBACK_S", "ClusterQuotas", "chunk"]
