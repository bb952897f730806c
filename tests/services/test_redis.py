"""Redis from ``scripts/services``: reachable on loopback, and durable across a restart.

The restart test is the promise other areas build on ("nothing acknowledged is lost
across a Redis restart"): a stream entry acknowledged by XADD must still be there after
``scripts/services restart redis``, at the same URL.
"""

from __future__ import annotations

import uuid
from urllib.parse import urlparse

import pytest
import redis.asyncio as aioredis

from tests import services_ctl

pytestmark = [pytest.mark.services, pytest.mark.timeout(120)]


async def test_ping_on_loopback(redis_url: str) -> None:
    assert urlparse(redis_url).hostname == "127.0.0.1"
    client = aioredis.from_url(redis_url)
    try:
        assert await client.ping() is True
        info = await client.info("persistence")
        assert info["aof_enabled"] == 1
        config = await client.config_get("appendfsync")
        assert config["appendfsync"] == "always"
    finally:
        await client.aclose()


async def test_acknowledged_entries_survive_restart(redis_url: str) -> None:
    stream = f"pqcnet:test:services:{uuid.uuid4().hex}"
    client = aioredis.from_url(redis_url)
    try:
        ids = [await client.xadd(stream, {"n": str(i)}) for i in range(50)]
    finally:
        await client.aclose()

    services_ctl.restart("redis")
    assert services_ctl.env()["PQCNET_REDIS_URL"] == redis_url

    client = aioredis.from_url(redis_url)
    try:
        entries = await client.xrange(stream)
        assert entries is not None
        assert [e[0] for e in entries] == ids
        assert [(e[1] or {}).get(b"n") for e in entries] == [str(i).encode() for i in range(50)]
        await client.delete(stream)
    finally:
        await client.aclose()
