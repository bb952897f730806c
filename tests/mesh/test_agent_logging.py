"""An offline node's failing announcements are logged once, then rate-limited."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pqcnet.mesh.envelope import NodeKeys
from pqcnet.mesh.waku import WakuClientConfig, WakuRestClient, WakuTransport

from .harness import FAST, make_agent, node_key

pytestmark = pytest.mark.timeout(30)


async def test_offline_announce_logs_are_rate_limited(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    now = [1_000_000]
    # a real REST client against a closed loopback port: every publish fails
    dead = WakuTransport(WakuRestClient(WakuClientConfig("http://127.0.0.1:9", timeout_s=0.5,
                                                         retries=0)))
    agent = make_agent(NodeKeys("n0", node_key("n0")), ["n0"], dead, tmp_path,
                       clock=lambda: now[0])
    caplog.set_level(logging.DEBUG, logger="pqcnet.mesh.agent")
    try:
        for _ in range(5):
            await agent.announce()
            now[0] += FAST.tick_ms
        infos = [r for r in caplog.records if r.levelno >= logging.INFO]
        debugs = [r for r in caplog.records if r.levelno == logging.DEBUG]
        assert len(infos) == 1 and infos[0].levelno == logging.INFO
        assert len(debugs) == 4
        assert agent.events["publish_failed"] == 5
        now[0] += agent.config.failure_log_interval_ms
        await agent.announce()
        infos = [r for r in caplog.records if r.levelno >= logging.INFO]
        assert len(infos) == 2 and getattr(infos[1], "failures", 0) == 6
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    finally:
        await dead.close()
        assert agent.bundles is not None
        agent.bundles.close()
