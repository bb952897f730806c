"""``Tunnel.close()`` against a peer that never reads: bounded by ``close_timeout``.

The server's handler stops reading its socket (``pause_reading`` on the real
transport) and both kernel buffers are kept small, so the client's unsent bytes
stay in asyncio's write buffer and a plain ``transport.close()`` would wait for
them forever. The close must still return, fail the pending send, and leave
nothing behind.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from pqcnet import qstp
from pqcnet.qstp.aio import Tunnel
from pqcnet.qstp.config import INITIAL_WINDOW, QstpConfiguration
from pqcnet.qstp.errors import TunnelClosed

from .qstputil import Mesh, make_mesh, running_server

pytestmark = pytest.mark.timeout(60)

SMALL_BUFFER = 4096


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    return make_mesh()


async def test_close_aborts_when_the_peer_never_reads(mesh: Mesh) -> None:
    stop_reading = asyncio.Event()
    release = asyncio.Event()

    async def deaf(tunnel: Tunnel) -> None:
        transport = tunnel._transport
        assert transport is not None
        transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
        transport.pause_reading()  # the peer is alive but never reads again
        stop_reading.set()
        await release.wait()

    async with running_server(mesh, deaf) as server:
        config = QstpConfiguration(close_timeout=0.5)
        tunnel = await qstp.connect("127.0.0.1", server.port, mesh.client, config=config)
        assert tunnel._transport is not None
        tunnel._transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
        await asyncio.wait_for(stop_reading.wait(), 10)
        # the deaf peer never grants more than each stream's initial 64 KiB, so
        # fill the 4 MiB connection window through many streams
        chunk = b"x" * INITIAL_WINDOW
        sends = [asyncio.create_task(tunnel.open_stream().send(chunk + chunk))
                 for _ in range(48)]
        async with asyncio.timeout(10):
            # asyncio has no event for "over the high-water mark": poll the flag
            while not tunnel._write_paused:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        stuck = tunnel._transport.get_write_buffer_size()
        assert stuck > 0
        async with asyncio.timeout(10):  # without the abort this would wait forever
            await tunnel.close()
        assert tunnel.closed and tunnel._transport is None
        results = await asyncio.gather(*sends, return_exceptions=True)
        assert results and all(isinstance(r, TunnelClosed) for r in results)
        with pytest.raises(TunnelClosed):
            tunnel.open_stream()
        release.set()


def test_close_timeout_is_validated() -> None:
    with pytest.raises(ValueError, match="close_timeout"):
        QstpConfiguration(close_timeout=0)
