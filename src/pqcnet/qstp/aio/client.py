"""Dialling a QSTP tunnel: :func:`connect` and the client TLS context cache."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import ipaddress
import logging
import socket
from functools import partial

from OpenSSL import SSL

from pqcnet.identity import NodeIdentity
from pqcnet.qstp.aio.tunnel import Tunnel, openssl_checked
from pqcnet.qstp.config import QstpConfiguration
from pqcnet.qstp.connection import Connection
from pqcnet.qstp.errors import HandshakeError, TunnelClosed
from pqcnet.qstp.frames import ErrorCode
from pqcnet.qstp.tls import TlsPolicy, build_context, new_connection, verify_peer

log = logging.getLogger(__name__)

#: Client contexts kept for reuse (building one parses keys and certificates).
CONTEXT_CACHE_SIZE = 16

_contexts: collections.OrderedDict[tuple[int, TlsPolicy], tuple[NodeIdentity, SSL.Context]] = (
    collections.OrderedDict()
)


def client_context(identity: NodeIdentity, policy: TlsPolicy) -> SSL.Context:
    """A cached client context for (identity, policy): building one parses keys and
    certificates, and a resumed session must be offered on the context that made it."""
    key = (id(identity), policy)
    hit = _contexts.get(key)
    if hit is not None and hit[0] is identity:
        _contexts.move_to_end(key)
        return hit[1]
    ctx = build_context(identity, policy, server=False)
    _contexts[key] = (identity, ctx)  # a strong ref: the id cannot be reused meanwhile
    while len(_contexts) > CONTEXT_CACHE_SIZE:
        _contexts.popitem(last=False)
    return ctx


async def connect(
    host: str,
    port: int,
    identity: NodeIdentity,
    policy: TlsPolicy | None = None,
    *,
    config: QstpConfiguration | None = None,
    session: SSL.Session | None = None,
    context: SSL.Context | None = None,
) -> Tunnel:
    """Open a QSTP tunnel; returns once the server accepted us (mutual auth done).

    Raises :class:`HandshakeError` (refused, timed out) or :class:`TunnelClosed`
    (TCP connect failed).
    """
    policy = policy or TlsPolicy()
    config = config or QstpConfiguration()
    await openssl_checked()
    ctx = context or client_context(identity, policy)
    tls = new_connection(ctx, server=False, session=session)
    conn = Connection(tls, client=True, config=config,
                      verify=partial(verify_peer, identity=identity, policy=policy))
    loop = asyncio.get_running_loop()
    tunnel = Tunnel(conn)
    try:
        async with asyncio.timeout(config.handshake_timeout):
            await _dial(loop, tunnel, conn, host, port)
    except TimeoutError:
        raise HandshakeError(f"TCP connect to {host}:{port} timed out") from None
    except OSError as exc:
        raise TunnelClosed(f"cannot connect to {host}:{port}: "
                           f"{exc.strerror or exc}") from None
    try:
        await tunnel._ready
    except asyncio.CancelledError:
        await tunnel.close(ErrorCode.CANCELLED, "connect cancelled")
        raise
    except HandshakeError:
        await tunnel.close(ErrorCode.HANDSHAKE_FAILED, "handshake failed")
        raise
    log.info("tunnel up", extra={"peer": str(tunnel.peer.spiffe_id),
                                 "group": tunnel.peer.group, "resumed": tunnel.resumed})
    return tunnel


async def _dial(loop: asyncio.AbstractEventLoop, tunnel: Tunnel, conn: Connection,
                host: str, port: int) -> None:
    """TCP connect, with ``tunnel`` as the protocol.

    For a numeric address the SYN goes out first and the ClientHello (ML-KEM and X25519
    key generation) is produced while the TCP handshake completes and the server runs
    its accept path, on the other core; only then does the socket become the tunnel's
    transport. Names go through asyncio's resolver and ``create_connection`` as usual.
    """
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        await loop.create_connection(lambda: tunnel, host, port)
        return
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            sock.connect((host, port))
        conn.start(loop.time())
        try:
            await loop.sock_connect(sock, (host, port))
        except OSError as exc:
            if exc.errno != errno.EISCONN:  # already connected is what we want
                raise
        await loop.create_connection(lambda: tunnel, sock=sock)
    except BaseException:
        sock.close()
        raise


__all__ = ["CONTEXT_CACHE_SIZE", "client_context", "connect"]
