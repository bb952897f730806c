"""``Server.rotate_identity``: the one path for "GOAWAY every tunnel and present a new
certificate" (a forced rekey on a relayer or a governance endpoint), over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import pytest

from pqcnet import qstp
from pqcnet.crypto.pqc import SigningKey
from pqcnet.qstp.aio import Tunnel
from pqcnet.qstp.errors import HandshakeError, TunnelClosed

from .qstputil import SERVER_ID, echo_handler, make_mesh, running_server

pytestmark = pytest.mark.timeout(60)


async def test_old_tunnels_get_goaway_and_new_ones_the_new_certificate() -> None:
    mesh = make_mesh()
    rotated = mesh.ca.issue(SERVER_ID, key=SigningKey.generate())
    async with running_server(mesh) as server:
        port = server.port
        old = await qstp.connect("127.0.0.1", port, mesh.client)
        assert old.peer.cert_serial == mesh.server.serial
        stream = old.open_stream()
        await stream.send(b"before")
        assert await stream.recv() == b"before"

        await server.rotate_identity(rotated, reason="forced rekey")

        assert server.port == port and server.identity is rotated
        async with asyncio.timeout(10):
            await old.wait_closed()
        assert old.goaway is not None and old.goaway.reason == "forced rekey"
        assert old.close_reason is not None and old.close_reason.by_peer
        with pytest.raises(TunnelClosed):
            await stream.recv()
        new = await qstp.connect("127.0.0.1", port, mesh.client)
        assert new.peer.cert_serial == rotated.serial != mesh.server.serial
        s2 = new.open_stream()
        await s2.send(b"after")
        assert await s2.recv() == b"after"
        await new.close()


async def test_the_port_accepts_during_the_rotation() -> None:
    """While the old tunnels' handlers are still winding down, a new client connects
    to the same port and already meets the new certificate."""
    mesh = make_mesh()
    rotated = mesh.ca.issue(SERVER_ID, key=SigningKey.generate())
    winding_down = asyncio.Event()
    release = asyncio.Event()

    async def slow_to_stop(tunnel: Tunnel) -> None:
        try:
            await tunnel.wait_closed()
        except asyncio.CancelledError:
            winding_down.set()
            await release.wait()  # cleanup that takes a while
            raise

    async with running_server(mesh, slow_to_stop) as server:
        old = await qstp.connect("127.0.0.1", server.port, mesh.client)
        rotation = asyncio.create_task(server.rotate_identity(rotated))
        async with asyncio.timeout(10):
            await winding_down.wait()
        assert not rotation.done()
        meanwhile = await qstp.connect("127.0.0.1", server.port, mesh.client)
        assert meanwhile.peer.cert_serial == rotated.serial
        release.set()
        async with asyncio.timeout(10):
            await rotation
            await old.wait_closed()
        assert not meanwhile.closed  # made under the new identity: not ended
        await meanwhile.close()


async def test_an_unusable_identity_changes_nothing() -> None:
    mesh = make_mesh()
    broken = dataclasses.replace(mesh.server, key=SigningKey.generate())  # key != cert
    async with running_server(mesh, echo_handler) as server:
        tunnel = await qstp.connect("127.0.0.1", server.port, mesh.client)
        with pytest.raises(HandshakeError, match="cannot load identity"):
            await server.rotate_identity(broken)
        assert server.identity is mesh.server and not tunnel.closed
        stream = tunnel.open_stream()
        await stream.send(b"still here")
        assert await stream.recv() == b"still here"
        again = await qstp.connect("127.0.0.1", server.port, mesh.client)
        assert again.peer.cert_serial == mesh.server.serial
        for t in (tunnel, again):
            with contextlib.suppress(TunnelClosed):
                await t.close()
