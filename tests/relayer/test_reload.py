"""SIGHUP on a real ``pqcnet relayer run``: the policy part (authz, quotas) applies at
once; keys of the static part the edit changed are named (they apply at a restart: a
stderr JSON line, a warning log line, ``pqcnet_relayer_config_restart_pending``) instead
of being ignored without a word; a broken file changes nothing and says why."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml

from pqcnet.relayer.frame import Frame
from tests.relayer.e2e import GRANT_ALL, publisher
from tests.relayer.helpers import eventually, scrape_metrics
from tests.relayer.proc import RelayerProcess, write_config

pytestmark = pytest.mark.timeout(120)
GAUGE = "pqcnet_relayer_config_restart_pending"


def _edit(path: Path, **changes: Any) -> None:
    """Rewrite the relayer file with ``changes`` (None: the key removed)."""
    data = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        if value is None:
            data["relayer"].pop(key, None)
        else:
            data["relayer"][key] = value
    path.write_text(yaml.safe_dump(data))


def _reloads(log: Path) -> list[dict[str, Any]]:
    """The ``reloaded`` JSON lines the relayer wrote to stderr so far."""
    out = []
    for line in log.read_text().splitlines():
        if line.startswith('{"reloaded"'):
            out.append(json.loads(line))
    return out


async def test_sighup_applies_the_policy_and_names_static_keys(tmp_path: Path) -> None:
    path = write_config(tmp_path, metrics_port=0)
    log = tmp_path / "relayer.log"
    relayer = await RelayerProcess(path).start()
    pub = None
    try:
        assert relayer.proc is not None
        metrics = int(relayer.ready["metrics_port"])
        pub = await publisher(relayer.port)
        seq = 0

        async def accepted() -> bool:
            nonlocal seq
            seq += 1
            (res,) = await pub.publish([Frame("globex", "orders", seq, b"x")])
            assert res.accepted or res.code == 16, res  # 16: not authorized
            return res.accepted

        async def hup(n: int) -> dict[str, Any]:
            relayer.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
            await eventually(lambda: len(_reloads(log)) >= n, 30)
            return _reloads(log)[n - 1]

        assert await accepted()  # GRANT_ALL: acme's publisher may publish for globex
        assert (await asyncio.to_thread(scrape_metrics, metrics))[GAUGE] == 0
        # the grant withdrawn (policy) and the tunnel limit and shards edited (static)
        _edit(path, authz={}, max_tunnels=77, shards=16)
        first = await hup(1)
        assert first["reloaded"] is True
        assert first["restart_pending"] == ["max_tunnels", "shards"]
        assert not await accepted()  # the policy applied at once
        assert (await asyncio.to_thread(scrape_metrics, metrics))[GAUGE] == 1
        # a broken file: nothing changes, and the reload says why
        path.write_text("relayer: {node_id: [\n")
        broken = await hup(2)
        assert broken["reloaded"] is False and "relayer.yaml" in broken["error"]
        assert not await accepted()
        # the static keys back as started, the grant back: nothing pending
        write_config(tmp_path, metrics_port=0, authz=GRANT_ALL)
        last = await hup(3)
        assert last == {"reloaded": True, "config": str(path), "restart_pending": []}
        assert await accepted()
        assert (await asyncio.to_thread(scrape_metrics, metrics))[GAUGE] == 0
        assert "config keys changed that apply only at a restart" in log.read_text()
    finally:
        if pub is not None:
            await pub.close()
        await relayer.stop()
