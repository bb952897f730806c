"""SIGKILL of a relayer subprocess mid-stream, broker outages, and both at once.

Shown: no acknowledged frame is lost and none is seen twice by the application;
during a broker outage backpressure engages (FLOW PAUSE reaches publishers), the
overflow queue fills, then replays in order once the broker is back — also when the
relayer is SIGKILLed while the queue holds acknowledged frames and restarts before
the broker returns."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from pqcnet.relayer.governance import VolumeFilter, pull_volume
from tests import services_ctl
from tests.ports import free_port
from tests.relayer.e2e import start_node
from tests.relayer.helpers import (
    assert_exactly_once_in_order,
    eventually,
    metrics_reach,
    private_redis,
    scrape_metrics,
)
from tests.relayer.proc import RelayerProcess, write_config
from tests.relayer.resilient import ResilientPublisher, ResilientSubscriber

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]


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
    port = free_port()
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


@pytest.mark.services
async def test_sigkill_while_the_overflow_queue_holds_acked_frames(tmp_path: Path) -> None:
    """The broker (a private redis-server) is SIGKILLed mid-stream: the relayer keeps
    acknowledging into its overflow queue. Then the relayer is SIGKILLed too, and
    restarts while the broker is still down (degraded), taking more frames into the
    queue; then the broker comes back. Every frame the publishers saw acknowledged
    reaches the application once, in order — those queued before the kill come only
    from the queue on disk (the publishers never resend an acknowledged frame) and the
    restarted relayer registers them with its gap fence (its /metrics say so) — and
    each is billed once."""
    rport, port = free_port(), free_port()
    redis = await private_redis(rport, tmp_path / "redis")
    cfg = write_config(tmp_path, listen_port=port, grpc_port=0, backend="redis",
                       redis_url=f"redis://127.0.0.1:{rport}/0", redis_prefix="crash",
                       publish_timeout=0.5, metrics_port=0)
    proc = await RelayerProcess(cfg).start()
    topics = [("acme", f"ch{i}") for i in range(4)]
    n = 400
    sub = ResilientSubscriber(lambda: port, "acme")
    pubs = [ResilientPublisher(lambda: port, topics[k::2], n, batch=5, pace=0.05)
            for k in range(2)]
    try:
        await eventually(lambda: sum(p.total_acked() for p in pubs) >= 200)
        redis.kill()  # the broker dies: acknowledged frames go to the overflow queue
        await redis.wait()
        await eventually(lambda: sum(p.overflowed for p in pubs) >= 60)
        queued_before_kill = sum(p.overflowed for p in pubs)
        proc.kill()
        await proc.stop()
        proc = await RelayerProcess(cfg).start()  # degraded: the broker is still down
        await eventually(lambda: sum(p.overflowed for p in pubs) >= queued_before_kill + 40)
        redis = await private_redis(rport, tmp_path / "redis")
        await asyncio.wait_for(asyncio.gather(*(p.task for p in pubs)), 120)
        assert sum(p.reconnects for p in pubs) >= 1  # the kill really cut them off
        await sub.wait_for(len(topics) * n, 120)
        await asyncio.sleep(0.5)
        assert_exactly_once_in_order(sub.by_topic, {t: n for t in topics})
        assert sub.app_duplicates == 0
        vol = await pull_volume(f"127.0.0.1:{proc.ready['grpc_port']}", VolumeFilter())
        assert (vol.total_frames, vol.total_bytes) == (len(topics) * n, len(topics) * n * 32)
        seen = scrape_metrics(proc.ready["metrics_port"])  # the restarted process's own
        fence = 'pqcnet_relayer_gap_fence_events_total{event="%s"}'
        assert seen[fence % "restored"] >= queued_before_kill  # read back from disk
        assert seen[fence % "late_on_bus"] == 0 and seen["pqcnet_relayer_gaps_frames_total"] == 0
        assert seen["pqcnet_relayer_overflow_records"] == 0
        # every worker read past the end its bus had at its start, and the first sweep
        # three leases after its claims ran (decision 0023)
        await metrics_reach(proc.ready["metrics_port"],
                            {"pqcnet_relayer_shards_catching_up": 0.0}, 30)
    finally:
        await sub.close()
        for p in pubs:
            p.task.cancel()
        await proc.stop()
        redis.kill()
        await redis.wait()
