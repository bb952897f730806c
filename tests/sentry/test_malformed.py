"""Malformed input at both edges: clear errors, bounded buffering, other clients unaffected."""

from __future__ import annotations

import asyncio
import struct

import httpx
import pytest

from pqcnet import qstp
from pqcnet.sentry import assertion as sa
from pqcnet.sentry.http1 import HttpLimits
from pqcnet.sentry.sidecar import serve_http
from pqcnet.sentry.wire import RequestHead, decode_response, encode_request, read_head

from .conftest import Env

pytestmark = pytest.mark.timeout(60)
LIMITS = HttpLimits(header_timeout=0.5, max_head_bytes=8 * 1024, max_headers=50,
                    max_body=64 * 1024)


async def raw_http(port: int, data: bytes, *, then_wait: bool = True) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(data)
    await w.drain()
    out = await asyncio.wait_for(r.read(), 5) if then_wait else b""
    w.close()
    return out


@pytest.mark.parametrize(("data", "status"), [
    (b"POST /rpc HTTP/1.1\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n", b"431"),
    (b"GET /status HTTP/1.1\r\n" + b"X-A: b\r\n" * 60 + b"\r\n", b"431"),
    (b"POST /rpc HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n0\r\n\r\n", b"400"),
    (b"POST /rpc HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nab",
     b"400"),
    (b"GET /status HTTP/1.1\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n", b"501"),
    (b"POST /rpc HTTP/1.1\r\nExpect: telepathy\r\nContent-Length: 2\r\n\r\nab", b"417"),
    (b"GET /status HTTP/1.1\nHost: x\n\n", b"400"),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", b"414"),
    (b"POST /rpc HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", b"400"),
    (b"POST /rpc HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", b"413"),
    (b"GARBAGE\r\n\r\n", b"400"),
    (b"GET http://evil/ HTTP/1.1\r\n\r\n", b"400"),
    (b"GET / HTTP/2.0\r\n\r\n", b"505"),
    (b"GET / HTTP/1.1\r\n folded\r\n\r\n", b"400"),
])
async def test_sidecar_refuses_malformed_http(env: Env, data: bytes, status: bytes) -> None:
    sidecar = env.stack.sidecar(env.mesh.acme, env.mesh.acme_issuer)
    server = await serve_http(sidecar, limits=LIMITS)
    port = server.sockets[0].getsockname()[1]
    try:
        out = await raw_http(port, data)
        assert out.split(b"\r\n", 1)[0].split(b" ")[1] == status, out[:200]
        assert b"connection: close" in out.lower()
    finally:
        server.close()
        await sidecar.aclose()
    assert env.http.seen.requests == []


async def test_slowloris_is_cut_off_and_others_are_served(env: Env) -> None:
    sidecar = env.stack.sidecar(env.mesh.acme, env.mesh.acme_issuer)
    server = await serve_http(sidecar, limits=LIMITS)
    port = server.sockets[0].getsockname()[1]
    try:
        slow = []
        for _ in range(5):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"POST /rpc HTTP/1.1\r\nHost: x\r\n")  # and never finish the head
            slow.append((r, w))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            for _ in range(5):
                assert (await client.post("/rpc", json={})).status_code == 200
        for r, w in slow:
            out = await asyncio.wait_for(r.read(), 5)
            assert out.startswith(b"HTTP/1.1 408"), out[:80]
            w.close()
    finally:
        server.close()
        await sidecar.aclose()
    assert len(env.http.seen.requests) == 5


async def test_sentry_stream_edge_cases(env: Env) -> None:
    t = await qstp.connect("127.0.0.1", env.stack.port, env.mesh.acme)
    try:
        good = RequestHead("http", "POST", "/rpc", (), sa.issue(
            env.mesh.acme_issuer, subject="a", tenant="acme",
            channel_binding=t.channel_binding(), now=__import__("time").time()))

        async def send(data: bytes, end: bool = True) -> tuple[int, str]:
            s = t.open_stream()
            await s.send(data, end=end)
            payload, _ = await read_head(s.recv)
            head = decode_response(payload)
            return head.status, head.error

        # a stalled stream (partial head) and a huge claimed head length
        stalled = asyncio.create_task(send(encode_request(good)[:7], end=False))
        assert await send(struct.pack(">I", 1 << 30)) == (413, "too_large")
        assert await send(struct.pack(">I", 5) + b"\xff" * 5) == (400, "bad_request")
        assert await send(encode_request(good) + b"x" * (1024 * 1024 + 10)) == (413, "too_large")
        # meanwhile, a good request on the same tunnel is served
        assert await send(encode_request(good) + b'{"a":1}') == (200, "")
        assert await stalled == (400, "bad_request")  # request_read_timeout is 1 s
    finally:
        await t.close()
    assert len(env.http.seen.requests) == 1
