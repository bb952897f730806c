"""`pqcnet sentry run --workers N`: N processes on one port (SO_REUSEPORT) with one set
of limits — the tenant bucket, the concurrency gate and each tenant's cap on the gate
hold across workers."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from pqcnet.sentry.errors import ConcurrencyLimited, RateLimited, TenantConcurrencyLimited
from pqcnet.sentry.limiter import Plan
from pqcnet.sentry.shared import SharedConcurrencyGate, SharedLimitState, SharedRateLimiter
from pqcnet.sentry.sidecar import Sidecar
from pqcnet.sentry.wire import RequestHead
from tests.ports import port_run
from tests.procs import children, listener_pid, running
from tests.relayer.helpers import eventually, scrape_metrics

from .harness import HttpBackend, Mesh, sidecar_to
from .test_pool import sentry_process

pytestmark = pytest.mark.timeout(120)
STATUS = RequestHead("http", "GET", "/status")


def test_buckets_and_gate_are_one_across_attached_workers() -> None:
    owner = SharedLimitState.create(workers=2, slots=64)
    other = SharedLimitState.attach(owner.path)
    # anonymous memory reached through the owner's descriptor: no name in /dev/shm
    assert os.readlink(owner.path).startswith("/memfd:pqcnet-limits")
    try:
        # per-subject 1/s, burst 3; the tenant as a whole may do far more
        plan = Plan(rate=1.0, burst=3, tenant_rate=1000.0, tenant_burst=1000.0)
        a = SharedRateLimiter(owner, {"acme": plan}, plan)
        b = SharedRateLimiter(other, {"acme": plan}, plan)
        now = 1000.0
        assert a.check("acme", "alice", now) == 2
        assert b.check("acme", "alice", now) == 1  # the same bucket, seen by worker 1
        a.check("acme", "alice", now)
        with pytest.raises(RateLimited) as err:
            b.check("acme", "alice", now)
        assert err.value.retry_after == pytest.approx(1.0)
        assert b.check("acme", "bob", now) == 2  # another client, another bucket
        # the tenant-wide bucket is shared across workers too
        tight = Plan(rate=100.0, burst=100, tenant_rate=1.0, tenant_burst=2)
        a2 = SharedRateLimiter(owner, {"globex": tight}, tight)
        b2 = SharedRateLimiter(other, {"globex": tight}, tight)
        a2.check("globex", "u1", now)
        b2.check("globex", "u2", now)
        with pytest.raises(RateLimited):
            a2.check("globex", "u3", now)
        assert a.check("acme", "alice", now + 1.0) == 0  # refilled one token
        assert b.level("acme", "alice", now + 2.5) == pytest.approx(1.5)
        # more clients than a probe window holds: old buckets are evicted and come back full
        for i in range(500):
            a.check("acme", f"c{i}", now + 3)
        assert a.level("acme", "alice", now + 3) <= 3
        g0 = SharedConcurrencyGate(owner, 0, 2)
        g1 = SharedConcurrencyGate(other, 1, 2)
        g0.acquire()
        g1.acquire()
        with pytest.raises(ConcurrencyLimited):
            g0.acquire()
        assert g0.global_in_flight() == 2 and g0.in_flight == 1
        owner.reset_worker(1)  # worker 1 died: the supervisor frees its slots
        g0.acquire()
        g0.release()
        g0.release()
        assert g1.global_in_flight() == 0
    finally:
        other.close()
        owner.close()
    assert not Path(owner.path).exists() or "memfd:" not in os.readlink(owner.path)


def test_workers_stop_when_the_supervisor_is_killed(tmp_path: Path, mesh: Mesh) -> None:
    """SIGKILL (OOM killer, a careless operator) gives the supervisor no chance to stop
    its workers: the kernel must, or they keep serving on the port with nobody
    restarting them. The shared segment goes with them (nothing left in /dev/shm)."""
    shm = Path("/dev/shm")
    before = set(shm.glob("pqcnet-sentry-limits-*"))
    with HttpBackend() as backend, sentry_process(mesh, tmp_path / "s", backend.port,
                                                  workers=2) as (p, port):
        workers = [c for c in children(p.pid)
                   if "multiprocessing.spawn" in Path(f"/proc/{c}/cmdline").read_text()]
        assert len(workers) == 2, workers
        assert any(os.readlink(f).startswith("/memfd:pqcnet-sentry-limits")
                   for f in Path(f"/proc/{p.pid}/fd").iterdir())
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        p.kill()
        p.wait()
        deadline = time.monotonic() + 30
        while any(running(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [w for w in workers if running(w)], "orphaned workers still running"
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert not set(shm.glob("pqcnet-sentry-limits-*")) - before


async def _hammer(sidecar: Sidecar, until: float) -> tuple[int, int]:
    ok = limited = 0
    while time.monotonic() < until:
        head, stream, _first = await sidecar.call(STATUS, b"")
        while await stream.recv():
            pass
        if head.status == 200:
            ok += 1
        elif head.status == 429:
            limited += 1
        else:
            raise AssertionError(head)
    return ok, limited


async def test_two_workers_enforce_one_rate_limit(tmp_path: Path, mesh: Mesh) -> None:
    rate, burst, seconds = 30.0, 10.0, 4.0
    with HttpBackend() as backend, sentry_process(mesh, tmp_path / "s", backend.port,
                                                  workers=2, rate=rate, burst=burst) as (
            _p, port):
        # eight tunnels (the kernel spreads connections, not streams, over the workers),
        # one client identity: one bucket
        sidecars = [sidecar_to(port, mesh.acme, mesh.acme_issuer) for _ in range(8)]
        try:
            for s in sidecars:
                await s.session()
            start = time.monotonic()
            got = await asyncio.gather(*(_hammer(s, start + seconds) for s in sidecars))
            elapsed = time.monotonic() - start
        finally:
            for s in sidecars:
                await s.aclose()
    ok = sum(g[0] for g in got)
    limited = sum(g[1] for g in got)
    allowed = burst + rate * elapsed
    assert limited > 0
    # generous: per-worker buckets would admit about twice this
    assert 0.7 * allowed <= ok <= 1.3 * allowed, (ok, allowed, limited)


async def _statuses_of_concurrent_calls(port: int, mesh: Mesh, subjects: list[str]
                                        ) -> list[int]:
    """One acme sidecar (its own tunnel) per subject, all connected first, then one
    status call each at once; the response statuses, sorted."""
    sidecars = [sidecar_to(port, mesh.acme, mesh.acme_issuer, subject=u) for u in subjects]
    try:
        for s in sidecars:
            await s.session()
        heads = await asyncio.gather(*(s.call(STATUS, b"") for s in sidecars))
    finally:
        for s in sidecars:
            await s.aclose()
    return sorted(h.status for h, _s, _f in heads)


async def test_two_workers_share_the_concurrency_gate(tmp_path: Path, mesh: Mesh) -> None:
    with HttpBackend(delay=0.8) as backend, sentry_process(
            mesh, tmp_path / "s", backend.port, workers=2, max_in_flight=2) as (_p, port):
        statuses = await _statuses_of_concurrent_calls(port, mesh,
                                                       [f"u{i}" for i in range(8)])
    assert backend.seen.max_in_flight <= 2
    assert statuses.count(429) >= 4, statuses


def test_a_tenants_cap_is_one_across_attached_workers() -> None:
    """A tenant's cap (here half of a gate of 4) counts its holders on every worker:
    two on worker 0 and 1 leave it no third anywhere, while another tenant still
    enters. A dead worker's holders are freed with it. Rows of tenants holding nothing
    are reused, and more tenants in flight than a probe window of rows is a refusal,
    never a miscount."""
    owner = SharedLimitState.create(workers=2, slots=64, held_slots=64)
    other = SharedLimitState.attach(owner.path)
    try:
        g0 = SharedConcurrencyGate(owner, 0, 4, 0.5)
        g1 = SharedConcurrencyGate(other, 1, 4, 0.5)
        g0.acquire("acme")
        g1.acquire("acme")
        for g in (g0, g1):
            with pytest.raises(TenantConcurrencyLimited, match="has 2 requests"):
                g.acquire("acme")
        g1.acquire("globex")
        assert g0.tenant_in_flight("acme") == 2 and g1.tenant_in_flight("globex") == 1
        assert (g0.by_tenant, g1.by_tenant) == ({"acme": 1}, {"acme": 1, "globex": 1})
        owner.reset_worker(1)  # worker 1 died holding one of acme's and globex's
        assert g0.tenant_in_flight("acme") == 1 and g0.tenant_in_flight("globex") == 0
        g0.acquire("acme")
        g0.release("acme")
        g0.release("acme")
        assert g0.tenant_in_flight("acme") == 0 and g0.global_in_flight() == 0
        # 500 tenants one after another through 64 rows: a row is free again once its
        # tenant holds nothing (else a window fills and acquire refuses)
        for i in range(500):
            g0.acquire(f"t{i}")
            g0.release(f"t{i}")
        assert g0.global_in_flight() == 0 and g0.by_tenant == {}
    finally:
        other.close()
        owner.close()
    tiny = SharedLimitState.create(workers=1, slots=8, held_slots=2)
    try:
        gate = SharedConcurrencyGate(tiny, 0, 100, 1.0)
        tenants = [f"t{i}" for i in range(5)]
        taken = []
        for t in tenants:  # two rows: at most two tenants in flight at once
            try:
                gate.acquire(t)
                taken.append(t)
            except ConcurrencyLimited as exc:
                assert "shared table full" in str(exc)
        assert len(taken) == 2 and gate.in_flight == 2
        assert sum(gate.tenant_in_flight(t) for t in tenants) == 2
        for t in taken:
            gate.release(t)
        gate.acquire(tenants[4])  # rows free again
        assert gate.tenant_in_flight(tenants[4]) == 1
    finally:
        tiny.close()


async def test_two_workers_keep_one_tenant_cap(tmp_path: Path, mesh: Mesh) -> None:
    """16 tunnels of acme (spread over both workers by the kernel) each start a slow
    call at once; the gate is 4 with a tenant share of half. acme gets exactly 2 in
    flight — per-worker caps would let it hold 2 on each worker, the whole gate — and
    globex, calling while acme's 2 are held, is served."""
    slow = HttpBackend(delay=1.5)
    with slow as backend, sentry_process(mesh, tmp_path / "s", backend.port, workers=2,
                                         max_in_flight=4, tenant_share=0.5) as (_p, port):
        acme = [sidecar_to(port, mesh.acme, mesh.acme_issuer, subject=f"u{i}")
                for i in range(16)]
        globex = sidecar_to(port, mesh.globex, mesh.globex_issuer, tenant="globex",
                            subject="gina")
        try:
            for s in [*acme, globex]:
                await s.session()
            calls = [asyncio.create_task(s.call(STATUS, b"")) for s in acme]
            await eventually(lambda: backend.seen.in_flight >= 2, 20)
            head, stream, _first = await globex.call(
                RequestHead("http", "POST", "/globex/x"), b'{"q": 1}')
            while await stream.recv():
                pass
            heads = await asyncio.gather(*calls)
        finally:
            for s in [*acme, globex]:
                await s.aclose()
    statuses = sorted(h.status for h, _s, _f in heads)
    assert statuses == [200] * 2 + [429] * 14, statuses
    assert head.status == 200
    assert backend.seen.max_in_flight <= 3  # acme's 2 and globex's 1
    assert [q["path"] for q in backend.seen.requests].count("/globex/x") == 1


async def test_a_killed_worker_gives_back_its_tenants_slots(tmp_path: Path,
                                                            mesh: Mesh) -> None:
    """SIGKILL of the worker serving acme's two slow calls — acme's whole cap, half of a
    gate of 4 — from outside, found by its metrics port. The calls it held fail; the
    supervisor zeroes that worker's counts and restarts it, and acme then gets exactly
    its two slots again (a leaked count would refuse all three calls)."""
    metrics = port_run(1)
    gauge = 'pqcnet_sentry_tenant_in_flight_requests{tenant="acme"}'
    with HttpBackend(delay=3.0) as backend, sentry_process(
            mesh, tmp_path / "s", backend.port, workers=2, max_in_flight=4,
            tenant_share=0.5, extra={"metrics_port": metrics}) as (p, port):
        first = sidecar_to(port, mesh.acme, mesh.acme_issuer, subject="u0")
        try:  # one tunnel: both calls on one worker
            await first.session()
            calls = [asyncio.create_task(first.call(STATUS, b"")) for _ in range(2)]
            await eventually(lambda: backend.seen.in_flight >= 2, 20)
            held = [(await asyncio.to_thread(scrape_metrics, metrics + i)).get(gauge, 0.0)
                    for i in (0, 1)]
            assert sorted(held) == [0.0, 2.0], held
            victim_port = metrics + held.index(2.0)
            victim = listener_pid(victim_port)
            assert victim is not None and victim in children(p.pid)
            os.kill(victim, signal.SIGKILL)
            lost = await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await first.aclose()
        assert not [x for x in lost if not isinstance(x, BaseException)
                    and x[0].status == 200], lost
        await eventually(lambda: listener_pid(victim_port) not in (None, victim), 60)
        assert p.poll() is None
        again = await _statuses_of_concurrent_calls(port, mesh, [f"v{i}" for i in range(3)])
    assert again == [200, 200, 429]


async def _said(p: subprocess.Popen[str], text: str) -> str:
    """The next line of the supervisor's stderr (shared with its workers' logs) that
    contains ``text``."""
    assert p.stderr is not None
    async with asyncio.timeout(30):
        while True:
            line = await asyncio.to_thread(p.stderr.readline)
            assert line, f"stderr ended before {text!r}"
            if text in line:
                return line


async def test_a_worker_that_keeps_dying_is_restarted_ever_later(tmp_path: Path,
                                                                 mesh: Mesh) -> None:
    """Worker 1 SIGKILLed again each time it is back (found by its metrics port): the
    supervisor restarts it at once, then after 0.5 s, then after 1 s — and says so —
    while worker 0 goes on serving; the third new process is not listening sooner
    than a second after the kill."""
    metrics = port_run(1)
    with HttpBackend() as backend, sentry_process(
            mesh, tmp_path / "s", backend.port, workers=2,
            extra={"metrics_port": metrics}) as (p, port):
        seen: list[int | None] = [None]
        expected = ["restarting now", "restarting in 0.5 s (2 quick exits in a row)",
                    "restarting in 1 s (3 quick exits in a row)"]
        killed_at = 0.0
        for words in expected:
            await eventually(lambda: listener_pid(metrics + 1) not in seen, 60)
            victim = listener_pid(metrics + 1)
            assert victim is not None and victim in children(p.pid)
            seen.append(victim)
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            line = await _said(p, "sentry worker 1 exited")
            assert f"sentry worker 1 exited (-9); {words}" in line, line
        await eventually(lambda: listener_pid(metrics + 1) not in seen, 60)
        assert time.monotonic() - killed_at >= 1.0
        assert listener_pid(metrics) in children(p.pid)  # worker 0 never went
        sidecar = sidecar_to(port, mesh.acme, mesh.acme_issuer)
        try:
            head, _stream, _first = await sidecar.call(STATUS, b"")
        finally:
            await sidecar.aclose()
        assert head.status == 200


async def test_each_worker_serves_its_own_metrics(tmp_path: Path, mesh: Mesh) -> None:
    """``metrics_port: P`` with two workers: worker i serves /metrics and /healthz on
    P + i, each counting the requests it served — together exactly the requests sent
    (one port for worker 0 alone showed only its share). 16 tunnels: the kernel puts
    some on each worker."""
    metrics = port_run(1)
    calls = 3
    with HttpBackend() as backend, sentry_process(
            mesh, tmp_path / "s", backend.port, workers=2,
            extra={"metrics_port": metrics}) as (_p, port):
        sidecars = [sidecar_to(port, mesh.acme, mesh.acme_issuer, subject=f"u{i}")
                    for i in range(16)]
        try:
            for s in sidecars:
                await s.session()
            for _ in range(calls):
                heads = await asyncio.gather(*(s.call(STATUS, b"") for s in sidecars))
                assert {h.status for h, _s, _f in heads} == {200}
        finally:
            for s in sidecars:
                await s.aclose()
        ok = 'pqcnet_sentry_requests_total{outcome="ok"}'
        served = []
        for p in (metrics, metrics + 1):
            seen = await asyncio.to_thread(scrape_metrics, p)
            served.append(seen[ok])
            health = await asyncio.to_thread(
                urllib.request.urlopen, f"http://127.0.0.1:{p}/healthz", timeout=10)
            assert health.status == 200
            health.close()
    assert sum(served) == 16 * calls and all(served), served
    assert len(backend.seen.requests) == 16 * calls


async def test_workers_split_the_receive_budget_and_report_no_restart_for_a_policy_edit(
        tmp_path: Path, mesh: Mesh) -> None:
    """Two workers: each buffers at most half of ``bounds.tunnel_buffer_total_bytes``
    (the configured bound is the host's, not each process's). A policy edit is
    reloaded by both without ``pqcnet_sentry_config_restart_pending`` — before, worker
    1 compared the file with its own copy (its metrics port) and reported a restart
    pending after every reload; a static edit is reported by both."""
    metrics = port_run(1)
    with HttpBackend() as backend, sentry_process(
            mesh, tmp_path / "s", backend.port, workers=2,
            extra={"metrics_port": metrics}) as (_p, _port):
        path = tmp_path / "s" / "sentry.yaml"
        cfg = yaml.safe_load(path.read_text())

        def edit(change: Callable[[dict[str, Any]], None]) -> None:
            change(cfg)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(yaml.safe_dump(cfg))
            tmp.replace(path)

        async def scrape() -> list[dict[str, float]]:
            return [await asyncio.to_thread(scrape_metrics, p) for p in (metrics, metrics + 1)]

        budget = 'pqcnet_sentry_tunnel_buffer_budget_bytes{state="total"}'
        pending = "pqcnet_sentry_config_restart_pending"
        assert [m[budget] for m in await scrape()] == [1024**3 // 2] * 2  # the default's half
        edit(lambda c: c["limits"]["default"].update(rate=7.0))  # policy only
        await asyncio.sleep(2.5)  # both workers re-read it (every second)
        assert [m[pending] for m in await scrape()] == [0, 0]
        edit(lambda c: c["bounds"].update(max_tunnels=7))  # static
        end = time.monotonic() + 15
        while [m[pending] for m in await scrape()] != [1, 1]:
            assert time.monotonic() < end, "a static edit not reported by both workers"
            await asyncio.sleep(0.2)
