"""Fencing a Kafka cluster's shared marks and volume by group generation (decision 0025).

A Kafka relayer cluster with ``redis_url`` keeps dedup marks and metered volume in Redis
(:func:`pqcnet.relayer.node.shared_marks`), so they move with a partition. Kafka fences
a stale member's offset *commits* (its generation is old), but not its writes to Redis:
a member paused past its session timeout that resumes with records already fetched
would deliver them, move the marks and meter them — frames metered twice, once by it
and once by the partition's new owner.

So each partition has an owner key ``{prefix}:kowner:{shard}`` holding the token
``<generation, 12 digits>:<member>`` of the member that claimed it last (member: the
``group.instance.id`` under static membership, else the coordinator's member id). A
worker claims its partition at every reset (:meth:`PartitionOwners.claim`, from
``KafkaBus.rewind``): the claim succeeds if the key holds our token, is empty, or holds
an older generation. Every save of marks and volume, and every gap reservation, then
checks the key still holds our token in the same script as the write (the
``fence`` of :class:`~pqcnet.relayer.seqstore.RedisSeqStore`, as a Redis cluster's
leases do). A stale member's claim and saves are refused; it neither moves the marks
nor meters, and its worker resets.

Keys expire after :data:`OWNER_TTL_MS` (a day), far below Kafka's offsets retention
(a week by default): a group deleted and recreated restarts its generations at 1, and
by then its old owner keys are gone. A long-lived owner whose key expired has its next
save refused, resets and claims again.
"""

from __future__ import annotations

from collections.abc import Callable

import redis.asyncio as aioredis

from pqcnet.relayer.errors import BusUnavailable

#: the owner keys' lifetime (ms): below any Kafka offsets retention
OWNER_TTL_MS = 24 * 3600 * 1000
#: digits of the zero-padded generation at the start of a token (compared as text)
GENERATION_DIGITS = 12

# KEYS[1] owner key; ARGV[1] our token, ARGV[2] ttl ms -> 1 claimed (or already ours), 0
_CLAIM = f"""
local cur = redis.call('GET', KEYS[1])
local n = {GENERATION_DIGITS}
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if (not cur) or string.sub(cur, 1, n) < string.sub(ARGV[1], 1, n) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""


def owner_token(generation: int, member: str) -> str:
    """The token of ``member`` in group ``generation`` (compares by generation as text)."""
    return f"{generation:0{GENERATION_DIGITS}d}:{member}"


class PartitionOwners:
    """The owner keys of one Kafka cluster's partitions, in the shared marks' Redis."""

    def __init__(self, client: aioredis.Redis, prefix: str,
                 token: Callable[[int], str | None]) -> None:
        self._prefix = prefix
        #: shard -> our token while the group gives us the partition, else None
        self._token = token
        self._claim = client.register_script(_CLAIM)
        #: claims refused: a newer generation holds the partition (we are stale)
        self.refused = 0

    def key(self, shard: int) -> str:
        """The owner key of ``shard``."""
        return f"{self._prefix}:kowner:{shard}"

    def fence(self, shard: int) -> tuple[str, str] | None:
        """(owner key, our token) a write for ``shard`` must find in Redis; None when
        the group does not give us the partition (the write is refused unasked)."""
        token = self._token(shard)
        return (self.key(shard), token) if token is not None else None

    async def claim(self, shard: int) -> None:
        """Make the owner key of ``shard`` ours, unless a newer generation holds it.
        Raises :class:`BusUnavailable` when refused (counted) or Redis does not answer."""
        token = self._token(shard)
        if token is None:
            raise BusUnavailable(f"partition {shard} is not this member's in the current "
                                 "group generation: not claimed")
        try:
            ok = int(await self._claim(keys=[self.key(shard)], args=[token, OWNER_TTL_MS]))
        except (aioredis.RedisError, OSError) as exc:
            raise BusUnavailable(f"redis unavailable claiming partition {shard}: {exc}"
                                 ) from None
        if not ok:
            self.refused += 1
            raise BusUnavailable(f"partition {shard} is held by a newer group generation: "
                                 "this member is stale")
