"""The ownership journal (``{prefix}:owners``) and the reading of it that the cluster
tests check proofs against: who owned a shard when. A Kafka relayer journals its
group's assignment changes from callbacks; an eager rebalance revokes a partition and
hands it straight back in one step, often within one millisecond."""

from __future__ import annotations

import asyncio
import re
import uuid
from pathlib import Path

from tests.relayer.cluster import ownership_intervals
from tests.relayer.e2e import start_node
from tests.relayer.helpers import redis_cli

END = 2**62


def test_a_release_and_the_claim_after_it_in_one_millisecond_keep_the_owner() -> None:
    events = [(100, "r0", 3, "claimed"), (250, "r0", 3, "released"),
              (250, "r0", 3, "claimed"), (900, "r0", 3, "released")]
    assert ownership_intervals(events) == {("r0", 3): [(100, 250), (250, 900)]}


def test_a_claim_by_another_node_ends_a_killed_owner_span() -> None:
    events = [(100, "r0", 1, "claimed"), (400, "r1", 1, "claimed"),
              (500, "r0", 1, "released")]  # r0's late release: not its span any more
    assert ownership_intervals(events) == {("r0", 1): [(100, 400)], ("r1", 1): [(400, END)]}


async def test_assignment_changes_reach_the_journal_in_the_order_they_came(
        tmp_path: Path, redis_url: str) -> None:
    """Forty revoke/claim steps made back to back (as aiokafka's callbacks make them):
    read with redis-cli, the journal has them in that order. Each step's write is its
    own task; unserialized, two of them race on two pool connections."""
    prefix = f"journal-{uuid.uuid4().hex[:8]}"
    node = await start_node(tmp_path, backend="redis", redis_url=redis_url,
                            redis_prefix=prefix, shards=4)
    key = f"{prefix}:owners"
    try:
        before = int(redis_cli(redis_url, "XLEN", key).split()[-1])
        steps = ["released" if i % 2 == 0 else "claimed" for i in range(40)]
        for event in steps:
            node._journal_assignment(*(({2}, set()) if event == "claimed" else (set(), {2})))
        await asyncio.gather(*node._journal_tasks)
        got = re.findall(r'"event"\n\s*\d+\) "(\w+)"',
                         redis_cli(redis_url, "XRANGE", key, "-", "+"))
        assert got[before:] == steps
    finally:
        await node.stop()
        redis_cli(redis_url, "DEL", key)
