"""Reproduction 5 of issue 11: a relayer starts while its broker is down (degraded),
accepts frames into the overflow queue, and drains them in order once the broker is
back; readiness (the ``degraded`` gauge and flag) says so meanwhile. The broker is a
private redis-server this test starts and stops on its own port."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import httpx
import pytest

from pqcnet.relayer.frame import Frame
from tests.ports import free_port
from tests.relayer.e2e import publisher, start_node, subscriber
from tests.relayer.helpers import eventually, private_redis

pytestmark = [pytest.mark.timeout(90), pytest.mark.services]


def _degraded_gauge(port: int) -> float:
    body = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    line = next(x for x in body.splitlines() if x.startswith("pqcnet_relayer_degraded "))
    return float(line.split()[1])


async def test_relayer_starts_with_its_broker_down_and_drains_when_it_returns(
        tmp_path: Path) -> None:
    rport = free_port()
    node = await start_node(tmp_path, backend="redis", redis_url=f"redis://127.0.0.1:{rport}/0",
                            redis_prefix=f"deg:{uuid.uuid4().hex[:8]}", publish_timeout=0.5,
                            metrics_port=0)
    redis: asyncio.subprocess.Process | None = None
    sub = await subscriber(node.port, "acme")
    try:
        assert node.degraded
        assert _degraded_gauge(node.metrics_port or 0) == 1.0
        pub = await publisher(node.port)
        res = await pub.publish([Frame("acme", "d", s, b"p%d" % s) for s in range(1, 51)])
        assert all(r.accepted and r.overflowed for r in res), res[:2]
        assert node.overflow.total() == 50
        redis = await private_redis(rport, tmp_path / "redis")
        await sub.wait_for(50, 60)
        await asyncio.sleep(0.3)
        assert sub.by_topic[("acme", "d")] == list(range(1, 51))
        await eventually(lambda: not node.degraded, 30)
        assert node.overflow.total() == 0
        assert _degraded_gauge(node.metrics_port or 0) == 0.0
        res = await pub.publish([Frame("acme", "d", 51, b"after")])
        assert res[0].accepted and not res[0].overflowed
        await sub.wait_for(51, 30)
        await pub.close()
    finally:
        await sub.close()
        await node.stop()
        if redis is not None:
            redis.terminate()
            await redis.wait()
