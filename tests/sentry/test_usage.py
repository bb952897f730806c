"""Per-tenant usage, counted by the sentry and checked against what the ends saw.

Real sidecars, QSTP, sentry and backends (HTTP, gRPC, TCP). The app side counts the
bytes it received; the backends count what they were sent (the HTTP backend records
bodies after the identity sanitizer). The sentry's figures are read the way
Prometheus reads them — ``curl`` on its ``/metrics`` — and must equal those counts
exactly; a tenant that was refused is charged nothing.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import grpc
import grpc.aio
import httpx
import pytest

from pqcnet._util.ops_http import start_ops_server
from pqcnet.proto import echo_pb2, echo_pb2_grpc
from pqcnet.sentry.sidecar import serve_grpc, serve_http, serve_tcp
from pqcnet.sentry.usage import KINDS
from tests.ports import free_port
from tests.relayer.helpers import eventually

from .conftest import Env
from .harness import Mesh, config_dict, sentry_stack, write_config

pytestmark = pytest.mark.timeout(90)


def _curl_metrics(port: int) -> dict[str, float]:
    """``/metrics`` through curl: ``{'name{labels}': value}``."""
    text = subprocess.run(["curl", "-sf", f"http://127.0.0.1:{port}/metrics"],
                          capture_output=True, text=True, check=True, timeout=30).stdout
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith("pqcnet_sentry_tenant_")}


def _req(tenant: str, kind: str) -> str:
    return f'pqcnet_sentry_tenant_requests_total{{kind="{kind}",tenant="{tenant}"}}'


def _bytes(tenant: str, direction: str) -> str:
    return f'pqcnet_sentry_tenant_bytes_total{{direction="{direction}",tenant="{tenant}"}}'


async def test_each_tenant_is_charged_what_its_ends_saw(env: Env) -> None:
    ops = start_ops_server(0, registry=env.stack.sentry.metrics.registry)
    acme = env.stack.sidecar(env.mesh.acme, env.mesh.acme_issuer)
    globex = env.stack.sidecar(env.mesh.globex, env.mesh.globex_issuer, "globex")
    http = await serve_http(acme)
    http_globex = await serve_http(globex)
    tcp = await serve_tcp(acme, "tcp-echo")
    grpc_server, grpc_port = await serve_grpc(acme)
    down = 0
    try:
        base = f"http://127.0.0.1:{http.sockets[0].getsockname()[1]}"
        async with httpx.AsyncClient(base_url=base) as client:
            # the sanitizer strips params.ip: the backend gets (and acme pays for) less
            bodies = [{"jsonrpc": "2.0", "id": i, "method": "eth_call",
                       "params": {"ip": "10.0.0.1", "n": "x" * (100 * i)}} for i in range(3)]
            for body in bodies:
                r = await client.post("/rpc", content=json.dumps(body))
                assert r.status_code == 200
                down += len(r.content)
            r = await client.get("/status")
            assert r.status_code == 200
            down += len(r.content)
        # globex asks for acme's backend: refused, charged nothing
        url = f"http://127.0.0.1:{http_globex.sockets[0].getsockname()[1]}/rpc"
        async with httpx.AsyncClient() as client:
            assert (await client.post(url, content=b"{}")).status_code == 403
        # a unary gRPC call through the sidecar is a stream of one message each way
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            ask = echo_pb2.EchoRequest(text="usage")
            reply = await echo_pb2_grpc.EchoStub(channel).Say(ask, timeout=10)
        # a TCP pipe: every byte, both ways, exactly
        r, w = await asyncio.open_connection("127.0.0.1", tcp.sockets[0].getsockname()[1])
        w.write(b"0123456789" * 7)
        assert await asyncio.wait_for(r.readexactly(70), 10) == (b"0123456789" * 7)[::-1]
        w.close()
        await w.wait_closed()
        await eventually(lambda: env.stack.sentry.gate.in_flight == 0, 15)

        seen = await asyncio.to_thread(_curl_metrics, ops.port)
        sent_up = sum(len(q["body"]) for q in env.http.seen.requests)
        assert sent_up < sum(len(json.dumps(b)) for b in bodies)  # after the sanitizer
        assert seen[_req("acme", "http")] == 4
        assert seen[_req("acme", "grpc-stream")] == 1
        assert seen[_req("acme", "tcp")] == 1
        assert seen[_req("acme", "grpc")] == seen[_req("acme", "ws")] == 0
        assert seen[_bytes("acme", "up")] == (sent_up + len(ask.SerializeToString()) + 70)
        assert seen[_bytes("acme", "down")] == (down + len(reply.SerializeToString()) + 70)
        for kind in KINDS:  # configured, refused: present and zero
            assert seen[_req("globex", kind)] == 0
        assert seen[_bytes("globex", "up")] == seen[_bytes("globex", "down")] == 0
    finally:
        await grpc_server.stop(None)
        for server in (http, http_globex, tcp):
            server.close()
        await acme.aclose()
        await globex.aclose()
        ops.shutdown()
        ops.server_close()


async def test_a_body_whose_backend_never_answered_is_not_charged(
        tmp_path: Path, mesh: Mesh) -> None:
    dead = free_port()  # nothing listens there: acme's backend is down
    path = write_config(tmp_path, mesh, config_dict(dead, 1, 1))
    async with sentry_stack(mesh, path) as stack:
        sidecar = stack.sidecar(mesh.acme, mesh.acme_issuer)
        http = await serve_http(sidecar)
        try:
            url = f"http://127.0.0.1:{http.sockets[0].getsockname()[1]}/rpc"
            async with httpx.AsyncClient() as client:
                r = await client.post(url, content=b'{"jsonrpc":"2.0","id":1}')
            assert r.status_code == 502
        finally:
            http.close()
            await sidecar.aclose()
        usage = stack.sentry.usage.rows["acme"]
        assert usage.requests["http"] == 1  # admitted: it counts as a request
        assert usage.up == usage.down == 0  # but nothing reached the backend
