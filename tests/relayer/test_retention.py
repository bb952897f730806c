"""Retention of proven epochs: proof files, persisted volume and the meter keep only the
newest ``keep_epochs`` anchored epochs; a restart neither resurrects nor re-anchors them."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from pqcnet.relayer.frame import Frame, shard_for
from pqcnet.relayer.metering import VolumeDelta
from tests.relayer.e2e import publisher, start_node, subscriber
from tests.relayer.helpers import redis_cli

pytestmark = pytest.mark.timeout(60)


def _backend(request: pytest.FixtureRequest, backend: str) -> dict[str, Any]:
    if backend == "redis":
        return {"backend": "redis", "redis_url": request.getfixturevalue("redis_url"),
                "redis_prefix": f"test:{uuid.uuid4().hex[:8]}"}
    return {}


@pytest.mark.parametrize("backend", ["embedded", "redis"])
async def test_old_proven_epochs_are_pruned_and_stay_pruned(
        backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    kw = {"keep_epochs": 2, "epoch_seconds": 60.0, **_backend(request, backend)}
    node = await start_node(tmp_path, **kw)
    try:
        for e in range(1, 6):  # five epochs of traffic, as workers persist them
            delta: VolumeDelta = {(e, "acme", "c", 1): [100 * e, e]}
            await node.store.save(0, {}, delta)
            node.meter.apply(delta)
        proven = node.prove_closed_epochs(now=60.0 * 10)
        assert [p.epoch for p in proven] == [1, 2, 3, 4, 5]
        assert await node.prune_epochs() == 3
        assert sorted(node.proofs) == [4, 5]
        assert node.meter.epochs() == [4, 5]
        assert sorted(p.name for p in (node.data_dir / "proofs").iterdir()) == [
            "4.proof", "5.proof"]
        assert sorted(k[0] for k in await node.store.load_volume()) == [4, 5]
        assert await node.prune_epochs() == 0
    finally:
        await node.stop()
    node = await start_node(tmp_path, **kw)  # restart: nothing comes back, nothing re-anchored
    try:
        assert sorted(node.proofs) == [4, 5]
        assert node.meter.epochs() == [4, 5]
        assert node.prove_closed_epochs(now=60.0 * 10) == []
        assert sum(r.bytes for r in node.meter.query()) == 900
    finally:
        await node.stop()


async def test_redis_streams_are_trimmed_to_redis_max_len(
        tmp_path: Path, redis_url: str) -> None:
    """``redis_max_len`` reaches the bus: after 400 acknowledged one-frame entries on one
    shard, ``redis-cli XLEN`` sees the stream cut back to the limit plus the trim's slack
    (every 64 acks, whole stream nodes of 100), not the 400 the default keeps; every
    frame was delivered and nothing is left pending in the group."""
    prefix = f"test:{uuid.uuid4().hex[:8]}"
    node = await start_node(tmp_path, backend="redis", redis_url=redis_url,
                            redis_prefix=prefix, redis_max_len=50)
    pub = sub = None
    try:
        sub = await subscriber(node.port, "acme")
        pub = await publisher(node.port)
        for s in range(1, 401):  # one request each: one stream entry each
            [res] = await pub.publish([Frame("acme", "trim", s, b"x")])
            assert res.accepted and not res.overflowed, res
        await sub.wait_for(400, 60)
        assert sub.by_topic[("acme", "trim")] == list(range(1, 401))
        key = f"{prefix}:s:{shard_for('acme', 'trim', 8)}"  # the stream, named here
        group = node.cfg.group
        for _ in range(200):
            length = int(redis_cli(redis_url, "XLEN", key).split()[-1])
            pending = int(redis_cli(redis_url, "XPENDING", key, group).splitlines()[0]
                          .split()[-1])
            if pending == 0 and length <= 50 + 64 + 100:
                break
            await asyncio.sleep(0.05)
        assert pending == 0
        assert 0 < length <= 50 + 64 + 100, length
    finally:
        if pub is not None:
            await pub.close()
        if sub is not None:
            await sub.close()
        await node.stop()
