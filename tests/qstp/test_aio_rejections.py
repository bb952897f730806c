"""Refusals over real loopback sockets: each fails with a clear error and leaks nothing."""

from __future__ import annotations

import asyncio
import logging
from functools import partial

import pytest

from pqcnet import qstp
from pqcnet.identity import dev_identities
from pqcnet.qstp.aio import Server, Tunnel
from pqcnet.qstp.config import QstpConfiguration
from pqcnet.qstp.connection import Connection
from pqcnet.qstp.errors import HandshakeError, TunnelClosed
from pqcnet.qstp.tls import TlsPolicy, build_context, new_connection, verify_peer

from .qstputil import Mesh, make_mesh, running_server

pytestmark = pytest.mark.timeout(60)

FAST = QstpConfiguration(handshake_timeout=0.5)


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    return make_mesh()


async def _settled(server: Server) -> None:
    """Wait (bounded) until the server has released every tunnel."""
    for _ in range(200):
        if server.tunnels == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"server still holds {server.tunnels} tunnels")


async def _read_until_eof(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(1 << 20), 5)


async def _still_serves(server: Server, mesh: Mesh) -> None:
    tunnel = await qstp.connect("127.0.0.1", server.port, mesh.client)
    assert tunnel.peer.group == "X25519MLKEM768"
    await tunnel.close()


def _client_hello(mesh: Mesh) -> bytes:
    from OpenSSL import SSL

    conn = new_connection(build_context(mesh.client, TlsPolicy(), server=False), server=False)
    with pytest.raises(SSL.WantReadError):
        conn.do_handshake()
    return conn.bio_read(1 << 16)


async def test_garbage_instead_of_client_hello(mesh: Mesh) -> None:
    async with running_server(mesh, config=FAST) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 4)
        reply = await _read_until_eof(reader)
        assert b"HTTP" not in reply  # at most a TLS alert, then the server hung up
        writer.close()
        await _settled(server)
        assert server.handshake_failures == 1
        await _still_serves(server, mesh)


async def test_truncated_client_hello_then_eof(mesh: Mesh) -> None:
    hello = _client_hello(mesh)
    async with running_server(mesh, config=FAST) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(hello[: len(hello) // 2])
        writer.write_eof()
        assert await _read_until_eof(reader) == b""
        writer.close()
        await _settled(server)
        assert server.handshake_failures == 1
        await _still_serves(server, mesh)


async def test_truncated_record_mid_session_is_reported_to_the_handler(mesh: Mesh) -> None:
    """A sans-IO client over a raw socket cuts a DATA record short, then hangs up."""
    outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def handler(tunnel: Tunnel) -> None:
        async for stream in tunnel:
            try:
                await stream.read_all(1 << 20)
                outcome.set_result("complete")
            except TunnelClosed as exc:
                outcome.set_result(str(exc))

    async with running_server(mesh, handler) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        conn = Connection(new_connection(build_context(mesh.client, TlsPolicy(), server=False),
                                         server=False), client=True,
                          verify=partial(verify_peer, identity=mesh.client, policy=TlsPolicy()))
        loop = asyncio.get_running_loop()
        conn.start(loop.time())
        writer.write(conn.data_to_send())
        while conn.peer is None or conn.state.value != "open":
            conn.receive_data(await reader.read(65536), loop.time())
            writer.write(conn.data_to_send())
        sid = conn.open_stream()
        conn.send_data(sid, b"first record arrives whole")
        writer.write(conn.data_to_send())
        conn.send_data(sid, b"x" * 5000)
        record = conn.data_to_send()
        writer.write(record[:-7])  # the last record loses its tail (and its MAC)
        await writer.drain()
        writer.write_eof()
        reason = await asyncio.wait_for(outcome, 5)
        assert "truncated" in reason
        writer.close()
        await _settled(server)


async def test_peer_stalling_mid_handshake_times_out_on_the_server(mesh: Mesh) -> None:
    hello = _client_hello(mesh)
    async with running_server(mesh, config=FAST) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(hello)  # then never answer the server's flight
        loop = asyncio.get_running_loop()
        start = loop.time()
        data = b""
        while chunk := await asyncio.wait_for(reader.read(65536), 5):
            data += chunk
        assert data  # the server's flight arrived, then the server gave up on us
        assert loop.time() - start >= 0.4
        writer.close()
        await _settled(server)
        assert server.handshake_failures == 1


async def test_server_stalling_mid_handshake_times_out_in_connect(mesh: Mesh) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # read nothing, answer nothing

    stall = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = stall.sockets[0].getsockname()[1]
    try:
        with pytest.raises(HandshakeError, match=r"did not complete within 0\.5s"):
            await qstp.connect("127.0.0.1", port, mesh.client, config=FAST)
    finally:
        for w in accepted:
            w.close()
        stall.close()
        await stall.wait_closed()


async def test_unknown_ca_surfaces_through_connect(mesh: Mesh) -> None:
    _other_ca, (stranger,) = dev_identities("mesh.test", "spiffe://mesh.test/acme/publisher/x")
    async with running_server(mesh) as server:
        with pytest.raises(HandshakeError) as info:
            await qstp.connect("127.0.0.1", server.port, stranger)
        assert "unknown-ca" in str(info.value) or "peer-refused" in str(info.value)
        await _settled(server)
        assert server.handshake_failures == 1
        await _still_serves(server, mesh)


async def test_client_refuses_server_from_another_ca(mesh: Mesh) -> None:
    _other_ca, (impostor,) = dev_identities("mesh.test", "spiffe://mesh.test/acme/relayer/r1")
    other = Mesh(mesh.ca, mesh.client, impostor)
    async with running_server(other) as server:
        with pytest.raises(HandshakeError, match="unknown-ca"):
            await qstp.connect("127.0.0.1", server.port, mesh.client)
        await _settled(server)


async def test_spiffe_id_not_allowed_surfaces_through_connect(mesh: Mesh) -> None:
    only_sentries = TlsPolicy(allowed_peers=("spiffe://mesh.test/acme/sentry/*",))
    async with running_server(mesh, policy=only_sentries) as server:
        with pytest.raises(HandshakeError) as info:
            await qstp.connect("127.0.0.1", server.port, mesh.client)
        assert "bad certificate" in str(info.value)
        assert "certificate-refused" in str(info.value)
        await _settled(server)
        assert server.handshake_failures == 1


async def test_connection_refused_is_a_typed_error(mesh: Mesh) -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    with pytest.raises(TunnelClosed, match="cannot connect"):
        await qstp.connect("127.0.0.1", port, mesh.client)


async def test_a_local_refusal_is_logged_as_ours_and_the_peers_as_theirs(
        mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    """A strict server refuses a hybrid-only client: OpenSSL on the server decides
    ("no suitable key share"), so the server's log lines say by_peer false; the
    client was refused by an alert, so its line says by_peer true."""
    caplog.set_level(logging.INFO, logger="pqcnet.qstp")
    async with running_server(mesh, policy=TlsPolicy(groups="strict")) as server:
        with pytest.raises(HandshakeError, match="peer-refused"):
            await qstp.connect("127.0.0.1", server.port, mesh.client)
        await _settled(server)
        assert server.handshake_failures == 1
    closed = [r for r in caplog.records if r.getMessage() == "tunnel closed"]
    mine = [r for r in closed if "no suitable key share" in r.reason]  # type: ignore[attr-defined]
    theirs = [r for r in closed if "alert handshake failure" in r.reason]  # type: ignore[attr-defined]
    assert len(mine) == 1 and mine[0].by_peer is False  # type: ignore[attr-defined]
    assert len(theirs) == 1 and theirs[0].by_peer is True  # type: ignore[attr-defined]
    (refused,) = [r for r in caplog.records if r.getMessage() == "handshake refused"]
    assert refused.by_peer is False and "no-shared-group" in refused.reason  # type: ignore[attr-defined]
