"""A tenant's pipes (TCP pipes, WebSockets) are held to its plan's ``pipe_rate``.

Before, a pipe was admitted once and then moved bytes as fast as its ends could: a
tenant's WebSocket or TCP pipe could take the whole backend link, whatever its plan
said (decision 0022 named it). Now every byte either way is taken from one bucket per
tenant (``pipe_rate`` bytes/s, ``pipe_burst``), shared by the sentry's workers; a pipe
above it is slowed — read less often — never cut, and the idle watchdog does not
mistake a slowed pipe for an idle one.

The bucket is checked with a clock given by hand (no timing); through a real sidecar,
sentry and TCP backend only what a correct limiter cannot break is asserted: the
transfer takes *at least* what the rate allows (a broken limit is faster), arrives
whole, and the counters say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from pqcnet._util.shmlimits import SharedLimitState
from pqcnet.sentry.config import load_config
from pqcnet.sentry.errors import SentryConfigError
from pqcnet.sentry.limiter import PIPE_MIN_BURST, Plan, RateLimiter
from pqcnet.sentry.shared import SharedRateLimiter
from pqcnet.sentry.sidecar import serve_tcp
from tests.ports import port_run
from tests.relayer.helpers import eventually, scrape_metrics

from .harness import (
    HttpBackend,
    Mesh,
    Stack,
    TcpEcho,
    config_dict,
    sentry_stack,
    sidecar_to,
    tcp_echo,
    write_config,
)
from .test_pool import sentry_process

pytestmark = pytest.mark.timeout(120)

LIMITED = Plan(rate=100, burst=100, pipe_rate=1000, pipe_burst=PIPE_MIN_BURST)


def test_the_bucket_gives_the_burst_then_the_rate() -> None:
    lim = RateLimiter({"acme": LIMITED}, Plan(rate=100, burst=100))
    assert lim.take_bytes("acme", PIPE_MIN_BURST, 0.0) == 0.0  # a quiet tenant's burst
    assert lim.take_bytes("acme", 500, 0.0) == pytest.approx(0.5)  # then 1000 B/s
    assert lim.take_bytes("acme", 500, 0.25) == pytest.approx(0.25)  # none taken before
    assert lim.take_bytes("acme", 500, 0.5) == 0.0
    assert lim.take_bytes("globex", 10**9, 0.0) == 0.0  # no pipe_rate: no limit


def test_a_reload_lifts_lowers_and_sets_the_limit() -> None:
    lim = RateLimiter({"acme": LIMITED}, Plan(rate=100, burst=100))
    assert lim.take_bytes("acme", PIPE_MIN_BURST, 0.0) == 0.0
    lim.set_plans({"acme": Plan(rate=100, burst=100)}, Plan(rate=100, burst=100), 0.0)
    assert lim.take_bytes("acme", 10**9, 0.0) == 0.0  # lifted
    lim.set_plans({"acme": LIMITED}, Plan(rate=100, burst=100), 0.0)
    assert lim.take_bytes("acme", PIPE_MIN_BURST, 0.0) == 0.0  # a fresh bucket
    assert lim.take_bytes("acme", 1000, 0.0) == pytest.approx(1.0)


def test_plans_refuse_a_pipe_rate_or_burst_out_of_range() -> None:
    with pytest.raises(SentryConfigError):
        Plan(rate=1, burst=1, pipe_rate=0)
    with pytest.raises(SentryConfigError):
        Plan(rate=1, burst=1, pipe_rate=1000, pipe_burst=PIPE_MIN_BURST - 1)
    assert Plan(rate=1, burst=1, pipe_rate=10**6).pipe == Plan(10**6, 10**6)
    assert Plan(rate=1, burst=1, pipe_rate=10).pipe == Plan(10, PIPE_MIN_BURST)


def test_workers_draw_on_one_bucket_per_tenant() -> None:
    """Two workers' limiters on one segment: what one took, the other cannot."""
    owner = SharedLimitState.create(workers=2, slots=64)
    other = SharedLimitState.attach(owner.path)
    try:
        a = SharedRateLimiter(owner, {"acme": LIMITED}, Plan(rate=100, burst=100))
        b = SharedRateLimiter(other, {"acme": LIMITED}, Plan(rate=100, burst=100))
        assert a.take_bytes("acme", PIPE_MIN_BURST, 10.0) == 0.0
        assert b.take_bytes("acme", 1000, 10.0) == pytest.approx(1.0)
        assert b.take_bytes("acme", 1000, 11.0) == 0.0
        assert a.take_bytes("acme", 1, 11.0) > 0
        assert b.take_bytes("globex", 10**9, 11.0) == 0.0
    finally:
        other.close()
        owner.close()


# --------------------------------------------------------------------------- end to end


@contextlib.asynccontextmanager
async def _pipe_stack(tmp_path: Path, mesh: Mesh, tcp_port: int, pipe_rate: float | None,
                      idle: float) -> AsyncIterator[tuple[Stack, int]]:
    cfg = config_dict(1, 1, tcp_port, max_in_flight=4)
    if pipe_rate is not None:
        cfg["limits"]["tenants"]["acme"].update(pipe_rate=pipe_rate, pipe_burst=PIPE_MIN_BURST)
    cfg["bounds"]["tcp_idle_timeout"] = idle
    async with sentry_stack(mesh, write_config(tmp_path, mesh, cfg)) as s:
        sidecar = s.sidecar(mesh.acme, mesh.acme_issuer)
        server = await serve_tcp(sidecar, "tcp-echo")
        try:
            yield s, server.sockets[0].getsockname()[1]
        finally:
            server.close()
            await sidecar.aclose()


async def _echo(port: int, total: int) -> float:
    """``total`` bytes up the pipe and their echo back; wall seconds."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.monotonic()
    try:
        async def send() -> None:
            for _ in range(total // 4096):
                w.write(b"x" * 4096)
                await w.drain()

        sender = asyncio.create_task(send())
        got = await asyncio.wait_for(r.readexactly(total), 60)
        await sender
        assert got == b"x" * total  # whole: slowed, not cut
        return time.monotonic() - t0
    finally:
        w.close()


def _value(s: Stack, name: str, **labels: str) -> float:
    return s.sentry.metrics.value(name, labels)


@pytest.mark.parametrize("pipe_rate, total, idle", [
    (200_000.0, 300 * 4096, 30.0),
    # pieces of 16 KiB wait ~0.8 s each, longer than the idle timeout: the pipe is
    # slowed, and the watchdog must not close it as idle
    (20_000.0, 15 * 4096, 0.6)], ids=["rate", "slower-than-the-idle-timeout"])
async def test_a_tenants_pipe_moves_no_faster_than_its_pipe_rate(
        tmp_path: Path, mesh: Mesh, pipe_rate: float, total: int, idle: float) -> None:
    backend = TcpEcho()
    async with tcp_echo(backend) as tcp_port, \
            _pipe_stack(tmp_path, mesh, tcp_port, pipe_rate, idle) as (s, port):
        seconds = await _echo(port, total)
        # both directions draw on the bucket: 2 * total bytes, the first burst free
        floor = (2 * total - PIPE_MIN_BURST) / pipe_rate
        assert seconds >= 0.95 * floor, (seconds, floor)
        await eventually(lambda: s.sentry.gate.in_flight == 0, 10)
        throttled = _value(s, "pqcnet_sentry_tenant_pipe_throttled_seconds_total",
                           tenant="acme")
        assert 0.5 * floor <= throttled <= 2 * seconds + 1, (throttled, floor, seconds)
        for direction in ("up", "down"):
            assert _value(s, "pqcnet_sentry_tenant_bytes_total", tenant="acme",
                          direction=direction) == total
        assert _value(s, "pqcnet_sentry_rejections_total", reason="PipeIdle") == 0
        assert backend.opened == 1


async def test_without_a_pipe_rate_nothing_waits(tmp_path: Path, mesh: Mesh) -> None:
    async with tcp_echo() as tcp_port, \
            _pipe_stack(tmp_path, mesh, tcp_port, None, 30.0) as (s, port):
        await _echo(port, 300 * 4096)
        assert _value(s, "pqcnet_sentry_tenant_pipe_throttled_seconds_total",
                      tenant="acme") == 0.0
        assert _value(s, "pqcnet_sentry_tenant_bytes_total", tenant="acme",
                      direction="down") == 300 * 4096


async def test_two_workers_hold_a_tenant_to_one_pipe_rate(tmp_path: Path, mesh: Mesh) -> None:
    """``sentry run --workers 2``: 16 tunnels (the kernel puts some on each worker —
    their own metrics say so), a pipe on each; together they move no faster than the
    tenant's one ``pipe_rate``. A bucket per worker would let them move twice as fast."""
    rate, per_pipe, pipes = 100_000.0, 3 * 4096, 16
    metrics = port_run(1)
    async with tcp_echo() as tcp_port:
        with HttpBackend() as http:
            cfg = config_dict(http.port, 1, tcp_port)
            cfg["limits"]["tenants"]["acme"].update(pipe_rate=rate,
                                                    pipe_burst=PIPE_MIN_BURST)
            with sentry_process(mesh, tmp_path / "s", http.port, workers=2, extra={
                    "metrics_port": metrics, "limits": cfg["limits"],
                    "backends": cfg["backends"]}) as (_p, port):
                sidecars = [sidecar_to(port, mesh.acme, mesh.acme_issuer)
                            for _ in range(pipes)]
                servers = [await serve_tcp(s, "tcp-echo") for s in sidecars]
                try:
                    t0 = time.monotonic()
                    await asyncio.gather(*(_echo(srv.sockets[0].getsockname()[1], per_pipe)
                                           for srv in servers))
                    seconds = time.monotonic() - t0
                finally:
                    for srv in servers:
                        srv.close()
                    for s in sidecars:
                        await s.aclose()
                moved = []
                for p in (metrics, metrics + 1):
                    seen = await asyncio.to_thread(scrape_metrics, p)
                    moved.append(seen['pqcnet_sentry_tenant_bytes_total{direction="up",'
                                      'tenant="acme"}'])
    assert sum(moved) == pipes * per_pipe and all(moved), moved  # both workers carried
    floor = (2 * pipes * per_pipe - PIPE_MIN_BURST) / rate
    assert seconds >= 0.95 * floor, (seconds, floor)


async def test_a_reload_limits_a_pipe_that_is_already_open(tmp_path: Path, mesh: Mesh) -> None:
    """The plan is read for every piece a pipe takes: a ``pipe_rate`` set by a hot
    reload holds the pipes open before it too."""
    rate, total = 50_000.0, 12 * 4096
    async with tcp_echo() as tcp_port, \
            _pipe_stack(tmp_path, mesh, tcp_port, None, 30.0) as (s, port):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        try:
            async def echo(n: int) -> float:
                t0 = time.monotonic()
                w.write(b"y" * n)
                assert await asyncio.wait_for(r.readexactly(n), 60) == b"y" * n
                return time.monotonic() - t0

            await echo(total)
            name = "pqcnet_sentry_tenant_pipe_throttled_seconds_total"
            assert _value(s, name, tenant="acme") == 0.0  # no limit yet
            cfg = yaml.safe_load(s.config_path.read_text())
            cfg["limits"]["tenants"]["acme"].update(pipe_rate=rate, pipe_burst=PIPE_MIN_BURST)
            s.config_path.write_text(yaml.safe_dump(cfg))
            assert s.sentry.reload_file(load_config(s.config_path)) == []  # policy only
            seconds = await echo(total)
        finally:
            w.close()
    assert seconds >= 0.95 * (2 * total - PIPE_MIN_BURST) / rate, seconds
    assert _value(s, name, tenant="acme") > 0
