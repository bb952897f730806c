"""The sentry's pooled HTTP/1.1 upstream client against real loopback servers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from pqcnet.sentry.errors import BackendError
from pqcnet.sentry.upstream import INLINE_BODY_MAX, Upstream, UpstreamResponse

pytestmark = pytest.mark.timeout(30)

Reply = Callable[[bytes, asyncio.StreamWriter], Awaitable[bool]]


@dataclass
class Raw:
    """A raw asyncio HTTP server: ``reply(request_head, writer)`` answers; False closes."""

    port: int = 0
    connections: int = 0
    open_now: int = 0
    peak: int = 0
    heads: list[bytes] = field(default_factory=list)


@contextlib.asynccontextmanager
async def raw_server(reply: Reply) -> AsyncIterator[Raw]:
    state = Raw()

    async def client(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        state.connections += 1
        state.open_now += 1
        state.peak = max(state.peak, state.open_now)
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                if length:
                    await r.readexactly(length)
                state.heads.append(head)
                if not await reply(head, w):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            state.open_now -= 1
            w.close()

    server = await asyncio.start_server(client, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def body_of(resp: UpstreamResponse) -> bytes:
    if resp.inline is not None:
        return resp.inline
    assert resp.stream is not None
    return b"".join([c async for c in resp.stream])


async def test_keep_alive_reuses_one_connection_and_sends_one_write() -> None:
    async def reply(head: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(ok(b'{"ok":1}'))
        return True

    async with raw_server(reply) as srv:
        up = Upstream(f"http://127.0.0.1:{srv.port}/base", max_connections=4, timeout=5)
        for _ in range(20):
            resp = await up.request("POST", "/rpc", [("x-a", "1")], b"{}")
            assert resp.status == 200 and resp.inline == b'{"ok":1}'
        await up.aclose()
    assert srv.connections == 1
    assert srv.heads[0].startswith(b"POST /base/rpc HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"x-a: 1\r\n" in srv.heads[0] and b"Content-Length: 2\r\n" in srv.heads[0]


async def test_chunked_close_delimited_and_large_bodies_stream() -> None:
    big = bytes(range(256)) * (INLINE_BODY_MAX // 128)

    async def reply(head: bytes, w: asyncio.StreamWriter) -> bool:
        if b"/chunked" in head:
            w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                    b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-trailer: t\r\n\r\n")
            return True
        if b"/big" in head:
            w.write(ok(big))
            return True
        w.write(b"HTTP/1.1 200 OK\r\n\r\nuntil close")
        return False

    async with raw_server(reply) as srv:
        up = Upstream(f"http://127.0.0.1:{srv.port}", max_connections=2, timeout=5)
        resp = await up.request("GET", "/chunked", [], b"")
        assert resp.inline is None and await body_of(resp) == b"hello world"
        resp = await up.request("GET", "/big", [], b"")
        assert resp.inline is None and await body_of(resp) == big
        resp = await up.request("GET", "/close", [], b"")
        assert await body_of(resp) == b"until close"
        resp = await up.request("GET", "/chunked", [], b"")  # a new connection
        assert await body_of(resp) == b"hello world"
        await up.aclose()
    assert srv.connections == 2


async def test_pool_is_bounded_and_waiters_get_a_connection() -> None:
    async def reply(head: bytes, w: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.05)
        w.write(ok(b"x"))
        return True

    async with raw_server(reply) as srv:
        up = Upstream(f"http://127.0.0.1:{srv.port}", max_connections=2, timeout=5)
        got = await asyncio.gather(*(up.request("GET", "/", [], b"") for _ in range(8)))
        assert [r.status for r in got] == [200] * 8
        await up.aclose()
    assert srv.peak <= 2


async def test_idle_connection_closed_by_backend_is_not_reused() -> None:
    async def reply(head: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(ok(b"x"))  # claims keep-alive, then closes anyway
        await w.drain()
        return False

    async with raw_server(reply) as srv:
        up = Upstream(f"http://127.0.0.1:{srv.port}", max_connections=1, timeout=5)
        for _ in range(3):
            resp = await up.request("POST", "/", [], b"{}")
            assert resp.inline == b"x"
            await asyncio.sleep(0.05)  # the FIN arrives while the connection idles
        await up.aclose()
    assert srv.connections == 3


async def test_http10_response_is_not_pooled_unless_keep_alive() -> None:
    async def reply(head: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok")
        return True  # leaves the socket open: a pooled reuse would hang on it

    async with raw_server(reply) as srv:
        up = Upstream(f"http://127.0.0.1:{srv.port}", max_connections=1, timeout=2)
        for _ in range(3):
            assert (await up.request("POST", "/", [], b"{}")).inline == b"ok"
        await up.aclose()
    assert srv.connections == 3


async def test_failures_are_backend_errors_and_free_the_slot() -> None:
    async def reply(head: bytes, w: asyncio.StreamWriter) -> bool:
        if b"/slow" in head:
            await asyncio.sleep(2)
        elif b"/junk" in head:
            w.write(b"SPDY/9 banana\r\n\r\n")
        elif b"/short" in head:
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 200000\r\n\r\n" + b"x" * 1000)
            await w.drain()
            return False
        else:
            w.write(ok(b"fine"))
        return True

    async with raw_server(reply) as srv:
        up = Upstream(f"http://127.0.0.1:{srv.port}", max_connections=1, timeout=0.3)
        with pytest.raises(BackendError, match="timed out"):
            await up.request("GET", "/slow", [], b"")
        with pytest.raises(BackendError, match="invalid response"):
            await up.request("GET", "/junk", [], b"")
        resp = await up.request("GET", "/short", [], b"")
        assert resp.stream is not None
        with pytest.raises(BackendError, match="short of Content-Length"):
            await body_of(resp)
        resp = await up.request("GET", "/ok", [], b"")  # the single slot came back
        assert resp.inline == b"fine"
        await up.aclose()


async def test_unread_streamed_body_releases_its_slot_on_aclose() -> None:
    async def reply(head: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(ok(b"y" * (INLINE_BODY_MAX + 1)))
        return True

    async with raw_server(reply) as srv:
        up = Upstream(f"http://127.0.0.1:{srv.port}", max_connections=1, timeout=1)
        resp = await up.request("GET", "/", [], b"")
        await resp.aclose()  # never iterated
        resp = await up.request("GET", "/", [], b"")
        assert len(await body_of(resp)) == INLINE_BODY_MAX + 1
        await up.aclose()
