"""One running sentry — the single composition used by ``pqcnet sentry run`` and by
``pqcnet node run`` for a sentry node.

A sentry is more than its :class:`~pqcnet.sentry.core.Sentry` core: its QS-DAG ledger
(opened, given a dev genesis when empty and allowed), the ledger anchor of its policies
and attestations, the attestation loop, Prometheus, the config-file watcher that
hot-reloads the policy part, and a QSTP listener whose tunnels are served by
:func:`pqcnet.sentry.server.serve_tunnel`. Both commands used to assemble these
separately, and the node's copy had no config watcher; now both go through
:class:`SentryService`, so a sentry behaves the same however it is started.

The listener is a :class:`~pqcnet.runtime.governance.QstpEndpoint` (it tracks tunnels so
slash / rekey directives can act on them; without a control plane nothing calls those).
Start-up is two steps so the node runtime can wire its agent in between:
:meth:`SentryService.open` builds everything but does not listen; :meth:`serve`
listens and starts the background tasks. Everything opened is closed by
:meth:`aclose`, in reverse order, also when a step fails half-way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from pqcnet._util.ops_http import not_expired, start_ops_server
from pqcnet.crypto.pqc import SigningKey
from pqcnet.identity import NodeIdentity
from pqcnet.identity.spiffe import SpiffeId
from pqcnet.mesh.envelope import NodeKeys
from pqcnet.mesh.errors import DirectiveError
from pqcnet.qsdag import Ledger
from pqcnet.runtime.governance import DEFAULT_MAX_TRACKED_TUNNELS, IdentityIssuer, QstpEndpoint
from pqcnet.sentry.attestation import LedgerAnchor, attestation_loop
from pqcnet.sentry.config import SentryConfig
from pqcnet.sentry.core import Sentry
from pqcnet.sentry.errors import SentryConfigError
from pqcnet.sentry.metrics import SentryMetrics
from pqcnet.sentry.server import serve_tunnel, watch_config
from pqcnet.sentry.shared import SharedLimitState, install

log = logging.getLogger("pqcnet.sentry")

#: network name of the genesis a sentry creates in an empty ledger (``ledger_dev_genesis``)
DEV_NETWORK = "pqcnet-dev"


def _no_ca(sid: SpiffeId, key: SigningKey) -> NodeIdentity:
    raise DirectiveError("forced rekey needs a CA (run the sentry under `pqcnet node run` "
                         "with control_plane.ca_dir)")


def open_ledger(path: Path, node_id: str, key: SigningKey, *, dev_genesis: bool,
                what: str) -> Ledger:
    """Open a node's QS-DAG; an empty one gets a dev genesis with this node as authority
    when ``dev_genesis``, else a :class:`SentryConfigError` naming the command that
    creates one (``what`` names the config key)."""
    ledger = Ledger.open(path)
    if ledger.genesis_id is None:
        if not dev_genesis:
            ledger.close()
            raise SentryConfigError(
                f"{what}: ledger {path} has no genesis; create it with `pqcnet ledger --path "
                f"{path} init --network NAME --authority {node_id} --key AUTHORITY.pem` "
                f"(or set ledger_dev_genesis: true)")
        ledger.init_genesis(DEV_NETWORK, node_id, key)
        log.info("dev genesis created", extra={"ledger": str(path), "authority": node_id})
    return ledger


class SentryService:
    """A sentry with its ledger, metrics, attestation, hot reload and QSTP listener."""

    def __init__(self, cfg: SentryConfig, identity: NodeIdentity, *,
                 keys: NodeKeys | None = None, issuer: IdentityIssuer = _no_ca,
                 config_path: Path | None = None, reload_interval: float = 1.0,
                 shared: tuple[SharedLimitState, int] | None = None,
                 reuse_port: bool = False, started: SentryConfig | None = None) -> None:
        self.cfg = cfg
        #: the config file as read, when ``cfg`` is a worker's copy of it (hot reload
        #: compares the file with this)
        self.started = started
        #: (shared limiter state, this worker's index) under ``sentry run --workers N``
        self.shared = shared
        self.reuse_port = reuse_port
        self.identity = identity
        #: mesh identity (shared with a control-plane agent, which may rotate its key)
        self.keys = keys or NodeKeys(identity.spiffe_id.node_id, identity.key)
        self.issuer = issuer
        self.config_path = config_path if config_path is not None else cfg.source
        self.reload_interval = reload_interval
        self.metrics = SentryMetrics()
        self.ledger: Ledger | None = None
        self.anchor: LedgerAnchor | None = None
        self.sentry: Sentry
        self.endpoint: QstpEndpoint
        self.port = 0
        self.metrics_port: int | None = None
        self._stack = contextlib.AsyncExitStack()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def node_id(self) -> str:
        return self.keys.node_id

    async def open(self) -> None:
        """Open the ledger, build the core and the (not yet listening) endpoint."""
        cfg, stack = self.cfg, self._stack
        try:
            if cfg.ledger_path is not None:
                ledger = self.ledger = open_ledger(
                    cfg.ledger_path, self.node_id, self.identity.key,
                    dev_genesis=cfg.ledger_dev_genesis, what="ledger")
                stack.callback(ledger.close)
                config_bytes = (self.config_path.read_bytes()
                                if self.config_path is not None else b"")
                self.anchor = LedgerAnchor(ledger, self.node_id, self.identity.key,
                                           config_bytes, self.metrics)
            self.sentry = Sentry(cfg, ledger=self.anchor, metrics=self.metrics,
                                 started=self.started)
            if self.shared is not None:
                install(self.sentry, *self.shared)
            stack.push_async_callback(self.sentry.aclose)
            qstp_config = cfg.qstp_config()  # with the receive budget its tunnels share
            self.endpoint = QstpEndpoint(
                self.identity, self.keys, self.issuer, handler=self._on_tunnel,
                policy=cfg.tls_policy(), config=qstp_config,
                max_tracked=max(DEFAULT_MAX_TRACKED_TUNNELS, cfg.bounds.max_tunnels))
            self.metrics.bind_budget(qstp_config.receive_budget)
            endpoint = self.endpoint
            self.metrics.bind_server(lambda: endpoint.server)
            stack.push_async_callback(self.endpoint.aclose)
        except BaseException:
            await self.aclose()
            raise

    async def _on_tunnel(self, tunnel: object) -> None:
        await serve_tunnel(self.sentry, tunnel)

    async def serve(self) -> int:
        """Listen, then start attestation, hot reload and Prometheus; returns the port."""
        cfg = self.cfg
        try:
            self.port = await self.endpoint.serve(cfg.listen_host, cfg.listen_port,
                                                  reuse_port=self.reuse_port,
                                                  max_tunnels=cfg.bounds.max_tunnels)
            if self.anchor is not None:
                self._tasks.append(asyncio.create_task(
                    attestation_loop(self.anchor, cfg.attestation_interval), name="attestation"))
            if self.config_path is not None:
                self._tasks.append(watch_config(self.sentry, self.config_path,
                                                self.reload_interval))
            if cfg.metrics_port:
                httpd = start_ops_server(cfg.metrics_port, cfg.metrics_host,
                                         registry=self.metrics.registry, ready=self.ready)
                self.metrics_port = httpd.port
                self._stack.callback(httpd.server_close)
                self._stack.callback(httpd.shutdown)
        except BaseException:
            await self.aclose()
            raise
        return self.port

    def ready(self) -> dict[str, bool | str]:
        """``/readyz``: listening, identity valid, ledger open (when configured)."""
        checks: dict[str, bool | str] = {
            "listening": self.port > 0 or "not listening",
            "identity": not_expired(self.identity.not_after)}
        if self.cfg.ledger_path is not None:
            checks["ledger"] = self.anchor is not None or "ledger not open"
        return checks

    async def start(self) -> SentryService:
        """:meth:`open` then :meth:`serve` (no control plane to wire in between)."""
        await self.open()
        await self.serve()
        return self

    async def aclose(self) -> None:
        """Stop the tasks, then close what was opened, newest first (idempotent)."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self._stack.aclose()


__all__ = ["DEV_NETWORK", "SentryService", "open_ledger"]
