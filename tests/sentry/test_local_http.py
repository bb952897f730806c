"""The sidecar's local HTTP face (llhttp via httptools) with real sockets: what unmodified
apps send (chunked and streamed bodies, Expect: 100-continue, HTTP/1.0, pipelining),
and input fed whole and byte at a time that must end in a clear 4xx, never a crash."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pqcnet.sentry.http1 import Body, EndOfRequest, HttpError, HttpLimits, Request, RequestParser
from pqcnet.sentry.sidecar import serve_http
from tests.gcutil import collector_off, live

from .conftest import Env

pytestmark = pytest.mark.timeout(60)
LIMITS = HttpLimits(header_timeout=5.0, body_timeout=5.0, max_head_bytes=4 * 1024,
                    max_headers=20, max_body=64 * 1024)


async def _port(env: Env, limits: HttpLimits = LIMITS) -> AsyncIterator[int]:
    sidecar = env.stack.sidecar(env.mesh.acme, env.mesh.acme_issuer)
    server = await serve_http(sidecar, limits=limits)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await sidecar.aclose()


@pytest.fixture
async def port(env: Env) -> AsyncIterator[int]:
    async for p in _port(env):
        yield p


async def read_response(r: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    if "content-length" in headers:
        body = await r.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await r.readuntil(b"\r\n"))[:-2], 16)
            body += await r.readexactly(size + 2)
            body = body[:-2]
            if size == 0:
                break
    elif status == 100:
        body = b""
    else:
        body = await asyncio.wait_for(r.read(), 10)
    return status, headers, body


def rpc(i: int = 1) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": i, "method": "eth_call",
                       "params": {"n": i}}).encode()


def chunked(body: bytes, size: int = 7) -> bytes:
    out = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size])
                   for i in range(0, len(body), size))
    return out + b"0\r\n\r\n"


# ---------------------------------------------------------------------------- sans-IO


def _drain(p: RequestParser) -> list[object]:
    out = []
    while (ev := p.next_event()) is not None:
        out.append(ev)
    return out


def test_parser_events_whole_and_byte_at_a_time() -> None:
    body = rpc()
    data = (b"POST /rpc HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunked(body) + b"GET /status HTTP/1.0\r\n\r\n")
    for step in (len(data), 1):
        p = RequestParser(LIMITS)
        events: list[object] = []
        for i in range(0, len(data), step):
            p.feed(data[i:i + step])
            events += _drain(p)
        reqs = [e for e in events if isinstance(e, Request)]
        assert [(r.method, r.target, r.chunked, r.http10, r.keep_alive) for r in reqs] == [
            ("POST", "/rpc", True, False, True), ("GET", "/status", False, True, False)]
        assert b"".join(e.data for e in events if isinstance(e, Body)) == body
        assert sum(isinstance(e, EndOfRequest) for e in events) == 2
        assert not reqs[0].idempotent and reqs[1].idempotent


def test_parser_bounds_a_header_line_that_never_ends() -> None:
    p = RequestParser(LIMITS)
    p.feed(b"GET / HTTP/1.1\r\nX-Big: ")
    with pytest.raises(HttpError) as err:
        for _ in range(LIMITS.max_head_bytes + 1):
            p.feed(b"a")  # byte at a time: llhttp buffers it, we count it
    assert err.value.http_status == 431
    with pytest.raises(HttpError):  # unusable afterwards
        p.feed(b"\r\n\r\n")


def test_parser_switches_to_websocket_and_keeps_what_follows() -> None:
    plain = b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n"
    upgrade = (b"GET /ws?x=1 HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\n"
               b"Upgrade: websocket\r\nSec-WebSocket-Key: k\r\n\r\n")
    frames = b"\x81\x82abcdXY" * 3  # the new protocol's bytes, pipelined behind
    data = plain + upgrade + frames
    for step in (len(data), 1, 5):
        p = RequestParser(LIMITS)
        events: list[object] = []
        rest = b""
        for i in range(0, len(data), step):
            p.feed(data[i:i + step])
            events += _drain(p)
            if p.upgraded is not None:  # the connection stops feeding HTTP here
                rest = p.upgraded + data[i + step:]
                break
        reqs = [e for e in events if isinstance(e, Request)]
        assert [(r.target, r.websocket, r.keep_alive) for r in reqs] == [
            ("/status", False, True), ("/ws?x=1", True, False)]
        assert rest == frames
        with pytest.raises(HttpError) as err:
            p.feed(b"GET / HTTP/1.1\r\n\r\n")
        assert err.value.http_status == 400


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
    b"POST /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Content-Length: 2\r\n\r\nab",
    b"OPTIONS /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
])
def test_parser_refuses_other_upgrades_with_501(data: bytes) -> None:
    p = RequestParser(LIMITS)
    with pytest.raises(HttpError) as err:
        p.feed(data)
    assert err.value.http_status == 501
    assert _drain(p) == []  # nothing of the refused request reaches the sentry


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=7))
def test_parser_parse_or_typed_error(data: bytes, step: int) -> None:
    for whole in (True, False):
        p = RequestParser(LIMITS)
        try:
            if whole:
                p.feed(data + b"\r\n\r\n")
            else:
                for i in range(0, len(data), step):
                    p.feed(data[i:i + step])
            _drain(p)
            p.feed_eof()
        except HttpError as exc:
            assert 400 <= exc.http_status < 600


# ---------------------------------------------------------------------------- sockets


async def test_chunked_request_body_reaches_the_backend(env: Env, port: int) -> None:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    body = rpc(3)
    w.write(b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunked(body))
    status, _h, out = await read_response(r)
    assert status == 200 and json.loads(out)["result"]["echo"]["params"] == {"n": 3}
    seen = env.http.seen.requests[-1]
    assert json.loads(seen["body"]) == json.loads(body)  # (re-serialized by the sanitizer)
    assert seen["headers"].get("Content-Length") == str(len(seen["body"]))
    assert "Transfer-Encoding" not in seen["headers"]
    w.close()


async def test_expect_100_continue(env: Env, port: int) -> None:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    body = rpc(4)
    w.write(b"POST /rpc HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    assert (await read_response(r))[0] == 100  # only then does the client send its body
    w.write(body)
    status, _h, out = await read_response(r)
    assert status == 200 and json.loads(out)["id"] == 4
    assert "Expect" not in env.http.seen.requests[-1]["headers"]
    # a body that cannot fit is refused before the client sends it
    w.write(b"POST /rpc HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % (LIMITS.max_body + 1))
    status, headers, _ = await read_response(r)
    assert status == 413 and headers["connection"] == "close"
    w.close()


async def test_streamed_body_in_pieces(env: Env, port: int) -> None:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({"jsonrpc": "2.0", "id": 5, "method": "m",
                       "params": {"blob": "z" * 20_000}}).encode()
    w.write(b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
    for i in range(0, len(body), 4096):
        w.write(body[i:i + 4096])
        await w.drain()
        await asyncio.sleep(0.02)
    status, _h, out = await read_response(r)
    assert status == 200 and json.loads(out)["id"] == 5
    assert json.loads(env.http.seen.requests[-1]["body"]) == json.loads(body)
    w.close()


async def test_http10_client_and_pipelining(env: Env, port: int) -> None:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"GET /status HTTP/1.0\r\n\r\n")
    status, headers, _ = await read_response(r)
    assert status == 200 and headers["connection"] == "close"
    assert await asyncio.wait_for(r.read(), 5) == b""  # HTTP/1.0 default: closed
    w.close()
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"GET /status HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
            + b"".join(b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                       % (len(rpc(i)), rpc(i)) for i in range(3)))
    status, headers, _ = await read_response(r)
    assert status == 200 and headers["connection"] == "keep-alive"
    ids = [json.loads((await read_response(r))[2])["id"] for _ in range(3)]
    assert ids == [0, 1, 2]
    w.close()


async def test_byte_at_a_time_request_is_served(env: Env, port: int) -> None:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    body = rpc(6)
    data = (b"POST /rpc HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunked(body, 5))
    for i in range(len(data)):
        w.write(data[i:i + 1])
        await w.drain()
    status, _h, out = await read_response(r)
    assert status == 200 and json.loads(out)["id"] == 6
    w.close()


@pytest.mark.parametrize(("data", "status"), [
    # a header that grows byte by byte past max_head_bytes
    (b"GET /status HTTP/1.1\r\nX-Big: " + b"a" * 6000, 431),
    (b"POST /rpc HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
     + chunked(b"x" * (LIMITS.max_body + 10), 8000), 413),
    (b"POST /rpc HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
])
async def test_bad_input_gets_a_clear_4xx(env: Env, port: int, data: bytes,
                                          status: int) -> None:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    step = 61 if status == 431 else 4096  # the growing head arrives in small pieces
    try:
        for i in range(0, len(data), step):
            w.write(data[i:i + step])
            await w.drain()
    except ConnectionError:
        pass  # refused and closed while we were still sending: the answer is still there
    got, headers, out = await read_response(r)
    assert got == status, out
    assert headers["connection"] == "close" and json.loads(out)["error"]
    w.close()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        assert (await client.get("/status")).status_code == 200  # the listener is fine
    assert all(req["path"] == "/status" for req in env.http.seen.requests)


async def test_client_vanishing_mid_body_leaves_the_listener_working(env: Env,
                                                                    port: int) -> None:
    for _ in range(3):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nabc")
        await w.drain()
        w.close()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        r = await client.post("/rpc", content=rpc(9), headers={"content-type": "a/json"})
        assert r.status_code == 200 and r.json()["id"] == 9


async def test_raw_socket_garbage_in_random_pieces(env: Env) -> None:
    """Seeded random bytes (and mangled real requests) over real sockets, in random
    pieces: each connection ends with a 4xx/5xx status line or a close, never a hang or
    a crash, and the listener keeps serving."""
    import random

    rnd = random.Random(15)
    good = (b"POST /rpc HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunked(rpc(1)))
    blobs = [rnd.randbytes(rnd.randint(1, 400)) for _ in range(12)]
    for _ in range(12):  # a valid request with a few bytes flipped
        b = bytearray(good)
        for _ in range(3):
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        blobs.append(bytes(b))
    limits = HttpLimits(header_timeout=0.5, body_timeout=0.5, idle_timeout=0.5,
                        max_head_bytes=1024, max_headers=20, max_body=4096)
    async for port in _port(env, limits):

        async def one(blob: bytes, port: int = port) -> bytes:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            try:
                i = 0
                while i < len(blob):
                    n = rnd.randint(1, 64)
                    w.write(blob[i:i + n])
                    await w.drain()
                    i += n
                return await asyncio.wait_for(r.read(), 10)
            except ConnectionError:
                return b""
            finally:
                w.close()

        outs = await asyncio.gather(*(one(b) for b in blobs))
        for blob, out in zip(blobs, outs, strict=True):
            if out:
                status = out.split(b"\r\n", 1)[0]
                assert status.startswith(b"HTTP/1.1 "), (blob, out[:100])
                code = int(status[9:12])
                assert code == 200 or 400 <= code < 600, (blob, out[:100])
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            assert (await client.get("/status")).status_code == 200


async def test_closed_connections_leave_nothing_for_the_cyclic_collector(
        env: Env, port: int) -> None:
    """A serving sidecar runs the cyclic collector rarely (``tune_gc``): a closed local
    connection must be freed by reference counting alone, or its objects pile up until
    a full collection (the long run's slow RSS growth). Counted with the collector off:
    no request parser of the 20 closed connections is left."""
    with collector_off():
        before = live(RequestParser)
        for i in range(20):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            body = rpc(i)
            w.write(b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(body), body))
            status, _, got = await read_response(r)
            assert status == 200 and json.loads(got)["id"] == i
            w.close()
            await w.wait_closed()
        for _ in range(100):  # the server side sees each EOF on its own schedule
            if live(RequestParser) <= before:
                break
            await asyncio.sleep(0.02)
        assert live(RequestParser) <= before, live(RequestParser) - before
