"""Streaming gRPC through the sidecar: an unmodified grpcio client (generated stubs) →
sidecar → QSTP → sentry → a real grpc.aio backend. Server-streaming and bidi calls,
status / initial and trailing metadata carried, flow control bounded under a slow
reader, cancellation propagated from either side; plus the framing fed whole and byte
at a time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pqcnet.proto import echo_pb2, echo_pb2_grpc
from pqcnet.qstp.config import QstpConfiguration
from pqcnet.sentry.errors import RequestTooLarge, WireError
from pqcnet.sentry.grpc_stream import (
    MESSAGE,
    TRAILERS,
    FrameDecoder,
    decode_trailers,
    message_frame,
    trailer_frame,
)
from pqcnet.sentry.pool import SentryPool
from pqcnet.sentry.sidecar import serve_grpc

from .conftest import Env
from .harness import sentry_stack, sidecar_to

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def stub(env: Env) -> AsyncIterator[echo_pb2_grpc.EchoStub]:
    sidecar = env.stack.sidecar(env.mesh.acme, env.mesh.acme_issuer)
    server, port = await serve_grpc(sidecar)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield echo_pb2_grpc.EchoStub(channel)
    finally:
        await server.stop(None)
        await sidecar.aclose()


async def _until(cond: Any) -> None:
    deadline = time.monotonic() + 15.0
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------------------- framing


def test_frames_round_trip_and_bounds() -> None:
    wire = message_frame(b"a") + message_frame(b"") + trailer_frame(5, "gone", [("k", "v")])
    frames = FrameDecoder().feed(wire)
    assert [f for f, _ in frames] == [MESSAGE, MESSAGE, TRAILERS]
    assert [p for _, p in frames[:2]] == [b"a", b""]
    status = decode_trailers(frames[2][1])
    assert (status.grpc_code, status.reason, status.headers) == (5, "gone", (("k", "v"),))
    # a length over the bound is refused from the 5-byte prefix alone
    with pytest.raises(RequestTooLarge):
        FrameDecoder(1024).feed(bytes((MESSAGE,)) + (1025).to_bytes(4, "big"))
    with pytest.raises(WireError):  # a client may not send trailers
        FrameDecoder(trailers_allowed=False).feed(trailer_frame(0, ""))
    with pytest.raises(WireError):  # nothing after the trailers
        FrameDecoder().feed(trailer_frame(0, "") + message_frame(b"x"))
    with pytest.raises(WireError):
        FrameDecoder().feed(b"\x01\x00\x00\x00\x00")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64), st.integers(min_value=1, max_value=9))
def test_decoder_parse_or_typed_error(data: bytes, step: int) -> None:
    """Garbage fed whole or in pieces: frames or a WireError, never another exception,
    and the same frames either way."""
    whole: list[tuple[int, bytes]] | None
    try:
        whole = FrameDecoder(32).feed(data)
    except WireError:
        whole = None
    dec = FrameDecoder(32)
    pieces: list[tuple[int, bytes]] = []
    try:
        for i in range(0, len(data), step):
            pieces += dec.feed(data[i:i + step])
    except WireError:
        assert whole is None or len(pieces) <= len(whole)
        return
    assert whole is not None and pieces == whole


# ---------------------------------------------------------------------------- calls


async def test_server_streaming_with_metadata_and_status(env: Env,
                                                         stub: echo_pb2_grpc.EchoStub) -> None:
    call = stub.Count(echo_pb2.CountRequest(count=200, size=100),
                      metadata=(("x-user-id", "u-1"), ("x-trace", "t")), timeout=30)
    seqs = [reply.seq async for reply in call]
    assert seqs == list(range(200))
    assert await call.code() == grpc.StatusCode.OK
    assert ("x-count-start", "yes") in tuple(await call.initial_metadata())
    trailing = dict(await call.trailing_metadata())
    assert trailing["x-count"] == "200" and trailing["x-count-bin"] == b"\x00\xffend"
    _what, md = env.grpc.seen[-1]
    seen = dict(md)
    assert seen["x-trace"] == "t" and seen["x-user-id"] != "u-1"  # sanitizer applied
    assert "x-pqcnet-assertion" not in seen
    # a backend failing after some replies: the replies, then its status and trailers
    call = stub.Count(echo_pb2.CountRequest(count=3, fail_after="disk gone"), timeout=30)
    got = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for reply in call:
            got.append(reply.seq)
    assert got == [0, 1, 2]
    assert info.value.code() == grpc.StatusCode.DATA_LOSS
    assert info.value.details() == "disk gone"
    assert dict(info.value.trailing_metadata())["x-failed-at"] == "3"


async def test_bidi_interleaved_and_either_side_finishing_first(
        env: Env, stub: echo_pb2_grpc.EchoStub) -> None:
    call = stub.Chat(timeout=30)
    for word in ("alpha", "beta", "gamma"):  # strictly one in, one out: no buffering
        await call.write(echo_pb2.EchoRequest(text=word))
        assert (await call.read()).text == word.upper()
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK
    assert dict(await call.trailing_metadata())["x-chat-messages"] == "3"
    # the backend finishes while the client could still send
    call = stub.Chat(timeout=30)
    await call.write(echo_pb2.EchoRequest(text="one"))
    assert (await call.read()).text == "ONE"
    await call.write(echo_pb2.EchoRequest(text="bye"))
    assert await call.read() is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK
    # the backend cancels mid-stream: the client sees CANCELLED with the reason
    call = stub.Chat(timeout=30)
    await call.write(echo_pb2.EchoRequest(text="x"))
    assert (await call.read()).text == "X"
    await call.write(echo_pb2.EchoRequest(text="give-up"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() == grpc.StatusCode.CANCELLED
    assert info.value.details() == "backend gave up"
    # unary calls still take the same path
    assert (await stub.Say(echo_pb2.EchoRequest(text="hi"), timeout=10)).text == "HI"
    await _until(lambda: env.stack.sentry.gate.in_flight == 0)


async def test_slow_reader_bounds_a_fast_stream_and_cancel_reaches_the_backend(
        env: Env, stub: echo_pb2_grpc.EchoStub) -> None:
    """An endless 16 KiB-per-reply stream behind a client that stops reading: the
    backend is held back (it is not allowed to run ahead without bound); the client's
    cancel then ends the backend call and frees the sentry's concurrency slot."""
    size = 16 * 1024
    call = stub.Count(echo_pb2.CountRequest(count=0, size=size), timeout=60)
    for _ in range(5):
        await call.read()
    # let the pipeline fill: the backend stops once every window on the way is full
    before = -1
    while env.grpc.produced != before:
        before = env.grpc.produced
        await asyncio.sleep(1.0)
    ahead = env.grpc.produced - 5
    # in flight at most: backend→sentry and sidecar→client HTTP/2 windows (grpc's BDP
    # probing grows each from 64 KiB; ~6 MiB each seen here: 762 replies ahead in all),
    # the QSTP stream window, one message per hop being handed on. An unbounded relay
    # would never stop (the loop above would time out)
    qstp = QstpConfiguration().stream_window
    bound = (2 * 16 * 1024 * 1024 + qstp) // size
    assert 0 < ahead < bound, (ahead, bound)
    assert env.stack.sentry.gate.in_flight == 1
    call.cancel()
    await asyncio.wait_for(env.grpc.cancelled.wait(), 15)
    await _until(lambda: env.stack.sentry.gate.in_flight == 0 and env.grpc.streams == 0)
    stopped = env.grpc.produced
    await asyncio.sleep(0.5)
    assert env.grpc.produced == stopped


async def test_client_cancel_mid_bidi_and_deadline(env: Env,
                                                   stub: echo_pb2_grpc.EchoStub) -> None:
    call = stub.Chat(timeout=60)
    await call.write(echo_pb2.EchoRequest(text="x"))
    assert (await call.read()).text == "X"
    await call.write(echo_pb2.EchoRequest(text="slow"))  # the backend works on it...
    await asyncio.sleep(0.3)
    call.cancel()  # ...when the client gives up: the backend's handler is cancelled
    await asyncio.wait_for(env.grpc.cancelled.wait(), 15)
    await _until(lambda: env.stack.sentry.gate.in_flight == 0 and env.grpc.streams == 0)
    # a deadline is a cancel too: the client gets DEADLINE_EXCEEDED, the backend stops
    env.grpc.cancelled.clear()
    call = stub.Count(echo_pb2.CountRequest(count=0, size=1024), timeout=1.0)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            await asyncio.sleep(0.05)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.wait_for(env.grpc.cancelled.wait(), 15)
    await _until(lambda: env.stack.sentry.gate.in_flight == 0 and env.grpc.streams == 0)


async def test_sentry_going_away_mid_stream_is_unavailable_not_ok(
        env: Env, stub: echo_pb2_grpc.EchoStub) -> None:
    call = stub.Count(echo_pb2.CountRequest(count=0, size=1024), timeout=30)
    await call.read()
    await env.stack.server.aclose()  # the sentry stops: tunnels end mid-stream
    with pytest.raises(grpc.aio.AioRpcError) as info:
        while await call.read() is not grpc.aio.EOF:
            pass
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    await asyncio.wait_for(env.grpc.cancelled.wait(), 15)  # and the backend was told


async def test_streams_through_a_pool_of_sentries(env: Env) -> None:
    """The sidecar's pool carries streaming calls too; each goes to one sentry and
    releases its outstanding slot when the head arrives."""
    async with sentry_stack(env.mesh, env.stack.config_path) as second:
        pool = SentryPool([(str(p), sidecar_to(p, env.mesh.acme, env.mesh.acme_issuer))
                           for p in (env.stack.port, second.port)])
        server, port = await serve_grpc(pool)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = echo_pb2_grpc.EchoStub(channel)
                calls = [stub.Count(echo_pb2.CountRequest(count=20), timeout=30)
                         for _ in range(4)]

                async def seqs(call: Any) -> list[int]:
                    return [r.seq async for r in call]

                got = await asyncio.gather(*(seqs(c) for c in calls))
                assert got == [list(range(20))] * 4
                chat = stub.Chat(timeout=30)
                await chat.write(echo_pb2.EchoRequest(text="pool"))
                assert (await chat.read()).text == "POOL"
                await chat.done_writing()
                assert await chat.code() == grpc.StatusCode.OK
            assert all(m.served >= 1 for m in pool.members), pool.status()
            assert [m.outstanding for m in pool.members] == [0, 0]
        finally:
            await server.stop(None)
            await pool.aclose()
