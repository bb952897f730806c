"""Retention of proven epochs: proof files, persisted volume and the meter keep only the
newest ``keep_epochs`` anchored epochs; a restart neither resurrects nor re-anchors them."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from pqcnet.relayer.metering import VolumeDelta
from tests.relayer.e2e import start_node

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
