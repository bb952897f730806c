"""Robustness follow-ups: mid-response backend failure resets the stream, hammering
clients get a QSTP FLOW PAUSE, gRPC binary metadata, and the hot-reload API."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import httpx
import pytest

from pqcnet.proto import echo_pb2, echo_pb2_grpc
from pqcnet.qstp import events as ev
from pqcnet.qstp.errors import TunnelClosed
from pqcnet.sentry.acl import AclPolicy
from pqcnet.sentry.errors import SentryConfigError
from pqcnet.sentry.server import FLOW_REASON_RATE_LIMITED
from pqcnet.sentry.sidecar import serve_grpc, serve_http
from pqcnet.sentry.wire import RequestHead

from .conftest import Env
from .harness import TD, Mesh, config_dict, sentry_stack, write_config
from .test_upstream import raw_server

pytestmark = pytest.mark.timeout(60)


async def test_backend_failing_mid_response_resets_the_stream(mesh: Mesh, tmp_path: Path
                                                              ) -> None:
    async def reply(head: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 300000\r\n\r\n" + b"x" * 5000)
        await w.drain()
        return False  # dies 295,000 bytes short

    async with raw_server(reply) as srv:
        path = write_config(tmp_path, mesh, config_dict(srv.port, 1, 1))
        async with sentry_stack(mesh, path) as stack:
            sidecar = stack.sidecar(mesh.acme, mesh.acme_issuer)
            head, stream, first = await sidecar.call(RequestHead("http", "POST", "/rpc"), b"{}")
            assert head.status == 200 and not head.error
            got = len(first)
            with pytest.raises(TunnelClosed, match="backend failed mid-response"):
                while chunk := await stream.recv():
                    got += len(chunk)
            assert got < 300000
            # the unmodified HTTP client sees a broken response, not a short "success"
            server = await serve_http(sidecar)
            port = server.sockets[0].getsockname()[1]
            try:
                async with httpx.AsyncClient() as client:
                    with pytest.raises(httpx.RemoteProtocolError):
                        await client.post(f"http://127.0.0.1:{port}/rpc", json={})
            finally:
                server.close()
                await sidecar.aclose()
            m = stack.sentry.metrics
            assert m.value("pqcnet_sentry_requests_total", {"outcome": "backend_error"}) == 2
            assert m.value("pqcnet_sentry_requests_total", {"outcome": "ok"}) == 0


@pytest.mark.parametrize("stack_options", [{"rate": 2, "burst": 1}])
async def test_hammering_client_gets_flow_pause_and_traffic_still_completes(env: Env
                                                                          ) -> None:
    sidecar = env.stack.sidecar(env.mesh.acme, env.mesh.acme_issuer)
    flows: list[Any] = []
    (await sidecar.session()).tunnel.on_flow = flows.append
    statuses: list[int] = []

    async def worker() -> None:
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            head, stream, _ = await sidecar.call(RequestHead("http", "GET", "/status"), b"")
            while await stream.recv():
                pass
            statuses.append(head.status)

    # 8 concurrent callers: every one must finish (no stream lost while paused)
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(8))), 20)
    await sidecar.aclose()
    pauses = [f for f in flows if isinstance(f, ev.FlowPaused)]
    assert pauses, "no FLOW PAUSE reached the hammering client"
    assert all(p.reason == FLOW_REASON_RATE_LIMITED and p.retry_after > 0 for p in pauses)
    assert any(isinstance(f, ev.FlowResumed) for f in flows)
    assert statuses.count(429) >= 20 and 200 in statuses
    assert env.stack.sentry.metrics.value("pqcnet_sentry_flow_pauses_total") == len(pauses)
    assert sidecar.tunnels_opened == 1


async def test_grpc_binary_metadata_crosses_the_tunnel_both_ways(env: Env) -> None:
    sidecar = env.stack.sidecar(env.mesh.acme, env.mesh.acme_issuer)
    server, port = await serve_grpc(sidecar)
    blob = b"\x00\x01\xfe\xff binary"
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = echo_pb2_grpc.EchoStub(channel).Say(
                echo_pb2.EchoRequest(text="bin"), metadata=(("x-blob-bin", blob),),
                timeout=10)
            reply = await call
            assert reply.text == "BIN"
            trailers = dict(await call.trailing_metadata() or ())
            assert trailers["x-echo-bin"] == b"\xff\x00trailer"
            assert trailers["x-echo"] == "plain"
    finally:
        await server.stop(None)
        await sidecar.aclose()
    seen = dict(env.grpc.seen[-1][1])
    assert seen["x-blob-bin"] == str(blob)  # the servicer saw the original bytes


async def test_hot_reload_api_without_dropping_the_tunnel(env: Env) -> None:
    sentry = env.stack.sentry
    sidecar = env.stack.sidecar(env.mesh.acme, env.mesh.acme_issuer)

    async def status() -> int:
        head, stream, _ = await sidecar.call(RequestHead("http", "GET", "/status"), b"")
        while await stream.recv():
            pass
        return head.status

    assert await status() == 200
    policy = sentry.apply_rate_limit("acme", 0.5, 1)
    assert policy.plans["acme"].rate == 0.5 and sentry.config.policy is policy
    assert [await status() for _ in range(2)] == [200, 429]
    with pytest.raises(SentryConfigError):
        sentry.apply_rate_limit("acme", 0, 1)
    with pytest.raises(SentryConfigError):
        sentry.apply_rate_limit("", 5, 5)
    assert sentry.config.policy is policy  # a refused change leaves the old one in force
    sentry.apply_rate_limit("*", 1000, 1000)
    assert sentry.config.policy.default_plan.rate == 1000
    await asyncio.sleep(0.01)  # the emptied bucket keeps its level; at 1000/s it refills
    assert await status() == 200
    with pytest.raises(SentryConfigError):
        sentry.set_max_in_flight(0)
    sentry.set_max_in_flight(7)
    assert sentry.gate.limit == 7 and sentry.config.policy.max_in_flight == 7
    sentry.set_acl(AclPolicy.of([f"spiffe://{TD}/*/sidecar/*"], ["POST /rpc"]))
    assert await status() == 403
    sentry.reload_policy(policy)
    assert await status() in (200, 429)
    assert sidecar.tunnels_opened == 1
    await sidecar.aclose()
