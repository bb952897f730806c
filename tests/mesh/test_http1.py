"""The Waku REST client's HTTP/1.1 layer (:mod:`pqcnet.mesh.http1`) on real sockets.

Keep-alive reuse is checked against a real go-waku node; the failure cases (a server
that closes a kept-alive socket without answering, oversized or malformed answers,
silence, nobody listening) against small asyncio servers on loopback that misbehave
on purpose — go-waku cannot be made to.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from pqcnet.mesh.errors import ConfigError, WakuUnavailable
from pqcnet.mesh.http1 import HttpClient
from pqcnet.mesh.waku_rest import WakuClientConfig, WakuRestClient

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def _server(handler: Handler) -> AsyncIterator[str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + (await reader.readexactly(length) if length else b"")


def _ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


@pytest.mark.services
async def test_keep_alive_against_go_waku(waku_rest_urls: list[str]) -> None:
    client = HttpClient(waku_rest_urls[0], timeout_s=5.0, max_connections=4)
    try:
        for _ in range(20):
            resp = await client.request("GET", "/debug/v1/info")
            assert resp.status == 200 and b"listenAddresses" in resp.body
        assert client.connects == 1  # one socket, reused for every sequential request
        got = await asyncio.gather(*(client.request("GET", "/debug/v1/version")
                                     for _ in range(12)))
        assert {r.status for r in got} == {200}
        assert client.connects <= 4  # never more sockets than the bound
        resp = await client.request("GET", "/relay/v1/auto/messages/%2Fnot%2Fsubscribed")
        assert resp.status == 404  # an HTTP status is an answer, not an error
    finally:
        await client.aclose()


async def test_chunked_answers_and_bounded_concurrency() -> None:
    active = peak = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal active, peak
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                await _read_request(reader)
                active += 1
                peak = max(peak, active)
                await asyncio.sleep(0.01)
                active -= 1
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
                await writer.drain()
        writer.close()

    async with _server(handler) as url:
        client = HttpClient(url, timeout_s=5.0, max_connections=3)
        got = await asyncio.gather(*(client.request("POST", "/x", b"{}") for _ in range(30)))
        assert [r.body for r in got] == [b"hello world"] * 30
        assert peak <= 3 and client.connects <= 3
        await client.aclose()


async def test_server_closing_a_kept_alive_socket_unanswered() -> None:
    """EOF before any answer on a reused socket: GET goes again on a fresh socket
    (idempotent), POST fails typed — it may have been processed."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await _read_request(reader)
            writer.write(_ok(b"first"))
            await writer.drain()
            await _read_request(reader)  # the second request on this socket: hang up
        writer.close()

    async with _server(handler) as url:
        client = HttpClient(url, timeout_s=5.0, max_connections=1)
        assert (await client.request("GET", "/a")).body == b"first"
        assert (await client.request("GET", "/b")).body == b"first"  # retried on a new socket
        assert client.connects == 2
        with pytest.raises(WakuUnavailable, match="before it answered"):
            await client.request("POST", "/c", b"{}")
        assert (await client.request("GET", "/d")).body == b"first"  # still usable
        await client.aclose()


@pytest.mark.parametrize("answer, match", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000, "body over"),
    (b"HTTP/1.1 200 OK\r\nX-Big: " + b"y" * 3000 + b"\r\n\r\n", "head over"),
    (b"SPDY/9 what\r\n\r\n", "malformed"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "connection lost"),
])
async def test_bad_answers_are_typed_and_the_client_recovers(answer: bytes,
                                                              match: str) -> None:
    calls = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal calls
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                await _read_request(reader)
                calls += 1
                writer.write(answer if calls == 1 else _ok(b"fine"))
                await writer.drain()
                if calls == 1:
                    break
        writer.close()

    async with _server(handler) as url:
        client = HttpClient(url, timeout_s=5.0, max_head=2048, max_body=4096)
        with pytest.raises(WakuUnavailable, match=match):
            await client.request("GET", "/x")
        assert client.idle == 0  # the broken socket was not kept
        assert (await client.request("GET", "/y")).body == b"fine"
        await client.aclose()


async def test_silence_times_out_and_frees_the_slot() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await _read_request(reader)
            await asyncio.sleep(30)
        writer.close()

    async with _server(handler) as url:
        client = HttpClient(url, timeout_s=0.3, max_connections=1)
        for _ in range(2):  # the one slot is given back after each timeout
            with pytest.raises(WakuUnavailable, match="no answer within"):
                await client.request("GET", "/x")
        await client.aclose()


async def test_cancelled_request_leaves_the_client_usable() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                req = await _read_request(reader)
                if b"/slow" in req:
                    await asyncio.sleep(0.5)
                writer.write(_ok(b"ok"))
                await writer.drain()
        writer.close()

    async with _server(handler) as url:
        client = HttpClient(url, timeout_s=5.0, max_connections=1)
        task = asyncio.create_task(client.request("GET", "/slow"))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # the half-read socket was closed, not reused: the answer is this request's
        assert (await client.request("GET", "/fast")).body == b"ok"
        assert client.connects == 2
        await client.aclose()


async def test_nobody_listening_and_bad_config() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connection refused
        client = HttpClient(f"http://127.0.0.1:{port}", timeout_s=2.0)
        with pytest.raises(WakuUnavailable, match="cannot connect"):
            await client.request("GET", "/health")
        await client.aclose()
    with pytest.raises(WakuUnavailable, match="closed"):
        await client.request("GET", "/health")
    rest = WakuRestClient(WakuClientConfig(f"http://127.0.0.1:{port}", retries=5,
                                           backoff_s=1.0))
    await rest.aclose()
    async with asyncio.timeout(0.5):  # no retries with backoff once closed by us
        with pytest.raises(WakuUnavailable, match="closed"):
            await rest.health()
    with pytest.raises(ConfigError):
        HttpClient("ftp://example.invalid", timeout_s=1.0)
    with pytest.raises(ConfigError):
        HttpClient("http://127.0.0.1:1", timeout_s=1.0, max_connections=0)
