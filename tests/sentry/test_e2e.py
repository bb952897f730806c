"""Unmodified clients through sidecar → QSTP → sentry → real backends."""

from __future__ import annotations

import asyncio
import hashlib
import hmac

import grpc
import grpc.aio
import httpx
import pytest

from pqcnet.proto import echo_pb2, echo_pb2_grpc
from pqcnet.sentry.sidecar import serve_grpc, serve_http, serve_tcp

from .conftest import Env
from .harness import SANITIZER_KEY

pytestmark = pytest.mark.timeout(60)


def keyed(value: str) -> str:
    return "hmac256:" + hmac.new(bytes.fromhex(SANITIZER_KEY), value.encode(),
                                 hashlib.sha256).hexdigest()


async def test_httpx_jsonrpc_through_sidecar_is_sanitized(env: Env) -> None:
    sidecar = env.stack.sidecar(env.mesh.acme, env.mesh.acme_issuer)
    server = await serve_http(sidecar)
    port = server.sockets[0].getsockname()[1]
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            call = {"jsonrpc": "2.0", "id": 7, "method": "eth_call",
                    "params": {"ip": "10.1.2.3", "user_id": "u-42", "wallet": "0xabc", "n": 1}}
            for _ in range(3):  # keep-alive: three requests, one tunnel, one verification
                r = await client.post("/rpc", json=call, headers={
                    "x-forwarded-for": "10.1.2.3", "x-user-id": "u-42", "x-wallet": "0xabc",
                    "x-trace": "keep-me"})
                assert r.status_code == 200
                assert r.json()["id"] == 7
            seen = env.http.seen.requests[-1]
            headers = {k.lower(): v for k, v in seen["headers"].items()}
            assert "x-forwarded-for" not in headers
            assert headers["x-user-id"] == keyed("u-42")
            assert headers["x-wallet"] == "redacted"
            assert headers["x-trace"] == "keep-me"
            assert "x-pqcnet-assertion" not in headers
            assert r.json()["result"]["echo"]["params"] == {
                "user_id": keyed("u-42"), "wallet": "0x0", "n": 1}
        assert sidecar.tunnels_opened == 1
        m = env.stack.sentry.metrics
        assert m.value("pqcnet_sentry_requests_total", {"outcome": "ok"}) == 3
        assert m.value("pqcnet_sentry_assertion_cache_hits_total") == 2
        assert m.value("pqcnet_sentry_assertion_cache_misses_total") == 1
    finally:
        server.close()
        await sidecar.aclose()


async def test_large_response_streams_back_intact(env: Env) -> None:
    sidecar = env.stack.sidecar(env.mesh.acme, env.mesh.acme_issuer)
    server = await serve_http(sidecar)
    port = server.sockets[0].getsockname()[1]
    size = 3 * 1024 * 1024 + 17
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            got = bytearray()
            async with client.stream("GET", f"/big/{size}") as r:
                assert r.status_code == 200
                async for chunk in r.aiter_bytes():
                    got += chunk
        chunk = bytes(range(256)) * 256
        want = (chunk * (size // len(chunk) + 1))[:size]
        assert hashlib.sha256(got).digest() == hashlib.sha256(want).digest()
    finally:
        server.close()
        await sidecar.aclose()


async def test_grpc_client_through_sidecar(env: Env) -> None:
    sidecar = env.stack.sidecar(env.mesh.acme, env.mesh.acme_issuer)
    server, port = await serve_grpc(sidecar)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = echo_pb2_grpc.EchoStub(channel)
            reply = await stub.Say(echo_pb2.EchoRequest(text="hello"),
                                   metadata=(("x-user-id", "u-1"), ("x-forwarded-for", "1.2.3.4"),
                                             ("x-trace", "t")), timeout=10)
            assert reply.text == "HELLO"
            md = dict(kv.split("=", 1) for kv in reply.metadata)
            assert md["x-user-id"] == keyed("u-1")
            assert "x-forwarded-for" not in md and md["x-trace"] == "t"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Say(echo_pb2.EchoRequest(text="not-found"), timeout=10)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            assert info.value.details() == "no such thing"
    finally:
        await server.stop(None)
        await sidecar.aclose()


async def test_raw_tcp_mode(env: Env) -> None:
    sidecar = env.stack.sidecar(env.mesh.acme, env.mesh.acme_issuer)
    server = await serve_tcp(sidecar, "tcp-echo")
    port = server.sockets[0].getsockname()[1]
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"hello tcp")
        await w.drain()
        assert await r.readexactly(9) == b"pct olleh"
        w.write_eof()
        assert await r.read() == b""
        w.close()
    finally:
        server.close()
        await sidecar.aclose()


async def test_backend_keys_and_metrics_exposition(env: Env) -> None:
    from prometheus_client import generate_latest

    from pqcnet import qstp
    from pqcnet.sentry.core import Sentry, TunnelView

    t1 = await qstp.connect("127.0.0.1", env.stack.port, env.mesh.acme)
    t2 = await qstp.connect("127.0.0.1", env.stack.port, env.mesh.acme)
    try:
        def view(t: qstp.Tunnel) -> TunnelView:
            return TunnelView(t.peer.spiffe_id, t.channel_binding(), t.export_keying_material)

        k1a = Sentry.backend_key(view(t1), "jsonrpc")
        assert k1a == Sentry.backend_key(view(t1), "jsonrpc") and len(k1a) == 32
        assert k1a != Sentry.backend_key(view(t1), "echo")
        assert k1a != Sentry.backend_key(view(t2), "jsonrpc")
    finally:
        await t1.close()
        await t2.close()
    text = generate_latest(env.stack.sentry.metrics.registry).decode()
    for name in ("pqcnet_sentry_requests_total", "pqcnet_sentry_assertion_cache_hit_ratio",
                 "pqcnet_sentry_in_flight_requests", "pqcnet_sentry_request_duration_seconds",
                 "pqcnet_sentry_tunnels_active"):
        assert name in text
