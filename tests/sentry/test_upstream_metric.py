"""``pqcnet_sentry_upstream_duration_seconds``: the backend's share of a request's time,
measured against a real HTTP backend that takes a known time to answer."""

from __future__ import annotations

import httpx
import pytest

from pqcnet.sentry.sidecar import serve_http

from .conftest import Env

pytestmark = pytest.mark.timeout(60)

DELAY = 0.06  # seconds the backend sleeps before answering each request
UPSTREAM = "pqcnet_sentry_upstream_duration_seconds"
WHOLE = "pqcnet_sentry_request_duration_seconds"


async def _calls(env: Env, n: int) -> list[httpx.Response]:
    """``n`` JSON-RPC calls from an unmodified HTTP client through a sidecar."""
    sidecar = env.stack.sidecar(env.mesh.acme, env.mesh.acme_issuer)
    server = await serve_http(sidecar)
    port = server.sockets[0].getsockname()[1]
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            return [await client.post("/rpc", json={"jsonrpc": "2.0", "id": i,
                                                    "method": "eth_call", "params": {}})
                    for i in range(n)]
    finally:
        server.close()
        await sidecar.aclose()


@pytest.mark.parametrize("stack_options", [{"delay": DELAY}])
async def test_upstream_time_is_the_backends_share_of_the_request(env: Env) -> None:
    m = env.stack.sentry.metrics
    assert [r.status_code for r in await _calls(env, 3)] == [200] * 3
    backend = {"backend": "jsonrpc"}
    assert m.value(f"{UPSTREAM}_count", backend) == 3
    upstream = m.value(f"{UPSTREAM}_sum", backend)
    assert upstream >= 3 * DELAY
    # every answer took at least DELAY: none falls in a bucket below it
    assert m.value(f"{UPSTREAM}_bucket", {**backend, "le": "0.05"}) == 0
    assert m.value(f"{UPSTREAM}_bucket", {**backend, "le": "+Inf"}) == 3
    # the upstream part is inside the whole request's time, never more
    assert m.value(f"{WHOLE}_count", {"kind": "http"}) == 3
    assert m.value(f"{WHOLE}_sum", {"kind": "http"}) >= upstream
    # other backends saw nothing
    assert m.value(f"{UPSTREAM}_count", {"backend": "echo"}) == 0


async def test_a_failed_backend_is_not_an_upstream_observation(env: Env) -> None:
    env.http.server.shutdown()
    env.http.server.server_close()
    m = env.stack.sentry.metrics
    [r] = await _calls(env, 1)
    assert r.status_code == 502 and r.json()["error"] == "backend_error"
    assert m.value("pqcnet_sentry_requests_total", {"outcome": "backend_error"}) == 1
    assert m.value(f"{UPSTREAM}_count", {"backend": "jsonrpc"}) == 0
