"""asyncio adapter for QSTP: the only package that touches the event loop and sockets.

It drives a sans-IO :class:`pqcnet.qstp.connection.Connection` from an ``asyncio.Protocol``
(TCP_NODELAY on) and dispatches its events to :class:`Tunnel` and :class:`Stream`.
The whole API other packages use::

    tunnel = await qstp.connect(host, port, identity, policy)      # -> Tunnel
    server = await qstp.serve(handler, host, port, identity, policy)  # handler(tunnel)
    server.port; server.close(); await server.wait_closed()

    stream = tunnel.open_stream()          # sync; the peer sees it with the first send
    await stream.send(data, end=False)     # waits for credit (backpressure) and PAUSE
    data = await stream.recv()             # b"" at end of stream (a byte stream: chunks
                                           # need not match send() calls)
    async for chunk in stream: ...         # same, until end
    body = await stream.read_all(limit)    # everything until end (TunnelClosed if > limit)
    await stream.close()                   # half-close (END_STREAM)
    stream.reset(code, reason)             # abort this stream only (ERROR frame)
    await stream.wait_failed()             # until reset / tunnel end (also after the peer's END)

    async for stream in tunnel: ...        # streams the peer opens, until the tunnel ends
    await tunnel.accept_stream()           # the same, one at a time (None once ended)
    tunnel.peer                            # qstp.tls.PeerInfo (spiffe_id, group, resumed, ...)
    tunnel.resumed; tunnel.session         # TLS 1.3 ticket -> connect(..., session=...)
    tunnel.pause(stream_id=None, reason=0, retry_after=0.0); tunnel.resume(stream_id=None)
    tunnel.on_flow = callback              # FlowPaused / FlowResumed from the peer
    await tunnel.wait_resumed(stream_id=None)   # honour a peer's PAUSE explicitly
    tunnel.channel_binding(); tunnel.export_keying_material(label, n)
    await tunnel.ping() -> rtt; tunnel.rekey(); await tunnel.close(); await tunnel.wait_closed()
    tunnel.on_key_update; tunnel.key_updates; tunnel.close_reason; tunnel.goaway
    server.tunnels; server.handshake_failures; server.identity
    server_metrics(server, role)           # its counters as pqcnet_{role}_... metrics
    await server.rotate_identity(identity)  # same port; old tunnels get GOAWAY, new ones
                                           # handshake with the new certificate

Backpressure: a receiver returns credit only when the application ``recv()``s, so
a slow reader makes its sender's ``send()`` wait; nothing buffers beyond the windows
in :class:`~pqcnet.qstp.config.QstpConfiguration`. ``send()`` also waits while the peer
has paused the stream or the whole tunnel (until RESUME, or ``retry_after`` if the
peer gave one). Every pending future fails with
:class:`~pqcnet.qstp.errors.TunnelClosed` when the tunnel ends; handshake failures raise
:class:`~pqcnet.qstp.errors.HandshakeError` from :func:`connect`.

The package is split by seam, like aioquic's ``asyncio`` package: :mod:`.tunnel` is the
``asyncio.Protocol`` that feeds the sans-IO core and dispatches its events,
:mod:`.stream` the per-stream reader/writer, :mod:`.client` dialling (and the client
context cache), :mod:`.server` listening (limits, handler tasks, identity rotation).
"""

from __future__ import annotations

from pqcnet.qstp.aio.client import client_context, connect
from pqcnet.qstp.aio.server import DEFAULT_MAX_TUNNELS, Handler, Server, serve, server_metrics
from pqcnet.qstp.aio.stream import Stream
from pqcnet.qstp.aio.tunnel import CLOSE_TIMEOUT, Tunnel

__all__ = [
    "CLOSE_TIMEOUT",
    "DEFAULT_MAX_TUNNELS",
    "Handler",
    "Server",
    "Stream",
    "Tunnel",
    "client_context",
    "connect",
    "serve",
    "server_metrics",
]
