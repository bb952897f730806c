"""One tenant cannot take the whole concurrency gate from the others.

The gate (``limits.max_in_flight``) is shared by every tenant and never queues. TCP
pipes and streaming gRPC calls hold a slot for their whole life, so a tenant within
its rate plan could open ``max_in_flight`` of them and every other tenant was refused
(429) for as long as it liked. Now a tenant holds at most ``limits.tenant_share`` of
the gate (default half, rounded up), or its plan's own ``max_in_flight``. Checked
through real sidecars: the attacking tenant's pipes are real TCP connections to a
real backend, the other tenant's request a real HTTP call.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import httpx
import pytest

from pqcnet.sentry.errors import ConcurrencyLimited, TenantConcurrencyLimited
from pqcnet.sentry.limiter import ConcurrencyGate
from pqcnet.sentry.sidecar import serve_http, serve_tcp
from tests.relayer.helpers import eventually

from .harness import (
    HttpBackend,
    Mesh,
    Stack,
    config_dict,
    sentry_stack,
    tcp_echo,
    write_config,
)

pytestmark = pytest.mark.timeout(90)


def test_the_gate_caps_each_tenant_and_forgets_idle_ones() -> None:
    gate = ConcurrencyGate(4, 0.5, {"big": 3})
    gate.acquire("acme")
    gate.acquire("acme")
    with pytest.raises(TenantConcurrencyLimited):
        gate.acquire("acme")  # its half of 4
    gate.acquire("big")  # its own cap, 3 ...
    gate.acquire("big")
    with pytest.raises(ConcurrencyLimited) as full:
        gate.acquire("big")  # ... but the gate is full first
    assert type(full.value) is ConcurrencyLimited
    assert gate.by_tenant == {"acme": 2, "big": 2} and gate.in_flight == 4
    for t in ("acme", "acme", "big", "big"):
        gate.release(t)
    assert gate.by_tenant == {} and gate.in_flight == 0
    gate.set_caps(1.0, {})  # reload: no per-tenant cap
    for _ in range(4):
        gate.acquire("acme")
    assert gate.by_tenant == {"acme": 4}
    gate.set_caps(0.25, {})  # lowered below what it holds: holders finish, no new one
    gate.release("acme")
    with pytest.raises(TenantConcurrencyLimited):
        gate.acquire("acme")
    assert ConcurrencyGate(3, 0.5).cap("x") == 2 and ConcurrencyGate(1, 0.1).cap("x") == 1
    # the default plan's cap (key "") for tenants without their own
    assert [ConcurrencyGate(8, 0.5, {"": 3, "big": 6}).cap(t) for t in ("x", "big")] == [3, 6]


async def test_plans_in_the_config_file_set_the_caps(tmp_path: Path, mesh: Mesh) -> None:
    """Through the config file: a tenant's plan, the default plan, the default share
    (the sentry builds its gRPC backend's channel, hence a running loop)."""
    from pqcnet.sentry.config import load_config
    from pqcnet.sentry.core import Sentry

    cfg = config_dict(1, 1, 1, max_in_flight=10)
    cfg["limits"]["default"]["max_in_flight"] = 3
    cfg["limits"]["tenants"]["acme"]["max_in_flight"] = 7
    sentry = Sentry(load_config(write_config(tmp_path, mesh, cfg)))
    try:
        gate = sentry.gate
        assert (gate.cap("acme"), gate.cap("globex"), gate.share) == (7, 3, 0.5)
    finally:
        await sentry.aclose()


@pytest.mark.parametrize("share", [0.5, 1.0], ids=["capped", "uncapped"])
async def test_long_lived_pipes_of_one_tenant_leave_room_for_another(
        tmp_path: Path, mesh: Mesh, share: float) -> None:
    """acme opens TCP pipes through its sidecar and keeps them; globex then calls its
    HTTP backend. With the default share acme gets 2 of the 4 slots and globex gets
    200; with ``tenant_share: 1`` (the old behaviour) acme holds all 4 and globex is
    refused. When acme's clients close their pipes, every slot comes back."""
    with HttpBackend() as backend:
        async with tcp_echo() as tcp_port:
            cfg = config_dict(backend.port, 1, tcp_port, max_in_flight=4)
            cfg["limits"]["tenant_share"] = share
            async with sentry_stack(mesh, write_config(tmp_path, mesh, cfg)) as s:
                async with contextlib.AsyncExitStack() as stack:
                    held, refused, status = await _attack(s, mesh, stack)
                    gate = s.sentry.gate
                    assert gate.by_tenant == {"acme": held}
                    value = s.sentry.metrics.value
                    holders = "pqcnet_sentry_tenant_in_flight_requests"
                    assert value(holders, {"tenant": "acme"}) == held
                    assert s.sentry.metrics.registry.get_sample_value(
                        holders, {"tenant": "globex"}) == 0  # its call is over
                    if share == 0.5:
                        assert (held, refused, status) == (2, 3, 200)
                        assert value("pqcnet_sentry_rejections_total",
                                     {"reason": "TenantConcurrencyLimited"}) == 3
                        assert any(q["path"] == "/globex/x" for q in backend.seen.requests)
                    else:
                        assert (held, refused, status) == (4, 1, 429)
                        assert value("pqcnet_sentry_rejections_total",
                                     {"reason": "ConcurrencyLimited"}) == 2
                await eventually(lambda: s.sentry.gate.in_flight == 0, 20)
                assert s.sentry.gate.by_tenant == {}
                assert s.sentry.metrics.value(holders, {"tenant": "acme"}) == 0


async def _attack(s: Stack, mesh: Mesh, stack: contextlib.AsyncExitStack
                  ) -> tuple[int, int, int]:
    """Five TCP pipes opened (and kept) by acme, then one HTTP call by globex; returns
    (pipes held, pipes refused, globex's status)."""
    acme = s.sidecar(mesh.acme, mesh.acme_issuer)
    stack.push_async_callback(acme.aclose)
    pipes = await serve_tcp(acme, "tcp-echo")
    stack.callback(pipes.close)
    globex = s.sidecar(mesh.globex, mesh.globex_issuer, tenant="globex", subject="gina")
    stack.push_async_callback(globex.aclose)
    http = await serve_http(globex)
    stack.callback(http.close)
    held = refused = 0
    for i in range(5):  # one more than the gate
        r, w = await asyncio.open_connection("127.0.0.1", pipes.sockets[0].getsockname()[1])
        stack.callback(w.close)
        w.write(f"pipe{i}".encode())
        await w.drain()
        got = await asyncio.wait_for(r.read(5), 10)
        if got == f"pipe{i}".encode()[::-1]:
            held += 1  # an open pipe: a gate slot held for its life
        else:
            assert got == b"", got  # refused: the sidecar closed it
            refused += 1
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http.sockets[0].getsockname()[1]}",
                                 timeout=10) as c:
        status = (await c.post("/globex/x", json={"q": 1})).status_code
    return held, refused, status
