"""SIGKILL of a relayer subprocess mid-stream, and broker outages, per backend.

Shown: no acknowledged frame is lost and none is seen twice by the application;
during a broker outage backpressure engages (FLOW PAUSE reaches publishers), the
overflow queue fills, then replays in order once the broker is back."""

from __future__ import annotations

import asyncio
import socket
import uuid
from pathlib import Path
from typing import Any

import pytest

from pqcnet.relayer.governance import VolumeFilter, pull_volume
from tests import services_ctl
from tests.relayer.e2e import start_node
from tests.relayer.helpers import assert_exactly_once_in_order, eventually
from tests.relayer.proc import RelayerProcess, write_config
from tests.relayer.resilient import ResilientPublisher, ResilientSubscriber

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _backend_kw(request: pytest.FixtureRequest, backend: str) -> dict[str, Any]:
    if backend == "redis":
        return {"backend": "redis", "redis_url": request.getfixturevalue("redis_url"),
                "redis_prefix": f"test:{uuid.uuid4().hex[:8]}"}
    if backend == "kafka":
        return {"backend": "kafka", "kafka_bootstrap": request.getfixturevalue("kafka_bootstrap"),
                "kafka_topic": f"pqcnet-crash-{uuid.uuid4().hex[:8]}"}
    return {}


@pytest.mark.parametrize("backend", ["embedded", "redis", "kafka"])
async def test_sigkill_mid_stream_loses_nothing_acked(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest,
) -> None:
    port = _free_port()
    cfg = write_config(tmp_path, listen_port=port, grpc_port=0, **_backend_kw(request, backend))
    proc = await RelayerProcess(cfg).start()
    topics = [("acme", f"ch{i}") for i in range(6)]
    n = 300
    sub = ResilientSubscriber(lambda: port, "acme")
    # paced (~2 s of publishing) so the SIGKILL always lands mid-stream
    pubs = [ResilientPublisher(lambda: port, topics[k::2], n, pace=0.02) for k in range(2)]
    try:
        await eventually(lambda: sum(p.total_acked() for p in pubs) >= len(topics) * n // 3)
        proc.kill()  # SIGKILL mid-stream: no shutdown code runs
        await proc.stop()
        proc = await RelayerProcess(cfg).start()
        await asyncio.wait_for(asyncio.gather(*(p.task for p in pubs)), 120)
        assert sum(p.reconnects for p in pubs) >= 1  # the kill really cut them off
        await sub.wait_for(len(topics) * n)
        await asyncio.sleep(0.5)
        assert_exactly_once_in_order(sub.by_topic, {t: n for t in topics})
        assert sub.app_duplicates == 0  # redelivered frames stopped at the SDK's cursor
        # metering survived the kill: counted once per distinct frame, none twice
        vol = await pull_volume(f"127.0.0.1:{proc.ready['grpc_port']}", VolumeFilter())
        assert (vol.total_frames, vol.total_bytes) == (len(topics) * n, len(topics) * n * 32)
    finally:
        await sub.close()
        for p in pubs:
            p.task.cancel()
        await proc.stop()


@pytest.mark.services
@pytest.mark.parametrize("service", ["redis", "kafka"])
async def test_broker_outage_backpressure_overflow_replay(
    service: str, tmp_path: Path, request: pytest.FixtureRequest,
) -> None:
    kw = _backend_kw(request, service)
    node = await start_node(tmp_path, high_water=100, low_water=20, retry_after=0.3,
                            backpressure_interval=0.1, publish_timeout=0.5, **kw)
    port = node.port
    topics = [("acme", f"ch{i}") for i in range(4)]
    n = 1500
    sub = ResilientSubscriber(lambda: port, "acme")
    pub: ResilientPublisher | None = None
    try:
        pub = ResilientPublisher(lambda: port, topics, n, batch=10, pace=0.02)
        await eventually(lambda: pub is not None and pub.total_acked() >= 200)
        await asyncio.to_thread(services_ctl.stop, service)
        try:
            # frames keep being ACKed: into the overflow queue, and publishers get paused
            await eventually(lambda: node.overflow.total() >= 150)
            await eventually(lambda: bool(node.flow.paused), 30)
            assert node.ingress.stats.pauses_sent >= 1, (
                node.flow.paused, [(x.shards, x.paused) for x in node.ingress.sessions])
        finally:
            await asyncio.to_thread(services_ctl.start, service)
        await asyncio.wait_for(pub.task, 120)
        await sub.wait_for(len(topics) * n, 120)
        await asyncio.sleep(0.5)
        assert_exactly_once_in_order(sub.by_topic, {t: n for t in topics})
        assert sub.app_duplicates == 0
        assert pub.overflowed >= 150 and node.publisher.replayed >= 150
        assert node.overflow.total() == 0
        await eventually(lambda: not node.flow.paused, 30)  # backlog drained: RESUME
    finally:
        await sub.close()
        if pub is not None:
            pub.task.cancel()
        await node.stop()
