"""TCP over QSTP: carry a byte protocol (gRPC's HTTP/2 here) inside a post-quantum tunnel.

Why this exists: grpcio bundles BoringSSL, which can load neither ML-DSA certificates
nor the ML-KEM groups, so a gRPC server cannot present the mesh identity itself. The
governance (``VolumeMetrics``) and ``Ledger`` services therefore listen in plaintext on
loopback, and this module carries their bytes between hosts inside QSTP, the way
``ssh -L`` carries a port: **one QSTP stream per TCP connection**, bytes copied both
ways, half-close propagated, backpressure kept (a QSTP ``send`` waits for credit, a TCP
``drain`` waits for the socket).

* Server side — :func:`serve_forward`: a QSTP listener whose every accepted stream is
  joined to a new TCP connection to ``target``. Who may connect is the listener's
  :class:`~pqcnet.qstp.tls.TlsPolicy` (``allowed_peers``), checked at the handshake.
* Client side — :class:`LocalForward`: a TCP listener on ``127.0.0.1:0`` whose every
  accepted connection becomes a new stream of one QSTP tunnel; point a gRPC channel at
  :attr:`LocalForward.address`.

Any failure on one connection resets that stream and closes that socket only; the
tunnel and the other connections carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

from pqcnet.identity.node import NodeIdentity
from pqcnet.qstp.aio.server import Server, serve
from pqcnet.qstp.aio.stream import Stream
from pqcnet.qstp.aio.tunnel import Tunnel
from pqcnet.qstp.config import QstpConfiguration
from pqcnet.qstp.frames import ErrorCode
from pqcnet.qstp.tls import TlsPolicy

log = logging.getLogger(__name__)

#: bytes read from a TCP socket per QSTP send (the stream window bounds what is in flight)
CHUNK = 64 * 1024
#: TCP connections one tunnel may carry at once (each holds a socket and two tasks)
MAX_CONNECTIONS = 64
#: seconds to open the TCP connection to the target before resetting the stream
CONNECT_TIMEOUT = 5.0


async def _tcp_to_stream(reader: asyncio.StreamReader, stream: Stream) -> None:
    while data := await reader.read(CHUNK):
        await stream.send(data)
    await stream.close()


async def _stream_to_tcp(stream: Stream, writer: asyncio.StreamWriter) -> None:
    async for chunk in stream:
        writer.write(chunk)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


async def splice(stream: Stream, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
    """Copy both ways until both directions ended; on any error reset and close both."""
    try:
        await asyncio.gather(_tcp_to_stream(reader, stream), _stream_to_tcp(stream, writer))
    except asyncio.CancelledError:
        stream.reset(ErrorCode.CANCELLED, "forward cancelled")
        raise
    except Exception as exc:  # one connection failing must not take the tunnel down
        log.debug("forwarded connection ended: %s", exc)
        stream.reset(ErrorCode.STREAM_ERROR, "forwarded connection failed")
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


class _Slots:
    """Counts connections per tunnel against :data:`MAX_CONNECTIONS`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.tasks: set[asyncio.Task[None]] = set()

    def full(self) -> bool:
        return len(self.tasks) >= self.limit

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def cancel(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def serve_forward(target_host: str, target_port: int, host: str, port: int,
                        identity: NodeIdentity, policy: TlsPolicy | None = None, *,
                        config: QstpConfiguration | None = None,
                        max_connections: int = MAX_CONNECTIONS) -> Server:
    """Listen for QSTP tunnels on ``host:port``; join each stream to ``target``."""

    async def one(stream: Stream) -> None:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                reader, writer = await asyncio.open_connection(target_host, target_port)
        except (OSError, TimeoutError) as exc:
            log.warning("forward target %s:%d unreachable: %s", target_host, target_port, exc)
            stream.reset(ErrorCode.STREAM_ERROR, "forward target unreachable")
            return
        await splice(stream, reader, writer)

    async def handler(tunnel: Tunnel) -> None:
        slots = _Slots(max_connections)
        try:
            async for stream in tunnel:
                if slots.full():
                    stream.reset(ErrorCode.STREAM_LIMIT, "too many forwarded connections")
                    continue
                slots.spawn(one(stream))
        finally:
            await slots.cancel()

    return await serve(handler, host, port, identity, policy, config=config)


class LocalForward:
    """``async with LocalForward(tunnel) as fwd:`` then connect to ``fwd.address``."""

    def __init__(self, tunnel: Tunnel, *, host: str = "127.0.0.1",
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.tunnel = tunnel
        self.host = host
        self._slots = _Slots(max_connections)
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        """``host:port`` of the local listener (valid inside ``async with``)."""
        if self._server is None:
            raise RuntimeError("LocalForward is not started")
        port = self._server.sockets[0].getsockname()[1]
        return f"{self.host}:{port}"

    async def _accepted(self, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        if self._slots.full() or self.tunnel.closed:
            writer.close()
            return
        self._slots.spawn(splice(self.tunnel.open_stream(), reader, writer))

    async def __aenter__(self) -> LocalForward:
        self._server = await asyncio.start_server(self._accepted, self.host, 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await self._slots.cancel()


__all__ = [
    "CHUNK",
    "CONNECT_TIMEOUT",
    "MAX_CONNECTIONS",
    "LocalForward",
    "serve_forward",
    "splice",
]
