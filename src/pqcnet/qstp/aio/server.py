"""Listening for QSTP tunnels: :func:`serve`, the :class:`Server` it returns, and
:meth:`Server.rotate_identity` (the one GOAWAY-and-re-present path a forced rekey uses)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from functools import partial

from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric

from pqcnet.identity import NodeIdentity
from pqcnet.qstp.aio.tunnel import Tunnel, openssl_checked
from pqcnet.qstp.config import QstpConfiguration
from pqcnet.qstp.connection import Connection
from pqcnet.qstp.errors import HandshakeError, TunnelClosed
from pqcnet.qstp.frames import ErrorCode
from pqcnet.qstp.tls import PeerInfo, TlsPolicy, build_context, new_connection, verify_peer

log = logging.getLogger(__name__)

#: Tunnels one :func:`serve` keeps at once; beyond it new TCP connections are
#: closed immediately (bounds memory and handshake CPU a connection flood can take).
DEFAULT_MAX_TUNNELS = 1024

Handler = Callable[[Tunnel], Awaitable[None]]
"""Runs once per verified tunnel; the tunnel is closed when it returns."""


class Server:
    """A listening QSTP endpoint returned by :func:`serve`."""

    def __init__(self, handler: Handler, identity: NodeIdentity, policy: TlsPolicy,
                 config: QstpConfiguration, max_tunnels: int) -> None:
        self._handler = handler
        self._config = config
        self._max_tunnels = max_tunnels
        self._identity = identity
        self._policy = policy
        self._tls_context = build_context(identity, policy, server=True)
        self._verify = partial(verify_peer, identity=identity, policy=policy)
        self._tunnels: set[Tunnel] = set()
        self._tasks: dict[Tunnel, asyncio.Task[None]] = {}
        self._server: asyncio.Server | None = None
        self._also: list[asyncio.Server] = []  # further listening sockets (listen_also)
        self.handshake_failures = 0
        """Handshakes refused or timed out since start."""
        self.refused_by_peer = 0
        """Of :attr:`handshake_failures`, those the peer ended (an alert: it did not
        accept our certificate, our group or our SPIFFE ID)."""
        self.refused_at_limit = 0
        """TCP connections closed unanswered because ``max_tunnels`` were connected."""

    @property
    def port(self) -> int:
        """The bound TCP port (useful with ``port=0``)."""
        assert self._server is not None and self._server.sockets
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def tunnels(self) -> int:
        """Tunnels currently connected (handshaking or open)."""
        return len(self._tunnels)

    @property
    def identity(self) -> NodeIdentity:
        """The identity new tunnels are offered (see :meth:`rotate_identity`)."""
        return self._identity

    async def rotate_identity(self, identity: NodeIdentity, policy: TlsPolicy | None = None,
                              *, reason: str = "identity rotated") -> None:
        """Present ``identity`` (and ``policy``, if given) from now on, and end every
        tunnel made under the old one: GOAWAY + close_notify with ``reason``, handlers
        cancelled, as :meth:`close` does, so peers reconnect and meet the new certificate.

        The listening socket stays bound: the port does not change and no connection
        is refused meanwhile (the next handshake already uses the new context). The
        context is built first; if that fails nothing changes and the error propagates
        (the old identity keeps serving). Returns once the old tunnels are gone, each
        bounded by ``config.close_timeout``.
        """
        policy = policy or self._policy
        context = build_context(identity, policy, server=True)
        self._identity, self._policy, self._tls_context = identity, policy, context
        self._verify = partial(verify_peer, identity=identity, policy=policy)
        old = list(self._tunnels)
        self._end(old, reason)
        await self._ended(old)
        log.info("server identity rotated", extra={
            "identity": str(identity.spiffe_id), "serial": identity.serial,
            "tunnels_ended": len(old)})

    def update_identity(self, identity: NodeIdentity) -> None:
        """Use ``identity`` (same certificate, newer CRL or trust bundle) for new
        handshakes only; open tunnels stay (see :meth:`end_tunnels` for the revoked)."""
        context = build_context(identity, self._policy, server=True)
        self._identity, self._tls_context = identity, context
        self._verify = partial(verify_peer, identity=identity, policy=self._policy)

    def open_tunnels(self) -> list[Tunnel]:
        """The tunnels connected now (e.g. to end later those made before a renewal)."""
        return list(self._tunnels)

    async def end_tunnels(self, should_end: Callable[[PeerInfo], str | None], *,
                          among: list[Tunnel] | None = None, grace_s: float = 0.0) -> int:
        """End (GOAWAY with the returned reason) every open tunnel (of ``among``, if
        given) whose verified peer ``should_end`` names a reason for, e.g. "peer
        certificate revoked"; returns how many were ended. With ``grace_s`` the GOAWAY
        goes out first and handlers get that long to finish the streams already open
        (no new ones are accepted) before the tunnels are closed."""
        chosen: dict[str, list[Tunnel]] = {}
        for tunnel in list(self._tunnels if among is None else among):
            if tunnel not in self._tunnels:
                continue
            try:
                peer = tunnel.peer
            except TunnelClosed:
                continue  # still handshaking or already gone
            reason = should_end(peer)
            if reason:
                chosen.setdefault(reason, []).append(tunnel)
        if grace_s > 0 and chosen:
            for reason, tunnels in chosen.items():
                for tunnel in tunnels:
                    tunnel.send_goaway(reason)
            tasks = [t for t in (self._tasks.get(x) for ts in chosen.values() for x in ts)
                     if t is not None]
            if tasks:
                await asyncio.wait(tasks, timeout=grace_s)
        for reason, tunnels in chosen.items():
            self._end(tunnels, reason)
            log.info("tunnels ended", extra={"reason": reason, "tunnels": len(tunnels)})
        ended = [t for ts in chosen.values() for t in ts]
        await self._ended(ended)
        return len(ended)

    async def listen_also(self, host: str, port: int) -> int:
        """Accept tunnels on one more address too (same handler, identity, policy and
        tunnel limit); returns its bound port. ``relayer run --workers N``: each worker
        has its own port beside the shared SO_REUSEPORT one."""
        extra = await asyncio.get_running_loop().create_server(self._new_tunnel, host, port)
        self._also.append(extra)
        bound: int = extra.sockets[0].getsockname()[1]
        return bound

    def close(self) -> None:
        """Stop listening, end every tunnel (GOAWAY) and cancel running handlers."""
        if self._server is not None:
            self._server.close()
        for extra in self._also:
            extra.close()
        self._end(list(self._tunnels), "server shutting down")

    async def wait_closed(self) -> None:
        """Wait for handlers and sockets to finish after :meth:`close`."""
        await self._ended(list(self._tunnels))
        if self._server is not None:
            await self._server.wait_closed()
        for extra in self._also:
            await extra.wait_closed()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()

    # ------------------------------------------------------------------ internals

    def _new_tunnel(self) -> asyncio.Protocol:
        if len(self._tunnels) >= self._max_tunnels:
            self.refused_at_limit += 1
            log.warning("tunnel limit reached; refusing connection",
                        extra={"max_tunnels": self._max_tunnels})
            return _Refuse()
        tls = new_connection(self._tls_context, server=True)
        conn = Connection(tls, client=False, config=self._config, verify=self._verify)
        tunnel = Tunnel(conn, on_lost=self._tunnels.discard)
        self._tunnels.add(tunnel)
        task = asyncio.get_running_loop().create_task(self._run(tunnel))
        self._tasks[tunnel] = task
        task.add_done_callback(lambda _task: self._tasks.pop(tunnel, None))
        return tunnel

    def _end(self, tunnels: list[Tunnel], reason: str) -> None:
        """Cancel the handlers of ``tunnels`` and send each GOAWAY + close_notify now."""
        for tunnel in tunnels:
            task = self._tasks.get(tunnel)
            if task is not None:
                task.cancel()
        for tunnel in tunnels:
            tunnel._end_now(ErrorCode.NO_ERROR, reason)

    async def _ended(self, tunnels: list[Tunnel]) -> None:
        """Wait until the handlers of ``tunnels`` returned and their sockets are gone."""
        tasks = [t for t in (self._tasks.get(tunnel) for tunnel in tunnels) if t is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if tunnels:  # each bounded by config.close_timeout
            await asyncio.gather(*(tunnel.close() for tunnel in tunnels))

    async def _run(self, tunnel: Tunnel) -> None:
        try:
            await tunnel._ready
        except HandshakeError as exc:
            self.handshake_failures += 1
            by_peer = tunnel.close_reason is not None and tunnel.close_reason.by_peer
            self.refused_by_peer += by_peer
            log.info("handshake refused", extra={"reason": str(exc), "by_peer": by_peer})
            await tunnel.close()
            return
        try:
            await self._handler(tunnel)
        except (TunnelClosed, HandshakeError) as exc:
            log.info("tunnel handler ended", extra={"reason": str(exc)})
        except asyncio.CancelledError:
            await tunnel.close(ErrorCode.CANCELLED, "server shutting down")
            raise
        except Exception as exc:
            log.exception("tunnel handler failed", extra={"peer": str(tunnel.peer.spiffe_id)})
            await tunnel.close(ErrorCode.INTERNAL_ERROR, f"handler failed: {type(exc).__name__}")
            return
        await tunnel.close()


def server_metrics(server: Server | None, role: str) -> Iterator[Metric]:
    """``pqcnet_{role}_handshake_failures_total{refused_by}`` and
    ``pqcnet_{role}_tunnels_refused_at_limit_total`` from ``server``'s counters, read
    at scrape time (zeros while it does not listen). ``refused_by="peer"``: the peer
    ended the handshake (it does not accept *our* certificate — expired, revoked, from a
    CA it does not trust — group or SPIFFE ID); ``"local"``: we refused the peer's, or
    the handshake timed out or was garbage. A rise of the first after a rotation is
    this node's identity going bad; of the second, a peer's (or a scan)."""
    failed = server.handshake_failures if server is not None else 0
    by_peer = server.refused_by_peer if server is not None else 0
    fails = CounterMetricFamily(
        f"pqcnet_{role}_handshake_failures",
        "QSTP handshakes that failed, by who refused (peer: it refused ours; local: we "
        "refused it, or a timeout)", labels=["refused_by"])
    fails.add_metric(["peer"], by_peer)
    fails.add_metric(["local"], failed - by_peer)
    yield fails
    yield CounterMetricFamily(
        f"pqcnet_{role}_tunnels_refused_at_limit",
        "TCP connections closed unanswered because max_tunnels tunnels were connected",
        value=server.refused_at_limit if server is not None else 0)


class _Refuse(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


async def serve(
    handler: Handler,
    host: str,
    port: int,
    identity: NodeIdentity,
    policy: TlsPolicy | None = None,
    *,
    config: QstpConfiguration | None = None,
    max_tunnels: int = DEFAULT_MAX_TUNNELS,
    backlog: int = 128,
    reuse_port: bool = False,
) -> Server:
    """Listen for QSTP tunnels; ``await handler(tunnel)`` runs per verified tunnel,
    and the tunnel is closed when the handler returns. ``reuse_port`` sets SO_REUSEPORT
    so several processes share the port (the kernel spreads connections over them)."""
    await openssl_checked()
    server = Server(handler, identity, policy or TlsPolicy(), config or QstpConfiguration(),
                    max_tunnels)
    loop = asyncio.get_running_loop()
    server._server = await loop.create_server(server._new_tunnel, host, port, backlog=backlog,
                                              reuse_port=reuse_port or None)
    return server


__all__ = ["DEFAULT_MAX_TUNNELS", "Handler", "Server", "serve"]
