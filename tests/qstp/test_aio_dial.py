"""Dialling (``qstp.connect``): a numeric address takes the fast path (SYN first, the
ClientHello produced while the TCP handshake and the server's accept run), a name goes
through asyncio's resolver; both end in the same tunnel, and a refused connect is a
typed error that leaves no socket behind."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from pqcnet import qstp
from pqcnet.qstp.aio import Tunnel
from pqcnet.qstp.errors import TunnelClosed

from .qstputil import SERVER_ID, Mesh, make_mesh


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    return make_mesh()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _closed_port(family: socket.AddressFamily, host: str) -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(("listen", "dial"), [("127.0.0.1", "127.0.0.1"), ("::1", "::1"),
                                              ("127.0.0.1", "localhost")],
                         ids=["ipv4", "ipv6", "name"])
async def test_every_address_form_ends_in_the_same_tunnel(mesh: Mesh, listen: str,
                                                          dial: str) -> None:
    async def handler(tunnel: Tunnel) -> None:
        async for stream in tunnel:
            await stream.send(await stream.recv(), end=True)

    server = await qstp.serve(handler, listen, 0, mesh.server)
    try:
        tunnel = await qstp.connect(dial, server.port, mesh.client)
        assert str(tunnel.peer.spiffe_id) == SERVER_ID
        assert tunnel.peer.group == "X25519MLKEM768"
        stream = tunnel.open_stream()
        await stream.send(b"over " + dial.encode())
        assert await stream.recv() == b"over " + dial.encode()
        await tunnel.close()
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(("family", "host"), [(socket.AF_INET, "127.0.0.1"),
                                              (socket.AF_INET6, "::1")], ids=["ipv4", "ipv6"])
async def test_a_refused_connect_is_typed_and_leaks_no_socket(mesh: Mesh,
                                                             family: socket.AddressFamily,
                                                             host: str) -> None:
    port = _closed_port(family, host)
    before = _open_fds()
    for _ in range(20):
        with pytest.raises(TunnelClosed, match=rf"cannot connect to {host}:{port}"):
            await qstp.connect(host, port, mesh.client)
    assert _open_fds() <= before


def test_the_fast_path_on_uvloop(mesh: Mesh) -> None:
    """The relayer, sentry and sidecar run on uvloop when installed (the ``fast`` extra):
    its ``sock_connect`` and ``create_connection(sock=…)`` behave the same here."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        await test_every_address_form_ends_in_the_same_tunnel(mesh, "::1", "::1")
        await test_every_address_form_ends_in_the_same_tunnel(mesh, "127.0.0.1", "127.0.0.1")
        await test_a_refused_connect_is_typed_and_leaks_no_socket(mesh, socket.AF_INET,
                                                                  "127.0.0.1")

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
