"""A Kafka cluster's shared marks and volume are fenced by the group generation
(decision 0025), against a real Kafka group and a real Redis: a member that claimed a
partition in an older generation — paused past its session, resuming with records it
had fetched — can neither claim the partition back nor save marks or volume for it
once the partition's new owner claimed it; the new owner's writes go through."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from pqcnet.relayer.bus.kafka import KafkaBus
from pqcnet.relayer.bus.kafka_owners import GENERATION_DIGITS, PartitionOwners
from pqcnet.relayer.errors import BusUnavailable
from pqcnet.relayer.seqstore import RedisSeqStore
from tests.relayer.helpers import redis_cli

pytestmark = [pytest.mark.services, pytest.mark.timeout(180)]

T = ("acme", "c")
VOL = {(7, "acme", "c", 1): [10, 1]}


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.from_url(redis_url)
    yield c
    await c.aclose()


async def _settle(buses: list[KafkaBus], want: set[int]) -> None:
    """Poll until the group gave every partition to exactly one of ``buses``, each at
    least one (their consumers join and rebalance in the background)."""
    async with asyncio.timeout(90):
        while True:
            sets = [set(b.assignment()) for b in buses]
            if all(sets) and set().union(*sets) == want and sum(map(len, sets)) == len(want):
                return
            for b in buses:
                with contextlib.suppress(BusUnavailable):  # an assignment resets first
                    await b.consume(0, "g", block=0.1)
            await asyncio.sleep(0.1)


async def test_a_stale_member_can_neither_claim_nor_save(
        kafka_bootstrap: str, redis_url: str, client: aioredis.Redis) -> None:
    tag = uuid.uuid4().hex[:8]
    topic, prefix = f"pqcnet-kown-{tag}", f"test:kown:{tag}"
    made: list[KafkaBus] = []

    def member(name: str) -> tuple[KafkaBus, RedisSeqStore]:
        bus = KafkaBus(kafka_bootstrap, 2, topic=topic, rebalance=True, client_id=name,
                       session_timeout=6.0, revoke_grace=1.0)
        bus.owners = PartitionOwners(client, prefix, bus.owner_token)
        made.append(bus)
        return bus, RedisSeqStore(client, prefix, name, fence=bus.owners.fence)

    try:
        a, store_a = member("a")
        await a.start()
        await _settle([a], {0, 1})
        for s in (0, 1):  # what a's workers do at their reset, then a save each
            await a.rewind(s, "g")
            await store_a.save(s, {T: 5}, VOL)
        # a revocation begins (the callback marks the partitions first): batches in
        # flight are still saved and acked under the generation that assigned them,
        # or every rebalance would wait out revoke_grace and redeliver them
        a._revoking |= {0, 1}
        for s in (0, 1):
            await store_a.save(s, {T: 6}, VOL)
        a._revoking -= {0, 1}
        stale = a.owner_token(1)
        assert stale is not None
        b, store_b = member("b")
        await b.start()
        await _settle([a, b], {0, 1})  # a rebalance: a newer generation
        s = b.assignment()[0]
        await b.rewind(s, "g")  # b's worker resets on the new partition: its claim
        fresh = b.owner_token(s)
        assert fresh is not None and fresh[:GENERATION_DIGITS] > stale[:GENERATION_DIGITS]
        key = f"{prefix}:kowner:{s}"
        assert redis_cli(redis_url, "--raw", "GET", key).strip() == fresh
        # a, no longer given the partition, is refused without asking Redis ...
        with pytest.raises(BusUnavailable, match="not leased"):
            await store_a.save(s, {T: 99}, VOL)
        # ... and a paused a that still holds its old generation is refused by Redis:
        # neither its claim nor its save of marks and volume goes through
        assert a.owners is not None
        a.owners._token = lambda shard: stale
        with pytest.raises(BusUnavailable, match="newer group generation"):
            await a.owners.claim(s)
        assert a.fenced_out == 1
        with pytest.raises(BusUnavailable, match="lease lost"):
            await store_a.save(s, {T: 99}, VOL)
        assert redis_cli(redis_url, "--raw", "GET", key).strip() == fresh
        assert await store_b.load_topics(s, [T]) == {T: 6}
        assert await store_a.load_volume() == {(7, "acme", "c", 1): [40, 4]}  # 4 saves
        # the owner's write goes through
        await store_b.save(s, {T: 9}, VOL)
        assert await store_b.load_topics(s, [T]) == {T: 9}
        assert await store_b.load_volume() == {(7, "acme", "c", 1): [10, 1]}
    finally:
        for bus in made:
            await bus.close()
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
