"""The ownership journal (``{prefix}:owners``) and the reading of it that the cluster
tests check proofs against: who owned a shard when. A Kafka relayer journals its
group's assignment changes from callbacks; an eager rebalance revokes a partition and
hands it straight back in one step, often within one millisecond; a Redis relayer's
leases journal a loss from a background task and a claim inline."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from pqcnet.relayer.bus.leases import OwnershipJournal, ShardLeases
from tests.relayer.cluster import ownership_intervals
from tests.relayer.e2e import start_node
from tests.relayer.helpers import eventually, redis_cli

END = 2**62


def test_a_release_and_the_claim_after_it_in_one_millisecond_keep_the_owner() -> None:
    events = [(100, "r0", 3, "claimed"), (250, "r0", 3, "released"),
              (250, "r0", 3, "claimed"), (900, "r0", 3, "released")]
    assert ownership_intervals(events) == {("r0", 3): [(100, 250), (250, 900)]}


def test_a_claim_by_another_node_ends_a_killed_owner_span() -> None:
    events = [(100, "r0", 1, "claimed"), (400, "r1", 1, "claimed"),
              (500, "r0", 1, "released")]  # r0's late release: not its span any more
    assert ownership_intervals(events) == {("r0", 1): [(100, 400)], ("r1", 1): [(400, END)]}


def _events(redis_url: str, key: str) -> list[tuple[str, str]]:
    """(shard, event) of the journal, read with redis-cli."""
    out = redis_cli(redis_url, "XRANGE", key, "-", "+")
    return re.findall(r'"shard"\n\s*\d+\) "(\d+)"\n\s*\d+\) "event"\n\s*\d+\) "(\w+)"', out)


async def test_changes_posted_back_to_back_reach_the_journal_in_their_order(
        redis_url: str) -> None:
    """Forty revoke/claim steps, each posted from a callback and the loop let run in
    between (as aiokafka's callbacks come): read with redis-cli, the journal has them in
    that order. Written from concurrent tasks without one writer, two pipelines race on
    two pool connections."""
    prefix = f"journal-{uuid.uuid4().hex[:8]}"
    client = aioredis.from_url(redis_url)
    journal = OwnershipJournal(client, prefix, "r0")
    try:
        steps = ["released" if i % 2 == 0 else "claimed" for i in range(40)]
        for event in steps:
            journal.post({2}, event)
            await asyncio.sleep(0)
        await journal.close(10)
        assert _events(redis_url, journal.key) == [("2", e) for e in steps]
    finally:
        redis_cli(redis_url, "DEL", journal.key)
        await client.aclose()


async def test_changes_beyond_the_pending_bound_are_dropped_with_a_warning(
        redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """The queue of changes waiting for their write is bounded: past ``pending`` a
    change is dropped and said so in the log; the ones queued are written, in order."""
    prefix = f"journal-{uuid.uuid4().hex[:8]}"
    client = aioredis.from_url(redis_url)
    journal = OwnershipJournal(client, prefix, "r0", pending=2)
    try:
        with caplog.at_level(logging.WARNING, logger="pqcnet.relayer.bus.leases"):
            for event in ("claimed", "released", "claimed"):
                journal.record({5}, event)
        dropped = [r for r in caplog.records if "entry dropped" in r.getMessage()]
        assert [(r.event, r.shards) for r in dropped] == [("claimed", [5])]  # type: ignore[attr-defined]
        await journal.close(10)
        assert _events(redis_url, journal.key) == [("5", "claimed"), ("5", "released")]
    finally:
        redis_cli(redis_url, "DEL", journal.key)
        await client.aclose()


async def test_a_lease_lost_and_claimed_again_in_one_round_is_journalled_in_that_order(
        redis_url: str) -> None:
    """A lease that lapsed in Redis (deleted behind the holder's back) is lost and, free,
    claimed again by the same round: the journal reads claimed, lost, claimed — the
    loss is written from a background task, the claim inline — and a clean stop's
    release of both shards is written before close returns."""
    prefix = f"journal-{uuid.uuid4().hex[:8]}"
    client = aioredis.from_url(redis_url)
    leases = ShardLeases(client, prefix, "r0", 2, lease=30.0)
    try:
        await leases.round()
        assert leases.owned == {0, 1}
        redis_cli(redis_url, "DEL", leases.key(0))
        await leases.round()
        assert leases.owned == {0, 1}
        await leases.close()
        assert _events(redis_url, leases.journal_key) == [
            ("0", "claimed"), ("1", "claimed"), ("0", "lost"), ("0", "claimed"),
            ("0", "released"), ("1", "released")]
        assert redis_cli(redis_url, "EXISTS", leases.key(0), leases.key(1)).split()[-1] == "0"
    finally:
        redis_cli(redis_url, "DEL", leases.journal_key, leases.members_key)
        await client.aclose()


async def test_a_kafka_relayer_journals_its_group_changes_and_its_clean_stop(
        tmp_path: Path, kafka_bootstrap: str, redis_url: str) -> None:
    """A lone Kafka relayer with shared marks: the group gives it every partition
    (``claimed``), and its clean stop — the bus's close revokes them after the shared
    marks' work is done — still reaches the journal (``released``), written before the
    Redis client it writes with is closed. Seen with ``redis-cli CLIENT LIST``: the
    relayer's named marks connections are there while it runs and gone after the stop
    (a write through a closed redis-py client opens a new connection nobody closes)."""
    tag = uuid.uuid4().hex[:8]
    prefix, node_id = f"journal-{tag}", f"journal-{tag}"
    node = await start_node(tmp_path, backend="kafka", kafka_bootstrap=kafka_bootstrap,
                            kafka_topic=f"pqcnet-journal-{tag}", group=f"journal-{tag}",
                            redis_url=redis_url, redis_prefix=prefix, shards=4,
                            node_id=node_id, kafka_session_timeout=3.0)
    key = f"{prefix}:owners"
    marks = f"name=pqcnet-relayer:{node_id}:marks "
    try:
        await eventually(lambda: node.bus.assignment() == [0, 1, 2, 3], 60)
        await eventually(lambda: len(_events(redis_url, key)) == 4, 10)
        assert marks in redis_cli(redis_url, "CLIENT", "LIST")
    finally:
        await node.stop()
    try:
        assert marks not in redis_cli(redis_url, "CLIENT", "LIST")
        got = _events(redis_url, key)
        assert sorted(got[:4]) == [(str(s), "claimed") for s in range(4)]
        assert sorted(got[4:]) == [(str(s), "released") for s in range(4)]
    finally:
        redis_cli(redis_url, "DEL", key)
