"""What a bench relayer leaves on the operator's Redis and Kafka, and dropping it.

A benchmark is a guest on the brokers it measures through. Each ``bench relayer`` run
on Redis left its prefix's 32 streams (every frame of the run), marks and volume
hashes behind — about 10 MB of Redis memory per default run — and on Kafka a
32-partition topic (two with the raw baseline's). Kept, they grow the broker run after
run, and with it the AOF rewrites Redis forks on the same cores: one that fell into a
paced phase put its p99 at 31 ms instead of 7 to 9 (benchmarks/README, "What a bench run
leaves on the brokers"). So a run drops what its relayer wrote once it is measured
(``--keep-broker-state`` keeps it to look at), and reports what it dropped — a run
that fails or is interrupted (Ctrl-C) as well, on stderr. The Kafka relayer's consumer
group (its committed offsets) goes too: aiokafka's admin client has no call for that, so
:func:`drop_kafka_group` sends Kafka's DeleteGroups request to the group's coordinator
itself, through aiokafka's client (kept, every run's group stayed in the broker's group
list until ``offsets.retention.minutes`` — a week by default).
"""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path
from typing import Any

import yaml

#: keys unlinked per call
_UNLINK_BATCH = 500


async def drop_redis_prefix(url: str, prefix: str) -> dict[str, int]:
    """Unlink every key under ``prefix:``; returns how many of each kind (the key's
    first part after the prefix: ``s`` streams, ``seq`` marks, ``kowner``...)."""
    import redis.asyncio as aioredis

    kinds: collections.Counter[str] = collections.Counter()
    r = aioredis.from_url(url)
    try:
        batch: list[bytes] = []
        async for key in r.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            kinds[key[len(prefix) + 1:].split(b":", 1)[0].decode(errors="replace")] += 1
            if len(batch) >= _UNLINK_BATCH:
                await r.unlink(*batch)
                batch.clear()
        if batch:
            await r.unlink(*batch)
    finally:
        await r.aclose()
    return dict(sorted(kinds.items()))


async def drop_kafka_topic(bootstrap: str, topic: str) -> None:
    """Delete ``topic`` (its partitions and every record the run wrote)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
    await admin.start()
    try:
        await admin.delete_topics([topic])
    finally:
        await admin.close()


async def drop_kafka_group(bootstrap: str, group: str) -> str:
    """Delete consumer group ``group`` and its committed offsets; returns ``"deleted"``
    or the name of the broker's error (``GroupIdNotFound``: nothing was committed;
    ``NonEmptyGroup``: a member is still in it — one killed, not stopped, stays until
    its session times out)."""
    from aiokafka.client import AIOKafkaClient
    from aiokafka.errors import for_code
    from aiokafka.protocol.admin import DeleteGroupsRequest

    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
    await client.bootstrap()
    try:
        coordinator = await client.coordinator_lookup(0, group)  # 0: a consumer group
        resp = await client.send(coordinator, DeleteGroupsRequest([group]))
    finally:
        await client.close()
    ((_name, code),) = resp.results
    return "deleted" if code == 0 else str(for_code(code).__name__)


async def drop_relayer_state(cfg: Path) -> dict[str, Any]:
    """Drop what the relayer of config ``cfg`` wrote to its brokers (its Redis prefix,
    its Kafka topic); returns what was dropped, for the bench's JSON."""
    rel = yaml.safe_load(await asyncio.to_thread(cfg.read_text))["relayer"]
    out: dict[str, Any] = {}
    if rel.get("redis_url") and rel.get("redis_prefix"):
        out["redis_prefix"] = rel["redis_prefix"]
        out["redis_keys"] = await drop_redis_prefix(rel["redis_url"], rel["redis_prefix"])
    if rel.get("backend") == "kafka" and rel.get("kafka_topic"):
        await drop_kafka_topic(rel["kafka_bootstrap"], rel["kafka_topic"])
        out["kafka_topic"] = rel["kafka_topic"]
        if group := rel.get("group"):  # the bench's own; never the default "relayer"
            out["kafka_group"] = {"name": group,
                                  "result": await drop_kafka_group(rel["kafka_bootstrap"],
                                                                   group)}
    return out
