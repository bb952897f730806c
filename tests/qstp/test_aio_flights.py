"""Each handshake flight leaves in one socket write, on both sides, over real sockets.

A full mutual handshake is four flights (ClientHello; the server's hello through
Finished; the client's certificate through Finished; the server's session ticket and
QSTP preface). A flight split over several writes costs the peer extra wake-ups on a
busy host (``benchmarks/README.md``, "qstp — issue 15 follow-up"); these tests pin
one write per flight.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

import pytest

from pqcnet.qstp.aio import Tunnel
from pqcnet.qstp.aio.client import client_context
from pqcnet.qstp.connection import Connection
from pqcnet.qstp.tls import TlsPolicy, build_context, new_connection, verify_peer

from .qstputil import Mesh, make_mesh

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    return make_mesh()


class _CountingTransport:
    """The real transport, with the size of every write recorded."""

    def __init__(self, real: Any, writes: list[int]) -> None:
        self._real = real
        self._writes = writes

    def write(self, data: bytes) -> None:
        self._writes.append(len(data))
        self._real.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class _CountingTunnel(Tunnel):
    def __init__(self, conn: Connection) -> None:
        super().__init__(conn)
        self.writes: list[int] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        counting: Any = _CountingTransport(transport, self.writes)
        super().connection_made(counting)


def _tunnel(mesh: Mesh, *, server: bool) -> _CountingTunnel:
    policy = TlsPolicy()
    ident = mesh.server if server else mesh.client
    ctx = (build_context(ident, policy, server=True) if server
           else client_context(ident, policy))
    tls = new_connection(ctx, server=server)
    return _CountingTunnel(Connection(tls, client=not server,
                                      verify=partial(verify_peer, identity=ident,
                                                     policy=policy)))


async def test_every_handshake_flight_is_one_write_on_both_sides(mesh: Mesh) -> None:
    loop = asyncio.get_running_loop()
    accepted: list[_CountingTunnel] = []

    def factory() -> _CountingTunnel:
        tunnel = _tunnel(mesh, server=True)
        accepted.append(tunnel)
        return tunnel

    listener = await loop.create_server(factory, "127.0.0.1", 0)
    try:
        port = listener.sockets[0].getsockname()[1]
        client = _tunnel(mesh, server=False)
        await loop.create_connection(lambda: client, "127.0.0.1", port)
        peer = await asyncio.wait_for(client._ready, 30)
        assert peer.group == "X25519MLKEM768" and not peer.resumed
        (server,) = accepted
        await asyncio.wait_for(server._ready, 30)
        # client: ClientHello, then certificate + CertificateVerify + Finished
        assert len(client.writes) == 2, client.writes
        assert client.writes[0] > 1000  # the hybrid key share: one ClientHello record
        assert client.writes[1] > 1000  # carries the ML-DSA certificate
        # server: hello .. Finished, then the session ticket with the preface ACK
        assert len(server.writes) == 2, server.writes
        assert server.writes[0] > 1000
        await client.close()
        await server.wait_closed()
    finally:
        listener.close()
        await listener.wait_closed()
