"""A sentry under ``pqcnet node run`` watches its config file: editing the sentry YAML's
rate limit while the node runs changes what live traffic gets (it used to be read once:
the node assembled its own sentry without the watcher ``pqcnet sentry run`` had).

A real subprocess on the embedded control plane (no Waku needed), a real sidecar over
QSTP, a real HTTP backend; the file is replaced the way an editor saves it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ..sentry.harness import HttpBackend, config_dict, make_mesh, sidecar_to, write_config
from .harness import NodeProcess, write_yaml
from .test_node_sentry import _status

pytestmark = pytest.mark.timeout(120)


async def test_node_sentry_hot_reloads_its_config_file(tmp_path: Path) -> None:
    mesh = make_mesh()
    mesh.sentry.save(tmp_path / "sentry-id", None)
    with HttpBackend() as http:
        generous = {**config_dict(http.port, 1, 1), "identity_dir": "sentry-id"}
        write_config(tmp_path, mesh, generous)
        config = write_yaml(tmp_path / "node.yaml", {
            "role": "sentry", "sentry": "sentry.yaml",
            "control_plane": {"transport": "embedded", "announce_interval_s": 1.0}})
        async with NodeProcess(config) as node:
            sidecar = sidecar_to(node.ready["port"], mesh.acme, mesh.acme_issuer)
            try:
                assert [await _status(sidecar) for _ in range(10)] == [200] * 10
                strict = {**config_dict(http.port, 1, 1, rate=0.2, burst=2),
                          "identity_dir": "sentry-id"}
                write_config(tmp_path, mesh, strict)
                seen: list[int] = []
                for _ in range(60):  # the watcher polls every second
                    seen.append(await _status(sidecar))
                    if seen[-1] == 429:
                        break
                    await asyncio.sleep(0.1)
                assert seen[-1] == 429, f"the edited rate limit never applied: {seen}"
                after = [await _status(sidecar) for _ in range(6)]
                assert after.count(429) >= 5, after
            finally:
                await sidecar.aclose()
            status = await node.stop()
        assert status == 0, node.stderr.decode()[-2000:]
    assert b"sentry policy reloaded" in node.stderr
