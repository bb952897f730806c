"""QSTP over real loopback sockets: handshake, identities, streams, integrity, resumption."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from pqcnet import qstp
from pqcnet.qstp.aio import Tunnel
from pqcnet.qstp.errors import TunnelClosed
from tests.gcutil import collector_off, live

from .qstputil import CLIENT_ID, SERVER_ID, Mesh, make_mesh, running_server

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    return make_mesh()


async def test_mutual_handshake_negotiates_hybrid_group_and_spiffe_ids(mesh: Mesh) -> None:
    seen: list[str] = []

    async def handler(tunnel: Tunnel) -> None:
        seen.append(str(tunnel.peer.spiffe_id))
        seen.append(tunnel.peer.group)

    async with running_server(mesh, handler) as server:
        tunnel = await qstp.connect("127.0.0.1", server.port, mesh.client)
        assert tunnel.peer.group == "X25519MLKEM768"
        assert str(tunnel.peer.spiffe_id) == SERVER_ID
        assert tunnel.peer.tls_version == "TLSv1.3"
        assert not tunnel.resumed
        assert len(tunnel.channel_binding()) == 32
        await tunnel.wait_closed()  # the server closes when its handler returns
        assert tunnel.close_reason is not None
        assert tunnel.close_reason.error_code == 0
    assert seen == [CLIENT_ID, "X25519MLKEM768"]


async def test_channel_binding_and_exporter_match_on_both_ends(mesh: Mesh) -> None:
    server_side: asyncio.Future[tuple[bytes, bytes]] = asyncio.get_running_loop().create_future()

    async def handler(tunnel: Tunnel) -> None:
        server_side.set_result((tunnel.channel_binding(),
                                tunnel.export_keying_material(b"EXPORTER-test", 48)))
        await tunnel.wait_closed()

    async with running_server(mesh, handler) as server:
        tunnel = await qstp.connect("127.0.0.1", server.port, mesh.client)
        cb, ekm = await server_side
        assert tunnel.channel_binding() == cb
        assert tunnel.export_keying_material(b"EXPORTER-test", 48) == ekm
        await tunnel.close()


async def test_large_transfer_round_trips_intact(mesh: Mesh) -> None:
    payload = os.urandom(8 * 1024 * 1024 + 123)
    async with running_server(mesh) as server:
        tunnel = await qstp.connect("127.0.0.1", server.port, mesh.client)
        stream = tunnel.open_stream()
        writer = asyncio.create_task(stream.send(payload, end=True))
        echoed = await stream.read_all(len(payload) + 1)
        await writer
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
        await tunnel.close()


async def test_many_concurrent_streams_in_both_directions(mesh: Mesh) -> None:
    n = 40
    server_results: dict[int, bytes] = {}

    async def handler(tunnel: Tunnel) -> None:
        async def serve_one(stream: qstp.Stream) -> None:
            data = await stream.read_all(1 << 20)
            await stream.send(hashlib.sha256(data).digest(), end=True)

        async def push(i: int) -> None:
            s = tunnel.open_stream()
            body = hashlib.sha256(b"server-%d" % i).digest() * (i * 50 + 1)
            await s.send(body, end=True)
            server_results[s.id] = hashlib.sha256(await s.read_all(1 << 20)).digest()

        pushes = [asyncio.create_task(push(i)) for i in range(n)]
        served: list[asyncio.Task[None]] = []
        async for stream in tunnel:
            served.append(asyncio.create_task(serve_one(stream)))
            if len(served) == n:
                break
        await asyncio.gather(*pushes, *served)
        await tunnel.wait_closed()

    async with running_server(mesh, handler) as server:
        tunnel = await qstp.connect("127.0.0.1", server.port, mesh.client)

        async def client_one(i: int) -> None:
            s = tunnel.open_stream()
            body = os.urandom(i * 997 + 1)
            await s.send(body, end=True)
            assert await s.read_all(64) == hashlib.sha256(body).digest()

        async def echo_back(stream: qstp.Stream) -> None:
            data = await stream.read_all(1 << 20)
            await stream.send(data, end=True)

        async def accept_server_streams() -> int:
            tasks = []
            async for stream in tunnel:
                assert stream.id % 2 == 0  # server-initiated ids are even
                tasks.append(asyncio.create_task(echo_back(stream)))
                if len(tasks) == n:
                    break
            await asyncio.gather(*tasks)
            return len(tasks)

        ours = [asyncio.create_task(client_one(i)) for i in range(n)]
        accepted = await accept_server_streams()
        await asyncio.gather(*ours)
        assert accepted == n
        for _ in range(100):
            if len(server_results) == n:
                break
            await asyncio.sleep(0.01)
        expected = {hashlib.sha256(hashlib.sha256(b"server-%d" % i).digest() * (i * 50 + 1))
                    .digest() for i in range(n)}
        assert set(server_results.values()) == expected
        await tunnel.close()


async def test_resumed_connection_is_detected(mesh: Mesh) -> None:
    resumed_on_server: list[bool] = []

    async def handler(tunnel: Tunnel) -> None:
        resumed_on_server.append(tunnel.resumed)

    async with running_server(mesh, handler) as server:
        first = await qstp.connect("127.0.0.1", server.port, mesh.client)
        session = first.session
        assert session is not None
        assert not first.resumed
        await first.close()
        second = await qstp.connect("127.0.0.1", server.port, mesh.client, session=session)
        assert second.resumed
        assert str(second.peer.spiffe_id) == SERVER_ID
        await second.close()
    assert resumed_on_server == [False, True]


async def test_ping_measures_rtt_and_close_fails_pending_receives(mesh: Mesh) -> None:
    async def handler(tunnel: Tunnel) -> None:
        async for _stream in tunnel:
            await asyncio.sleep(0.05)
            await tunnel.close()

    async with running_server(mesh, handler) as server:
        tunnel = await qstp.connect("127.0.0.1", server.port, mesh.client)
        assert await tunnel.ping() >= 0.0
        stream = tunnel.open_stream()
        await stream.send(b"hello")
        with pytest.raises(TunnelClosed):
            await stream.recv()
        assert tunnel.closed
        with pytest.raises(TunnelClosed):
            tunnel.open_stream()


async def test_server_shutdown_with_busy_tunnels_ends_them_cleanly(mesh: Mesh) -> None:
    started = asyncio.Event()

    async def handler(tunnel: Tunnel) -> None:
        started.set()
        await asyncio.Event().wait()  # a handler that never returns by itself

    server = await qstp.serve(handler, "127.0.0.1", 0, mesh.server)
    tunnel = await qstp.connect("127.0.0.1", server.port, mesh.client)
    stream = tunnel.open_stream()
    await stream.send(b"waiting for an answer")
    pending = asyncio.create_task(stream.recv())
    await started.wait()
    server.close()
    await asyncio.wait_for(server.wait_closed(), 10)
    assert server.tunnels == 0
    with pytest.raises(TunnelClosed):
        await asyncio.wait_for(pending, 5)
    await tunnel.wait_closed()
    assert tunnel.close_reason is not None and tunnel.close_reason.by_peer
    assert tunnel.goaway is not None


@pytest.mark.parametrize("closer", ["client", "server"])
async def test_closed_tunnels_are_freed_without_the_cyclic_collector(
        mesh: Mesh, closer: str) -> None:
    """Serving processes run the cyclic collector rarely (``tune_gc``), so a closed
    tunnel must be freed by reference counting alone. The close_notify a tunnel ends
    with used to be kept with its traceback, whose frame held the exception again: a
    cycle that kept each closed tunnel (TLS objects, buffers, events) until a full
    collection. Counted with the collector off, on both sides of five tunnels closed by
    the client or by the server's handler."""

    async def handler(tunnel: Tunnel) -> None:
        async for stream in tunnel:
            await stream.send(await stream.read_all(100), end=True)
            if closer == "server":
                return  # the server closes the tunnel

    async with running_server(mesh, handler) as server:
        with collector_off():
            before = live(Tunnel)
            for i in range(5):
                t = await qstp.connect("127.0.0.1", server.port, mesh.client)
                s = t.open_stream()
                await s.send(b"ping %d" % i, end=True)
                assert await s.read_all(100) == b"ping %d" % i
                if closer == "client":
                    await t.close()
                else:
                    await t.wait_closed()
            del t, s
            for _ in range(100):
                if live(Tunnel) <= before:
                    break
                await asyncio.sleep(0.02)
            assert live(Tunnel) <= before, live(Tunnel) - before
