"""Long-lived sentry streams end when their use does: TCP pipes and streaming gRPC calls.

A TCP pipe or a streaming gRPC call holds a concurrency-gate slot (a pipe also a
backend connection) for its whole life. Two ways one outlived its use: its client
stopped reading (the sentry's write towards it waited for good; only plain responses
had a write deadline) and a pipe or call where nothing moves (kept until a side
closes, which may be never). Now every write towards the client is under
``bounds.response_write_timeout`` (``ClientTooSlow``), a pipe that moves no byte for
``bounds.tcp_idle_timeout`` is closed at both ends (``PipeIdle``) and a streaming gRPC
call that moves no message for ``bounds.grpc_stream_idle_timeout`` is ended with
UNAVAILABLE (``StreamIdle``); a pipe or call that keeps talking, however slowly, is
not. Checked through real sidecars and real TCP and gRPC backends: the client sees its
connection end, the backend sees its connection (or call) end, the slot comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from pqcnet.proto import echo_pb2, echo_pb2_grpc
from pqcnet.sentry.sidecar import serve_grpc, serve_tcp
from tests.relayer.helpers import eventually

from .harness import (
    Mesh,
    Stack,
    TcpEcho,
    config_dict,
    grpc_backend,
    sentry_stack,
    tcp_echo,
    write_config,
)

pytestmark = pytest.mark.timeout(90)

@contextlib.asynccontextmanager
async def _stack(tmp_path: Path, mesh: Mesh, grpc_port: int, tcp_port: int,
                 **bounds: float) -> AsyncIterator[Stack]:
    cfg = config_dict(1, grpc_port, tcp_port, max_in_flight=4, tenant_share=1.0)
    cfg["bounds"].update(bounds)
    async with sentry_stack(mesh, write_config(tmp_path, mesh, cfg)) as s:
        yield s


@contextlib.asynccontextmanager
async def _pipes(s: Stack, mesh: Mesh) -> AsyncIterator[int]:
    """acme's sidecar TCP face for backend ``tcp-echo``: its local port."""
    sidecar = s.sidecar(mesh.acme, mesh.acme_issuer)
    server = await serve_tcp(sidecar, "tcp-echo")
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await sidecar.aclose()


async def _ended(r: asyncio.StreamReader) -> None:
    """The connection ends (EOF or reset) within 15 s, whatever was still buffered;
    TimeoutError if not (an OSError: not caught below)."""
    async with asyncio.timeout(15):
        with contextlib.suppress(ConnectionError):
            while await r.read(1 << 20):
                pass


def _rejections(s: Stack, reason: str) -> float:
    return s.sentry.metrics.value("pqcnet_sentry_rejections_total", {"reason": reason})


async def test_an_idle_pipe_is_closed_at_both_ends_and_a_talking_one_is_not(
        tmp_path: Path, mesh: Mesh) -> None:
    """Idle timeout 2 s: one pipe says nothing after its first echo, the other echoes
    every 0.2 s for 5 s. The quiet one ends (client and backend see it), the talking
    one gets every echo; then its client closes it: no second ``PipeIdle``."""
    backend = TcpEcho()
    async with tcp_echo(backend) as tcp_port, \
            _stack(tmp_path, mesh, 1, tcp_port, tcp_idle_timeout=2.0) as s, \
            _pipes(s, mesh) as port:
        quiet_r, quiet_w = await asyncio.open_connection("127.0.0.1", port)
        talk_r, talk_w = await asyncio.open_connection("127.0.0.1", port)
        try:
            for r, w in ((quiet_r, quiet_w), (talk_r, talk_w)):
                w.write(b"ping")
                assert await asyncio.wait_for(r.readexactly(4), 10) == b"gnip"
            gate = s.sentry.gate
            assert gate.in_flight == 2 and backend.opened == 2
            for i in range(25):  # 5 s, more than twice the idle timeout
                word = f"{i:04d}".encode()
                talk_w.write(word)
                assert await asyncio.wait_for(talk_r.readexactly(4), 10) == word[::-1]
                await asyncio.sleep(0.2)
            await _ended(quiet_r)
            assert _rejections(s, "PipeIdle") == 1
            await eventually(lambda: backend.closed == 1, 10)
            assert gate.in_flight == 1
            talk_w.write(b"last")  # still open after the quiet one was closed
            assert await asyncio.wait_for(talk_r.readexactly(4), 10) == b"tsal"
        finally:
            quiet_w.close()
            talk_w.close()
        await eventually(lambda: gate.in_flight == 0 and backend.closed == 2, 10)
        assert _rejections(s, "PipeIdle") == 1  # closed by its client, not for idling
        assert _rejections(s, "ClientTooSlow") == 0


async def test_a_pipe_whose_client_resets_is_freed_at_once(tmp_path: Path,
                                                            mesh: Mesh) -> None:
    """The app's connection is reset (SO_LINGER 0: no FIN, as from a crashed host): the
    sidecar resets the sentry stream, so the slot and the backend connection come back
    now, not after the idle timeout (60 s here)."""
    backend = TcpEcho()
    async with tcp_echo(backend) as tcp_port, \
            _stack(tmp_path, mesh, 1, tcp_port, tcp_idle_timeout=60.0) as s, \
            _pipes(s, mesh) as port:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"ping")
        assert await asyncio.wait_for(r.readexactly(4), 10) == b"gnip"
        assert s.sentry.gate.in_flight == 1
        sock = w.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        w.transport.abort()
        await eventually(lambda: s.sentry.gate.in_flight == 0 and backend.closed == 1, 15)
        assert _rejections(s, "PipeIdle") == 0


async def test_a_pipe_whose_client_stops_reading_is_cut(tmp_path: Path, mesh: Mesh) -> None:
    """The backend writes without end, the client reads nothing: the sentry's write
    waits ``response_write_timeout`` (1 s) and the pipe is cut; the backend's writes
    fail (its connection closed), the slot comes back. The idle timeout (60 s) plays
    no part: bytes were moving until the client's buffers were full."""
    backend = TcpEcho()
    async with tcp_echo(backend) as tcp_port, \
            _stack(tmp_path, mesh, 1, tcp_port, response_write_timeout=1.0,
                   tcp_idle_timeout=60.0) as s, \
            _pipes(s, mesh) as port:
        _r, w = await asyncio.open_connection("127.0.0.1", port)
        try:
            w.write(TcpEcho.FLOOD)
            await w.drain()
            gate = s.sentry.gate
            await eventually(lambda: gate.in_flight == 1, 10)
            await eventually(lambda: gate.in_flight == 0, 30)
            assert _rejections(s, "ClientTooSlow") == 1
            assert _rejections(s, "PipeIdle") == 0
            await eventually(lambda: backend.closed == 1, 10)
        finally:
            w.close()


async def test_a_grpc_stream_whose_client_stops_reading_is_cut(
        tmp_path: Path, mesh: Mesh) -> None:
    """An endless server stream read five messages in, then not at all: the sentry's
    write waits 1 s, the stream is reset, the backend call is cancelled, the slot comes
    back, and the client's call fails — it never ends OK."""
    async with grpc_backend() as (servicer, grpc_port), \
            _stack(tmp_path, mesh, grpc_port, 1, response_write_timeout=1.0) as s:
        sidecar = s.sidecar(mesh.acme, mesh.acme_issuer)
        server, port = await serve_grpc(sidecar)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = echo_pb2_grpc.EchoStub(channel)
                call: Any = stub.Count(echo_pb2.CountRequest(count=0, size=16 * 1024),
                                       timeout=60)
                for _ in range(5):
                    await call.read()
                gate = s.sentry.gate
                assert gate.in_flight == 1
                await asyncio.wait_for(servicer.cancelled.wait(), 30)
                await eventually(lambda: gate.in_flight == 0 and servicer.streams == 0, 15)
                assert _rejections(s, "ClientTooSlow") == 1
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async with asyncio.timeout(30):
                        while await call.read() is not grpc.aio.EOF:
                            pass
                assert info.value.code() != grpc.StatusCode.OK
        finally:
            await server.stop(None)
            await sidecar.aclose()


async def test_an_idle_grpc_stream_is_ended_and_a_talking_one_is_not(
        tmp_path: Path, mesh: Mesh) -> None:
    """Idle timeout 2 s, three bidirectional Chat calls through a real sidecar: one
    never says anything (the backend never answers, so not even its response head
    went out), one says nothing after its first echo, one says something every 0.2 s
    for 5 s. The first two end UNAVAILABLE saying why, their backend calls ended and
    their slots back; the talking one gets every echo and ends OK when its client
    finishes."""
    async with grpc_backend() as (servicer, grpc_port), \
            _stack(tmp_path, mesh, grpc_port, 1, grpc_stream_idle_timeout=2.0) as s:
        sidecar = s.sidecar(mesh.acme, mesh.acme_issuer)
        server, port = await serve_grpc(sidecar)
        gate = s.sentry.gate
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = echo_pb2_grpc.EchoStub(channel)
                silent: Any = stub.Chat(timeout=60)
                quiet: Any = stub.Chat(timeout=60)
                talk: Any = stub.Chat(timeout=60)
                for call in (quiet, talk):
                    await call.write(echo_pb2.EchoRequest(text="hi"))
                    assert (await call.read()).text == "HI"
                await eventually(lambda: servicer.streams == 3, 10)
                assert gate.in_flight == 3
                for i in range(25):  # 5 s, more than twice the idle timeout
                    await talk.write(echo_pb2.EchoRequest(text=f"m{i}"))
                    assert (await talk.read()).text == f"M{i}"
                    await asyncio.sleep(0.2)
                for call in (silent, quiet):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        async with asyncio.timeout(15):
                            await call.read()
                    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                    assert "moved no message for 2s" in (info.value.details() or "")
                assert _rejections(s, "StreamIdle") == 2
                # their backend calls ended, their slots are back (within the talking
                # call's idle timeout: it must not idle here)
                await eventually(lambda: gate.in_flight == 1 and servicer.streams == 1, 1)
                await talk.write(echo_pb2.EchoRequest(text="last"))
                assert (await talk.read()).text == "LAST"
                await talk.done_writing()
                assert await talk.read() is grpc.aio.EOF
                assert await talk.code() == grpc.StatusCode.OK
            await eventually(lambda: gate.in_flight == 0 and servicer.streams == 0, 10)
            assert _rejections(s, "StreamIdle") == 2  # ended by its client, not for idling
            assert _rejections(s, "ClientTooSlow") == 0
        finally:
            await server.stop(None)
            await sidecar.aclose()
