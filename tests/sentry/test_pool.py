"""A sidecar with a pool of sentries: two real `pqcnet sentry run` processes, one killed
(SIGKILL) mid-run — every idempotent request still succeeds; balancing, health and the
non-idempotent rule checked against real in-process sentries."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pqcnet.sentry.config import load_config
from pqcnet.sentry.core import Sentry
from pqcnet.sentry.errors import BackendError
from pqcnet.sentry.server import SentryServer
from pqcnet.sentry.sidecar import serve_http
from pqcnet.sentry.wire import RequestHead
from tests.gcutil import collector_off, live
from tests.procs import PQCNET as PQCNET_EXE
from tests.procs import terminate

from .harness import HttpBackend, Mesh, config_dict, pool_of, sentry_stack, write_config
from .test_cli import free_port

PQCNET = [PQCNET_EXE]
pytestmark = pytest.mark.timeout(120)


@contextlib.contextmanager
def sentry_process(mesh: Mesh, d: Path, backend_port: int, *, workers: int = 1,
                   extra: dict[str, Any] | None = None,
                   **cfg_kw: Any) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A real `pqcnet sentry run` (``workers`` processes) in front of the HTTP backend;
    ``extra``: more top-level config keys."""
    d.mkdir()
    mesh.sentry.save(d / "sentry-id", None)
    port = free_port()
    cfg = config_dict(backend_port, 1, 1, **cfg_kw) | (extra or {})
    cfg["listen"] = f"127.0.0.1:{port}"
    cfg["identity_dir"] = "sentry-id"
    write_config(d, mesh, cfg)
    p = subprocess.Popen([*PQCNET, "sentry", "run", "--config", "sentry.yaml",
                          "--no-passphrase", "--workers", str(workers)], cwd=d,
                         stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert "listening" in (p.stderr.readline() if p.stderr else "")
        yield p, port
    finally:
        terminate(p)


async def test_kill_one_of_two_sentry_processes_idempotent_requests_all_succeed(
        tmp_path: Path, mesh: Mesh) -> None:
    with HttpBackend() as backend, \
            sentry_process(mesh, tmp_path / "a", backend.port) as (a, port_a), \
            sentry_process(mesh, tmp_path / "b", backend.port) as (_b, port_b):
        pool = pool_of(mesh, [port_a, port_b], interval=0.2, timeout=2.0)
        pool.start()
        server = await serve_http(pool)
        local = server.sockets[0].getsockname()[1]
        statuses: list[int] = []
        killed, halfway = asyncio.Event(), asyncio.Event()

        async def client(n: int) -> None:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{local}",
                                         timeout=15) as c:
                for i in range(n):
                    statuses.append((await c.get("/status")).status_code)
                    if len(statuses) >= 40:
                        halfway.set()
                    if i == n // 3:
                        await killed.wait()  # half the run before, half after the kill

        try:
            tasks = [asyncio.create_task(client(30)) for _ in range(6)]
            await halfway.wait()
            served_before = {m.name: m.served for m in pool.members}
            a.send_signal(signal.SIGKILL)  # mid-run: requests are in flight on both
            a.wait(timeout=10)
            killed.set()
            await asyncio.gather(*tasks)
            assert statuses == [200] * 180, [s for s in statuses if s != 200]
            assert all(n > 0 for n in served_before.values()), served_before  # balanced
            dead = next(m for m in pool.members if m.name.endswith(f":{port_a}"))
            assert not dead.healthy and dead.failures >= 1
            # after the kill the survivor carries everything, non-idempotent POSTs too
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{local}",
                                         timeout=15) as c:
                posts = [await c.post("/rpc", json={"id": i}) for i in range(5)]
            assert [r.status_code for r in posts] == [200] * 5
            assert {r.json()["id"] for r in posts} == set(range(5))
        finally:
            server.close()
            await pool.aclose()


async def test_least_outstanding_health_and_the_non_idempotent_rule(
        tmp_path: Path, mesh: Mesh) -> None:
    with HttpBackend(delay=0.4) as backend:
        path = write_config(tmp_path, mesh, config_dict(backend.port, 1, 1))
        async with sentry_stack(mesh, path) as s1, sentry_stack(mesh, path) as s2:
            pool = pool_of(mesh, [s1.port, s2.port, free_port()], interval=0.1,
                           timeout=1.0, backoff=0.1)
            try:
                await pool.check()  # the third address has no sentry: marked down
                assert [m.healthy for m in pool.members] == [True, True, False]
                # four slow calls at once spread 2 + 2 over the healthy sentries
                get = RequestHead("http", "GET", "/status")
                calls = [asyncio.create_task(pool.call(get, b"", idempotent=True))
                         for _ in range(4)]
                await asyncio.sleep(0.2)
                assert sorted(m.outstanding for m in pool.members) == [0, 2, 2]
                for resp, stream, _first in await asyncio.gather(*calls):
                    assert resp.status == 200
                    async for _ in _drain(stream):
                        pass
                assert [m.outstanding for m in pool.members] == [0, 0, 0]
                # a sentry dying after a POST went out: the POST fails (it may have been
                # forwarded); a GET sent at the same time moves to the other sentry
                post = RequestHead("http", "POST", "/rpc")
                first, other = pool.members[0], pool.members[1]
                other.healthy, other.retry_at = False, pool._clock() + 60  # out of rotation
                p = asyncio.create_task(pool.call(post, b'{"id":1}', idempotent=False))
                g = asyncio.create_task(pool.call(get, b"", idempotent=True))
                await asyncio.sleep(0.15)
                assert first.outstanding == 2
                await s1.server.aclose()
                with pytest.raises(BackendError):
                    await p
                resp, _stream, _first = await g
                assert resp.status == 200 and pool.failovers == 1
                assert not first.healthy
            finally:
                await pool.aclose()


async def _drain(stream: Any) -> Any:
    while chunk := await stream.recv():
        yield chunk


async def test_a_sentry_that_comes_back_rejoins_the_rotation(tmp_path: Path, mesh: Mesh) -> None:
    """Health checks: a sentry down at start is skipped (its requests go to the other),
    and once it listens again the background check puts it back and it serves."""
    with HttpBackend() as backend:
        path = write_config(tmp_path, mesh, config_dict(backend.port, 1, 1))
        late_port = free_port()
        async with sentry_stack(mesh, path) as s1:
            pool = pool_of(mesh, [s1.port, late_port], interval=0.1, timeout=1.0,
                           backoff=0.1, max_backoff=0.2)
            pool.start()
            get = RequestHead("http", "GET", "/status")
            try:
                for _ in range(6):
                    resp, stream, _first = await pool.call(get, b"", idempotent=True)
                    assert resp.status == 200
                    async for _ in _drain(stream):
                        pass
                late = pool.members[1]
                assert not late.healthy and late.served == 0
                again = SentryServer(Sentry(load_config(path)), mesh.sentry)
                await again.start(port=late_port)  # the sentry comes (back) up
                try:
                    for _ in range(100):
                        if late.healthy:
                            break
                        await asyncio.sleep(0.05)
                    assert late.healthy
                    for _ in range(10):
                        resp, stream, _first = await pool.call(get, b"", idempotent=True)
                        assert resp.status == 200
                        async for _ in _drain(stream):
                            pass
                    assert late.served > 0  # back in the least-outstanding rotation
                finally:
                    await again.aclose()
            finally:
                await pool.aclose()


async def test_bounds_max_tunnels_refuses_the_one_too_many(tmp_path: Path, mesh: Mesh) -> None:
    """`bounds.max_tunnels` is the sentry's tunnel bound: the third tunnel to a sentry
    configured for two is refused when it connects; once one closes, a new one gets in."""
    from pqcnet import qstp
    from pqcnet.errors import PqcnetError

    with HttpBackend() as backend:
        cfg = config_dict(backend.port, 1, 1)
        cfg["bounds"]["max_tunnels"] = 2
        path = write_config(tmp_path, mesh, cfg)
        async with sentry_stack(mesh, path) as s:
            first = await qstp.connect("127.0.0.1", s.port, mesh.acme)
            second = await qstp.connect("127.0.0.1", s.port, mesh.acme)
            with pytest.raises((PqcnetError, OSError)):
                extra = await asyncio.wait_for(
                    qstp.connect("127.0.0.1", s.port, mesh.acme), 20)
                await extra.ping()  # (if the dial itself got through, the tunnel is dead)
            m = s.sentry.metrics
            assert m.value("pqcnet_sentry_tunnels_refused_at_limit_total") == 1
            assert m.value("pqcnet_sentry_tunnels_active") == 2
            assert m.value("pqcnet_sentry_handshake_failures_total",
                           {"refused_by": "local"}) == 0
            await first.close()
            for _ in range(100):
                if s.server.server.tunnels < 2:
                    break
                await asyncio.sleep(0.05)
            again = await qstp.connect("127.0.0.1", s.port, mesh.acme)
            assert await again.ping() >= 0
            await again.close()
            await second.close()


async def test_handshake_failures_are_counted_by_who_refused(tmp_path: Path,
                                                            mesh: Mesh) -> None:
    """`pqcnet sentry run`'s /metrics: a sidecar from a CA the sentry's peers do not
    share refuses the sentry's certificate (``refused_by="peer"``: what a sentry whose
    own certificate went bad sees), a scanner's garbage is refused by the sentry
    (``"local"``); read with an HTTP client, as Prometheus would."""
    from pqcnet import qstp
    from pqcnet.errors import PqcnetError
    from pqcnet.identity import dev_identities

    metrics = free_port()
    with HttpBackend() as backend, \
            sentry_process(mesh, tmp_path / "s", backend.port,
                           extra={"metrics_port": metrics}) as (_p, port):
        _, (stranger,) = dev_identities("other.test", "spiffe://other.test/x/sidecar/s")
        with pytest.raises(PqcnetError):
            await asyncio.wait_for(qstp.connect("127.0.0.1", port, stranger), 20)
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            await asyncio.wait_for(reader.read(), 20)  # closed on us
            writer.close()
        want = {'pqcnet_sentry_handshake_failures_total{refused_by="peer"} 1.0',
                'pqcnet_sentry_handshake_failures_total{refused_by="local"} 2.0',
                "pqcnet_sentry_tunnels_refused_at_limit_total 0.0"}
        lines: set[str] = set()
        async with httpx.AsyncClient(timeout=10) as c:
            for _ in range(100):
                text = (await c.get(f"http://127.0.0.1:{metrics}/metrics")).text
                lines = set(text.splitlines())
                if want <= lines:
                    break
                await asyncio.sleep(0.05)
        assert want <= lines, sorted(x for x in lines if "handshake" in x or "at_limit" in x)


@pytest.mark.parametrize("window", [131_072, 8 * 1024 * 1024])
async def test_bounds_tunnel_buffer_bytes_is_the_window_a_client_gets(
        tmp_path: Path, mesh: Mesh, window: int) -> None:
    """`bounds.tunnel_buffer_bytes` bounds what one tunnel can make the sentry buffer:
    it is the connection window the client is granted (read on the client's side, after
    the preface), so `max_tunnels` times it bounds the whole sentry."""
    from pqcnet import qstp

    with HttpBackend() as backend:
        cfg = config_dict(backend.port, 1, 1)
        cfg["bounds"]["tunnel_buffer_bytes"] = window
        path = write_config(tmp_path, mesh, cfg)
        async with sentry_stack(mesh, path) as s:
            tunnel = await qstp.connect("127.0.0.1", s.port, mesh.acme)
            try:
                assert await tunnel.ping() >= 0  # the preface and its ACK are in
                assert tunnel.connection.connection_send_window == window
            finally:
                await tunnel.close()


async def test_bounds_tunnel_buffer_total_bytes_is_shared_by_the_tunnels(
        tmp_path: Path, mesh: Mesh) -> None:
    """`bounds.tunnel_buffer_total_bytes` is the budget the tunnels' windows come from:
    with room for one window's extra, the second tunnel starts with the initial 64 KiB
    (read on the clients' side) and the sentry's metrics say so."""
    from pqcnet import qstp
    from pqcnet.qstp.config import INITIAL_WINDOW

    window = 256 * 1024
    with HttpBackend() as backend:
        cfg = config_dict(backend.port, 1, 1)
        cfg["bounds"]["tunnel_buffer_bytes"] = window
        cfg["bounds"]["tunnel_buffer_total_bytes"] = window - INITIAL_WINDOW
        path = write_config(tmp_path, mesh, cfg)
        async with sentry_stack(mesh, path) as s:
            tunnels = [await qstp.connect("127.0.0.1", s.port, mesh.acme) for _ in range(2)]
            try:
                for t in tunnels:
                    assert await t.ping() >= 0
                assert [t.connection.connection_send_window for t in tunnels] == [
                    window, INITIAL_WINDOW]
                m = s.sentry.metrics
                name = "pqcnet_sentry_tunnel_buffer_budget_bytes"
                assert m.value(name, {"state": "total"}) == window - INITIAL_WINDOW
                assert m.value(name, {"state": "reserved"}) == window - INITIAL_WINDOW
                assert m.value("pqcnet_sentry_tunnel_reduced_windows_total") == 1
            finally:
                for t in tunnels:
                    await t.close()


def test_a_tunnel_buffer_below_the_initial_window_is_refused(tmp_path: Path,
                                                               mesh: Mesh) -> None:
    import yaml

    from pqcnet.sentry.config import load_config
    from pqcnet.sentry.errors import SentryConfigError
    from tests.config.schemacheck import assert_schema

    with HttpBackend() as backend:
        cfg = config_dict(backend.port, 1, 1)
        path = write_config(tmp_path, mesh, cfg)
        cfg["bounds"]["tunnel_buffer_bytes"] = 1024  # below QSTP's initial window
        assert_schema("sentry", cfg, valid=False)  # the published schema says so too
        path.write_text(yaml.safe_dump(cfg))
        with pytest.raises(SentryConfigError, match="tunnel_buffer_bytes"):
            load_config(path)


async def test_failed_calls_leave_nothing_for_the_cyclic_collector(mesh: Mesh) -> None:
    """A pool whose sentries are all down fails every call. The error it kept to report
    (``last``) used to keep its traceback, whose frame held the error again and the
    request's head and body: during an outage every failed request stayed in memory
    until a full collection, which serving processes run rarely. Counted with the
    collector off: no sentry error is left after the calls."""
    pool = pool_of(mesh, [free_port(), free_port()])  # nobody listens there
    head = RequestHead("http", "POST", "/rpc")
    try:
        with collector_off():
            before = live(BackendError)
            for idempotent in (True, False):
                try:
                    await pool.call(head, b"x" * 4096, idempotent=idempotent)
                except BackendError as exc:
                    assert "no sentry" in str(exc)
                else:
                    raise AssertionError("a call to sentries that are down succeeded")
                for m in pool.members:  # down members are retried at once, not skipped
                    m.healthy, m.retry_at = True, 0.0
            assert live(BackendError) <= before, live(BackendError) - before
    finally:
        await pool.aclose()
