"""A relayer that started degraded (its broker down) becomes ready once the broker is
back: the finished bus-connect task is not a stopped worker. (Found in the compose
network on a machine under load: a start slower than the bus timeout left both
relayers unready — "workers: stopped: bus-connect" — although they served.)"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from pathlib import Path

import pytest

from tests.ports import free_port
from tests.relayer.e2e import start_node
from tests.relayer.helpers import eventually

pytestmark = [pytest.mark.timeout(90), pytest.mark.services]


async def test_ready_after_leaving_degraded_mode(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server not installed (scripts/services install redis)")
    rport = free_port()
    (tmp_path / "redis").mkdir()
    node = await start_node(tmp_path, backend="redis", redis_url=f"redis://127.0.0.1:{rport}/0",
                            redis_prefix=f"rdy:{uuid.uuid4().hex[:8]}", publish_timeout=0.5)
    redis: asyncio.subprocess.Process | None = None
    try:
        assert node.degraded
        redis = await asyncio.create_subprocess_exec(
            "redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--dir",
            str(tmp_path / "redis"), "--save", "", stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)
        await eventually(lambda: not node.degraded, 30)
        await asyncio.sleep(0.2)
        assert node.ready()["workers"] is True, node.ready()
    finally:
        await node.stop()
        if redis is not None:
            redis.terminate()
            await redis.wait()
