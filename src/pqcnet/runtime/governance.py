"""Governance directives applied by real components (composition root).

The control plane (:mod:`mesh`) verifies a directive, anchors it in the QS-DAG and
only then calls every registered :class:`~pqcnet.mesh.directives.DirectiveHandler`. This
module is where those calls turn into effects on the parts that carry traffic; it
lives in ``pqcnet`` because it is the one place allowed to know mesh, sentry and
QSTP at once (``mesh`` must not import ``sentry``, and ``sentry`` stays unaware of
governance):

* :class:`SentryDirectives` — a rate-limit update hot-reloads the sentry's limiter
  through :meth:`pqcnet.sentry.core.Sentry.reload` (the same path as a config-file reload,
  so buckets keep their level and the policy change is anchored like any other).
* :class:`RelayerDirectives` — a rate-limit update sets the frames/s quota of one
  customer (scope = customer, ``*`` = every customer) at a running relayer
  (:meth:`pqcnet.relayer.node.RelayerNode.apply_rate_limit`): publishers of that
  customer beyond it get retriable ``QuotaExceeded`` results.
* :class:`QstpEndpoint` — a node's QSTP face (server plus dialled tunnels) that obeys
  directives: a **slash** puts the target in the endpoint's :class:`~pqcnet.qstp.tls.PeerGate`
  (every later handshake from it is refused, on this endpoint and on any other that
  shares the gate, e.g. a relayer's ``TlsPolicy``) and closes the target's open
  tunnels; a **forced rekey** of this node takes the key the agent just rotated to
  (and recorded in the QS-DAG), gets a certificate for it from the CA, closes its
  dialled tunnels and rotates its server (:meth:`pqcnet.qstp.aio.Server.rotate_identity`:
  GOAWAY to every tunnel, same port), so new tunnels present the new key (if
  the CA fails, the old identity keeps serving and the failure is counted by the agent
  as a handler error).
* :func:`sentry_tunnel_handler` — the sentry's per-tunnel loop for a QSTP server
  owned by a :class:`QstpEndpoint`.

Directives a component does not act on (a rate limit reaching a QSTP endpoint, a
rekey aimed at another node) are ignored there by design: every consumer sees every
directive and picks what concerns it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Protocol

from pqcnet.crypto.pqc import SigningKey, VerifyKey
from pqcnet.identity import NodeIdentity
from pqcnet.identity.spiffe import SpiffeId
from pqcnet.mesh.directives import ForceRekey, Outcome, RateLimitUpdate, SlashNotice
from pqcnet.mesh.envelope import NodeKeys
from pqcnet.mesh.errors import DirectiveError
from pqcnet.qstp.aio import DEFAULT_MAX_TUNNELS, Server, Tunnel, connect, serve
from pqcnet.qstp.config import QstpConfiguration
from pqcnet.qstp.errors import HandshakeError
from pqcnet.qstp.frames import ErrorCode
from pqcnet.qstp.tls import PeerGate, TlsPolicy
from pqcnet.sentry.core import Sentry
from pqcnet.sentry.server import serve_tunnel

log = logging.getLogger("pqcnet.governance")

#: Asks the mesh CA for a certificate on ``key`` for ``spiffe_id`` (a CSR round trip
#: in a deployment; ``lambda sid, key: ca.issue(sid, key=key)`` with an in-process CA).
IdentityIssuer = Callable[[SpiffeId, SigningKey], NodeIdentity | Awaitable[NodeIdentity]]
Handler = Callable[[Tunnel], Awaitable[None]]

#: Most tunnels an endpoint tracks for directive enforcement (same risk as the
#: server's own tunnel bound: one entry per live connection).
DEFAULT_MAX_TRACKED_TUNNELS = 4096


class SentryDirectives:
    """Applies rate-limit directives to a live :class:`~pqcnet.sentry.core.Sentry`.

    ``scope="*"`` replaces the default plan and every tenant's plan; any other scope
    names one tenant whose plan is replaced (or created).
    """

    def __init__(self, sentry: Sentry) -> None:
        self.sentry = sentry
        #: directives applied, by action
        self.applied: Counter[str] = Counter()

    def on_rate_limit(self, update: RateLimitUpdate) -> Outcome:
        self.sentry.apply_rate_limit(update.scope, update.rate_per_s, float(update.burst))
        self.applied["rate_limit"] += 1
        log.info("rate limit directive applied", extra={
            "scope": update.scope, "rate": update.rate_per_s, "burst": update.burst})
        return Outcome.APPLIED

    def on_force_rekey(self, target: ForceRekey) -> Outcome:
        return Outcome.IGNORED  # the sentry's QstpEndpoint rotates its tunnels

    def on_slash(self, target: SlashNotice) -> Outcome:
        return Outcome.IGNORED  # the sentry's QstpEndpoint (its PeerGate) refuses the node


class QuotaTarget(Protocol):
    """What :class:`RelayerDirectives` needs of a relayer (a structural type, so the
    sentry role, which imports this module, does not pull in the relayer's bus clients)."""

    def apply_rate_limit(self, scope: str, rate: float, burst: float) -> None: ...


class RelayerDirectives:
    """Applies rate-limit directives to a running relayer
    (:class:`~pqcnet.relayer.node.RelayerNode`) as per-customer quotas; rekey and slash
    are the relayer's endpoint's business (``ignored`` here)."""

    def __init__(self, node: QuotaTarget) -> None:
        self.node = node
        #: directives applied, by action
        self.applied: Counter[str] = Counter()

    def on_rate_limit(self, update: RateLimitUpdate) -> Outcome:
        self.node.apply_rate_limit(update.scope, update.rate_per_s, float(update.burst))
        self.applied["rate_limit"] += 1
        return Outcome.APPLIED

    def on_force_rekey(self, target: ForceRekey) -> Outcome:
        return Outcome.IGNORED

    def on_slash(self, target: SlashNotice) -> Outcome:
        return Outcome.IGNORED


class GateDirectives:
    """Applies slash notices to a :class:`~pqcnet.qstp.tls.PeerGate` shared with a QSTP server
    this module does not own (e.g. ``RelayerNode(cfg, identity, TlsPolicy(gate=gate))``):
    the slashed node's next handshakes are refused there."""

    def __init__(self, gate: PeerGate, node_id: str = "") -> None:
        self.gate = gate
        self.node_id = node_id

    def on_rate_limit(self, update: RateLimitUpdate) -> Outcome:
        return Outcome.IGNORED

    def on_force_rekey(self, rekey: ForceRekey) -> Outcome:
        return Outcome.IGNORED

    def on_slash(self, notice: SlashNotice) -> Outcome:
        if notice.target == self.node_id:
            return Outcome.IGNORED  # a node does not refuse itself
        self.gate.deny(notice.target, f"slashed: {notice.reason}")
        return Outcome.APPLIED


def sentry_tunnel_handler(sentry: Sentry) -> Handler:
    """Serve one QSTP tunnel's streams through ``sentry``
    (:func:`pqcnet.sentry.server.serve_tunnel`)."""

    async def on_tunnel(tunnel: Tunnel) -> None:
        await serve_tunnel(sentry, tunnel)

    return on_tunnel


def peer_key(tunnel: Tunnel) -> VerifyKey:
    """The ML-DSA key in the certificate the peer presented on ``tunnel``."""
    cert = tunnel.connection.tls.get_peer_certificate(as_cryptography=True)
    if cert is None:  # pragma: no cover - verify_peer refuses certificate-less peers
        raise HandshakeError("tunnel has no peer certificate")
    return VerifyKey(cert.public_key())  # type: ignore[arg-type]


class QstpEndpoint:
    """A node's QSTP server and outbound tunnels, obeying slash and rekey directives."""

    def __init__(self, identity: NodeIdentity, keys: NodeKeys, issuer: IdentityIssuer, *,
                 handler: Handler | None = None, policy: TlsPolicy | None = None,
                 config: QstpConfiguration | None = None,
                 max_tracked: int = DEFAULT_MAX_TRACKED_TUNNELS) -> None:
        policy = policy or TlsPolicy()
        self.gate = policy.gate if policy.gate is not None else PeerGate()
        self.policy = replace(policy, gate=self.gate)
        self.identity = identity
        self.keys = keys
        self.issuer = issuer
        self.handler = handler
        self.config = config
        self.max_tracked = max_tracked
        #: version of the key in our current certificate
        self.key_version = keys.key_version
        self.rekeys = 0
        #: tunnels closed because their peer was slashed
        self.closed_for_slash = 0
        self._server: Server | None = None
        self._tunnels: set[Tunnel] = set()
        self._lock = asyncio.Lock()

    @property
    def node_id(self) -> str:
        return self.keys.node_id

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("endpoint is not serving")
        return self._server.port

    @property
    def server(self) -> Server | None:
        """The QSTP server while serving (identity reload binds to it)."""
        return self._server

    # ------------------------------------------------------------------ serving / dialling

    def _track(self, tunnel: Tunnel) -> None:
        self._tunnels = {t for t in self._tunnels if not t.closed}
        if len(self._tunnels) < self.max_tracked:
            self._tunnels.add(tunnel)
        else:
            log.warning("tunnel tracking full; directives will not close this tunnel",
                        extra={"max_tracked": self.max_tracked})

    async def _serve_one(self, tunnel: Tunnel) -> None:
        self._track(tunnel)
        try:
            if self.handler is not None:
                await self.handler(tunnel)
            else:
                await tunnel.wait_closed()
        finally:
            self._tunnels.discard(tunnel)

    async def serve(self, host: str = "127.0.0.1", port: int = 0, *,
                    reuse_port: bool = False, max_tunnels: int = DEFAULT_MAX_TUNNELS) -> int:
        """Listen with the current identity; returns the bound port (``reuse_port``:
        SO_REUSEPORT, for worker processes sharing it; ``max_tunnels``: served at once)."""
        self._server = await serve(self._serve_one, host, port, self.identity, self.policy,
                                   config=self.config, reuse_port=reuse_port,
                                   max_tunnels=max_tunnels)
        return self._server.port

    async def connect(self, host: str, port: int) -> Tunnel:
        """Dial a peer with the current identity (tracked: directives may close it)."""
        tunnel = await connect(host, port, self.identity, self.policy, config=self.config)
        self._track(tunnel)
        return tunnel

    async def aclose(self) -> None:
        for t in list(self._tunnels):
            await t.close(ErrorCode.NO_ERROR, "endpoint closing")
        self._tunnels.clear()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    # ------------------------------------------------------------------ directives

    def on_rate_limit(self, update: RateLimitUpdate) -> Outcome:
        return Outcome.IGNORED  # limits are the sentry's business

    async def on_slash(self, notice: SlashNotice) -> Outcome:
        if notice.target == self.node_id:
            log.warning("this node was slashed; it must re-attest",
                        extra={"reason": notice.reason})
            return Outcome.IGNORED
        GateDirectives(self.gate, self.node_id).on_slash(notice)
        for t in list(self._tunnels):
            if not t.closed and t.peer.spiffe_id.node_id == notice.target:
                await t.close(ErrorCode.NO_ERROR, "peer slashed")
                self._tunnels.discard(t)
                self.closed_for_slash += 1
        log.info("slashed peer denied", extra={"peer": notice.target,
                                               "closed": self.closed_for_slash})
        return Outcome.APPLIED

    async def on_force_rekey(self, rekey: ForceRekey) -> Outcome:
        if rekey.target != self.node_id:
            return Outcome.IGNORED
        async with self._lock:
            key = self.keys.signing_key
            if key.public_key.key_id == self.identity.key.public_key.key_id:
                return Outcome.IGNORED  # the agent did not rotate (already at that version)
            issued = self.issuer(self.identity.spiffe_id, key)
            new = await issued if inspect.isawaitable(issued) else issued
            if not isinstance(new, NodeIdentity) or (
                    new.key.public_key.key_id != key.public_key.key_id):
                # the old identity keeps serving; the agent counts the handler error
                raise DirectiveError("the CA did not issue a certificate for our new key")
            self.identity = new
            self.key_version = self.keys.key_version
            self.rekeys += 1
            for t in list(self._tunnels):  # outbound ones; the server GOAWAYs its own
                await t.close(ErrorCode.NO_ERROR, "forced rekey")
            self._tunnels.clear()
            if self._server is not None:
                await self._server.rotate_identity(new, self.policy, reason="forced rekey")
            log.info("rekeyed QSTP identity", extra={
                "key_version": self.key_version, "serial": new.serial})
            return Outcome.APPLIED


__all__ = [
    "DEFAULT_MAX_TRACKED_TUNNELS",
    "GateDirectives",
    "IdentityIssuer",
    "QstpEndpoint",
    "RelayerDirectives",
    "SentryDirectives",
    "peer_key",
    "sentry_tunnel_handler",
]
