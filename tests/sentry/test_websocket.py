"""WebSockets through the sidecar: an unmodified app opens ``ws://`` to its node.

Real parts at both ends: the app is the ``websockets`` client, the backend the
``websockets`` server (RFC 6455 handshake, masking, close handshake, subprotocol
negotiation all theirs), and between them the sidecar's HTTP face, a QSTP tunnel and
the sentry. Checked from outside: what each end received, the status codes the app
sees when someone without the authority tries, and that the sentry's gate slot and
the backend connection come back when a WebSocket ends, however it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.http11 import Request, Response

from pqcnet.sentry.sidecar import serve_http
from tests.ports import free_port
from tests.relayer.helpers import eventually

from .harness import (
    SANITIZER_KEY,
    Mesh,
    Stack,
    config_dict,
    pool_of,
    sentry_stack,
    write_config,
)

pytestmark = pytest.mark.timeout(90)


@dataclass
class Feed:
    """A WebSocket backend: echoes each message back prefixed ``echo:`` (bytes stay
    bytes), refuses ``/nope`` with 404 before the handshake, and records what it saw."""

    heads: list[Headers] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    open: int = 0
    closed: int = 0

    def refuse(self, _conn: ServerConnection, request: Request) -> Response | None:
        if request.path.startswith("/nope"):
            return _conn.respond(404, "no such feed\n")
        return None

    async def handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        self.heads.append(ws.request.headers)
        self.paths.append(ws.request.path)
        self.open += 1
        try:
            async for msg in ws:
                await ws.send(b"echo:" + msg if isinstance(msg, bytes) else f"echo:{msg}")
        finally:
            self.open -= 1
            self.closed += 1


@contextlib.asynccontextmanager
async def _feed() -> AsyncIterator[tuple[Feed, int]]:
    feed = Feed()
    server: Server = await serve(feed.handler, "127.0.0.1", 0, subprotocols=["jsonrpc"],
                                 process_request=feed.refuse)
    try:
        yield feed, next(iter(server.sockets)).getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@dataclass
class Ws:
    feed: Feed
    stack: Stack
    url: str


@contextlib.asynccontextmanager
async def _ws(tmp_path: Path, mesh: Mesh, tenant: str = "acme", *,
              methods: list[str] | None = None, **bounds: float) -> AsyncIterator[Ws]:
    """The backend behind a sentry (routes ``/`` to acme's ``jsonrpc`` backend,
    ``/globex/`` to globex's) and ``tenant``'s sidecar HTTP face."""
    async with _feed() as (feed, port):
        cfg = config_dict(port, 1, 1, max_in_flight=8, tenant_share=1.0, methods=methods or [
            "WS /ws", "WS /nope", "GET /plain", "WS /globex/ws"])
        cfg["bounds"].update(bounds)
        async with sentry_stack(mesh, write_config(tmp_path, mesh, cfg)) as stack:
            who = mesh.acme if tenant == "acme" else mesh.globex
            issuer = mesh.acme_issuer if tenant == "acme" else mesh.globex_issuer
            sidecar = stack.sidecar(who, issuer, tenant)
            server = await serve_http(sidecar)
            try:
                yield Ws(feed, stack, f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}")
            finally:
                server.close()
                await sidecar.aclose()


def _open(url: str, **kw: object) -> connect:
    """The app: a ``websockets`` client offering the ``jsonrpc`` subprotocol (the
    backend requires one)."""
    return connect(url, subprotocols=["jsonrpc"], **kw)  # type: ignore[arg-type]


def _count(s: Stack, name: str, **labels: str) -> float:
    return s.sentry.metrics.value(name, labels)


async def test_a_websocket_carries_messages_both_ways_and_frees_its_slot(
        tmp_path: Path, mesh: Mesh) -> None:
    async with _ws(tmp_path, mesh) as w:
        # compression off: the bytes charged below are then the payloads plus framing
        async with _open(f"{w.url}/ws?since=7", compression=None,
                         additional_headers={"x-user-id": "u-42", "x-other": "kept"}
                           ) as app:
            assert app.subprotocol == "jsonrpc"  # negotiated end to end
            await app.send('{"jsonrpc":"2.0","id":1,"method":"eth_subscribe"}')
            assert await app.recv() == 'echo:{"jsonrpc":"2.0","id":1,"method":"eth_subscribe"}'
            big = bytes(range(256)) * 1024  # 256 KiB: many QSTP frames, flow control
            await app.send(big)
            assert await app.recv() == b"echo:" + big
            for i in range(50):  # many small frames in flight at once, order kept
                await app.send(f"m{i}")
            assert [await app.recv() for _ in range(50)] == [f"echo:m{i}" for i in range(50)]
            assert w.stack.sentry.gate.in_flight == 1  # a WebSocket holds a slot
        # the close handshake went through; the slot and the backend connection are back
        await eventually(lambda: w.stack.sentry.gate.in_flight == 0 and w.feed.closed == 1)
        head = w.feed.heads[0]
        assert w.feed.paths == ["/ws?since=7"]
        assert head["x-other"] == "kept"
        # the tenant's sanitizer applies to a WebSocket's head as to any request's
        want = hmac.new(bytes.fromhex(SANITIZER_KEY), b"u-42", hashlib.sha256).hexdigest()
        assert head["x-user-id"] == f"hmac256:{want}"
        assert "x-pqcnet-assertion" not in head  # the session assertion stops at the sentry
        assert _count(w.stack, "pqcnet_sentry_requests_total", outcome="ok") == 1
        # acme is charged the WebSocket once and its bytes after the handshake: the
        # payloads plus RFC 6455 framing (at most 14 bytes a frame; 53 frames each way
        # with the close)
        usage = w.stack.sentry.usage.rows["acme"]
        assert usage.requests["ws"] == 1 and sum(usage.requests.values()) == 1
        sent = len('{"jsonrpc":"2.0","id":1,"method":"eth_subscribe"}') + len(big) + sum(
            len(f"m{i}") for i in range(50))
        assert sent <= usage.up <= sent + 14 * 53
        assert sent + 5 * 52 <= usage.down <= sent + 5 * 52 + 14 * 53


async def test_without_the_ws_key_or_the_tenant_the_websocket_is_refused(
        tmp_path: Path, mesh: Mesh) -> None:
    # "GET /plain" is allowed, "WS /plain" is not: holding a pipe open needs its own key
    async with _ws(tmp_path, mesh) as w:
        with pytest.raises(InvalidStatus) as refused:
            async with _open(f"{w.url}/plain"):
                pass
        assert refused.value.response.status_code == 403
        assert b"'WS /plain' is not allowed" in refused.value.response.body
        # globex's sidecar asking for acme's backend path
    async with _ws(tmp_path, mesh, "globex") as w:
        with pytest.raises(InvalidStatus) as other:
            async with _open(f"{w.url}/ws"):
                pass
        assert other.value.response.status_code == 403
        assert b"tenant" in other.value.response.body, other.value.response.body
        async with _open(f"{w.url}/globex/ws") as own:  # its own backend: served
            await own.send("hi")
            assert await own.recv() == "echo:hi"
        assert w.feed.paths == ["/globex/ws"]  # the refused ones never reached it
        await eventually(lambda: w.stack.sentry.gate.in_flight == 0)


async def test_a_backend_that_refuses_the_upgrade_is_relayed(tmp_path: Path,
                                                              mesh: Mesh) -> None:
    async with _ws(tmp_path, mesh) as w:
        with pytest.raises(InvalidStatus) as refused:
            async with _open(f"{w.url}/nope"):
                pass
        assert refused.value.response.status_code == 404
        assert refused.value.response.body == b"no such feed\n"
        assert w.feed.open == 0
        await eventually(lambda: w.stack.sentry.gate.in_flight == 0)
        async with _open(f"{w.url}/ws") as app:  # the face keeps serving
            # the compression extension was negotiated end to end, through both pipes
            assert [e.name for e in app.protocol.extensions] == ["permessage-deflate"]
            await app.send("again" * 1000)
            assert await app.recv() == "echo:" + "again" * 1000


async def test_an_idle_websocket_is_closed_at_both_ends(tmp_path: Path, mesh: Mesh) -> None:
    async with _ws(tmp_path, mesh, tcp_idle_timeout=1.0) as w:
        async with _open(f"{w.url}/ws", ping_interval=None) as app:
            await app.send("one")
            assert await app.recv() == "echo:one"
            with pytest.raises(ConnectionClosed):
                async with asyncio.timeout(15):
                    await app.recv()  # nothing moves: the sentry ends the pipe
        await eventually(lambda: w.feed.closed == 1 and w.stack.sentry.gate.in_flight == 0)
        assert _count(w.stack, "pqcnet_sentry_rejections_total", reason="PipeIdle") == 1


async def test_an_app_that_vanishes_frees_the_pipe_before_any_timeout(
        tmp_path: Path, mesh: Mesh) -> None:
    async with _ws(tmp_path, mesh) as w:  # idle timeout: the default 600 s
        app = await _open(f"{w.url}/ws", ping_interval=None)
        await app.send("x")
        assert await app.recv() == "echo:x"
        # no close frame and no FIN: a reset (SO_LINGER 0), as from a crashed host
        sock = app.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        app.transport.abort()
        await eventually(lambda: w.feed.closed == 1 and w.stack.sentry.gate.in_flight == 0,
                         limit=15)


async def test_a_raw_upgrade_keeps_bytes_sent_right_after_the_handshake(
        tmp_path: Path, mesh: Mesh) -> None:
    """A client that pipelines its first frame behind the upgrade request (before the
    101 arrives): the sidecar must carry those bytes, not drop or parse them."""
    async with _ws(tmp_path, mesh) as w:
        port = int(w.url.rsplit(":", 1)[1])
        r, wr = await asyncio.open_connection("127.0.0.1", port)
        key = "dGhlIHNhbXBsZSBub25jZQ=="
        frame = bytes([0x81, 0x80 | 2]) + b"\x00\x00\x00\x00" + b"hi"  # masked text "hi"
        wr.write(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                 b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                 b"Sec-WebSocket-Protocol: jsonrpc\r\n"
                 b"Sec-WebSocket-Key: " + key.encode() + b"\r\n\r\n" + frame)
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101 ")
        lower = head.lower()
        assert b"upgrade: websocket" in lower and b"connection: upgrade" in lower
        # RFC 6455 §4.2.2: the accept key proves the backend saw the client's key
        assert b"sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=" in lower
        reply = await asyncio.wait_for(r.readexactly(2 + 7), 10)
        assert reply == bytes([0x81, 7]) + b"echo:hi"
        wr.close()
        await wr.wait_closed()
        await eventually(lambda: w.stack.sentry.gate.in_flight == 0, limit=15)


async def test_a_pool_opens_the_websocket_on_a_sentry_that_answers(tmp_path: Path,
                                                                    mesh: Mesh) -> None:
    """A sidecar with two sentries, the first one down: the WebSocket is opened on the
    second (nothing reached the first one's backend, so moving it is safe)."""
    async with _ws(tmp_path, mesh) as w:
        pool = pool_of(mesh, [free_port(), w.stack.port])  # nothing listens on the first
        server = await serve_http(pool)
        try:
            url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/ws"
            for _ in range(2):  # the second finds the first sentry marked down
                async with _open(url) as app:
                    await app.send(b"\x00\x01")
                    assert await app.recv() == b"echo:\x00\x01"
            await eventually(lambda: w.feed.closed == 2, 15)
            assert [m.outstanding for m in pool.members] == [0, 0]
        finally:
            server.close()
            await pool.aclose()


@contextlib.asynccontextmanager
async def _raw_backend(handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                         Awaitable[None]]) -> AsyncIterator[int]:
    """A hand-written HTTP backend (asyncio streams): answers no library would send."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def _refuser(framing: str, body: bytes) -> contextlib.AbstractAsyncContextManager[int]:
    """A raw HTTP backend that answers every upgrade with 401 and ``body`` framed by
    ``framing``: ``length`` (Content-Length), ``chunked`` (three chunks, one with an
    extension, and a trailer) or ``close`` (no length: the body ends at the close)."""
    async def answer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        head = b"HTTP/1.1 401 Unauthorized\r\nContent-Type: text/plain\r\n"
        if framing == "length":
            w.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        elif framing == "chunked":
            w.write(head + b"Transfer-Encoding: chunked\r\n\r\n")
            third = len(body) // 3
            for i, part in enumerate((body[:third], body[third:2 * third], body[2 * third:])):
                w.write(b"%x%s\r\n" % (len(part), b";ext=1" if i == 1 else b"") + part + b"\r\n")
                await w.drain()
            w.write(b"0\r\nX-Trailer: dropped\r\n\r\n")
        else:
            w.write(head + b"Connection: close\r\n\r\n" + body)
        await w.drain()
        w.close()

    return _raw_backend(answer)


async def _handshake_refused(tmp_path: Path, mesh: Mesh, port: int,
                             backend_done: asyncio.Event | None = None
                             ) -> tuple[Response, int]:
    """The app's WebSocket handshake through a sentry to the backend on ``port``,
    which must fail: the response the app got, and the bytes acme was charged down,
    once the sentry's slot is back (and ``backend_done`` set, the sentry still up)."""
    cfg = config_dict(port, 1, 1, methods=["WS /ws"])
    async with sentry_stack(mesh, write_config(tmp_path, mesh, cfg)) as stack:
        sidecar = stack.sidecar(mesh.acme, mesh.acme_issuer)
        face = await serve_http(sidecar)
        try:
            url = f"ws://127.0.0.1:{face.sockets[0].getsockname()[1]}/ws"
            with pytest.raises(InvalidStatus) as refused:
                async with _open(url):
                    pass
            await eventually(lambda: stack.sentry.gate.in_flight == 0, 15)
            if backend_done is not None:
                async with asyncio.timeout(15):
                    await backend_done.wait()
            row = stack.sentry.usage.rows.get("acme")
            return refused.value.response, row.down if row is not None else 0
        finally:
            face.close()
            await sidecar.aclose()


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
async def test_a_refusal_reaches_the_app_with_its_whole_body_however_framed(
        tmp_path: Path, mesh: Mesh, framing: str) -> None:
    """A backend refusing the upgrade (401): the app gets the status and every byte of
    its body whether the backend framed it by length, in chunks or by closing — a
    chunked or close-delimited refusal used to arrive empty — and acme is charged
    those bytes; a refusal body over the inline bound is a 502 that says so, never a
    cut body."""
    body = b"token expired; renew at /auth\n" + bytes(range(256)) * 80  # ~20 KiB
    async with _refuser(framing, body) as port:
        got, down = await _handshake_refused(tmp_path, mesh, port)
    assert got.status_code == 401
    assert got.body == body
    assert got.headers["content-type"] == "text/plain"
    assert "x-trailer" not in got.headers
    assert down == len(body)
    async with _refuser(framing, bytes(70 * 1024)) as port:
        got, down = await _handshake_refused(tmp_path, mesh, port)
    assert got.status_code == 502
    assert b"refusal body" in got.body
    assert down == 0


async def test_a_backend_switching_to_another_protocol_is_a_502(tmp_path: Path,
                                                                 mesh: Mesh) -> None:
    """A backend that answers the WebSocket handshake with a 101 to ``h2c``: the sentry
    refuses to pipe it (the app asked for a WebSocket), the app gets 502, and the slot
    and the backend connection are given back."""
    closed = asyncio.Event()

    async def liar(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n"
                b"Connection: Upgrade\r\n\r\n")
        await w.drain()
        await r.read()  # until the sentry closes its side
        closed.set()
        w.close()

    async with _raw_backend(liar) as port:
        got, _down = await _handshake_refused(tmp_path, mesh, port, backend_done=closed)
    assert got.status_code == 502
    assert b"h2c" in got.body
