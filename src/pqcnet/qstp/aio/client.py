"""Dialling a QSTP tunnel: :func:`connect` and the client TLS context cache."""

from __future__ import annotations

import asyncio
import collections
import logging
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
            await loop.create_connection(lambda: tunnel, host, port)
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


__all__ = ["CONTEXT_CACHE_SIZE", "client_context", "connect"]
