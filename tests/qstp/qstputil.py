"""Shared QSTP fixtures: a real in-memory mesh CA, identities and loopback servers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from pqcnet import qstp
from pqcnet.identity import MeshCA, NodeIdentity, dev_identities
from pqcnet.qstp.aio import Server, Tunnel
from pqcnet.qstp.config import QstpConfiguration
from pqcnet.qstp.tls import TlsPolicy

CLIENT_ID = "spiffe://mesh.test/acme/publisher/c1"
SERVER_ID = "spiffe://mesh.test/acme/relayer/r1"


@dataclass
class Mesh:
    ca: MeshCA
    client: NodeIdentity
    server: NodeIdentity


def make_mesh() -> Mesh:
    ca, (client, server) = dev_identities("mesh.test", CLIENT_ID, SERVER_ID)
    return Mesh(ca, client, server)


async def echo_handler(tunnel: Tunnel) -> None:
    """Echo every stream back, chunk by chunk, then end it."""
    tasks: set[asyncio.Task[None]] = set()

    async def one(stream: qstp.Stream) -> None:
        async for chunk in stream:
            await stream.send(chunk)
        await stream.close()

    async for stream in tunnel:
        task = asyncio.create_task(one(stream))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks, return_exceptions=True)


@asynccontextmanager
async def running_server(
    mesh: Mesh,
    handler: Callable[[Tunnel], Awaitable[None]] = echo_handler,
    *,
    policy: TlsPolicy | None = None,
    config: QstpConfiguration | None = None,
) -> AsyncIterator[Server]:
    server = await qstp.serve(handler, "127.0.0.1", 0, mesh.server, policy, config=config)
    try:
        yield server
    finally:
        server.close()
        await server.wait_closed()
