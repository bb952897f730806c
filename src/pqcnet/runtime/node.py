"""One running node: the role (relayer or sentry) joined to its control-plane agent.

:class:`NodeRuntime` is the composition root ``pqcnet node run`` drives. It starts the
role's node, then a :class:`~pqcnet.mesh.agent.ControlPlaneAgent` on the configured transport
whose mesh identity is the node's own QSTP key (so the node's QS-DAG vertices and its
mesh messages have one author), and registers the existing bindings:

* relayer — a :class:`~pqcnet.runtime.governance.QstpEndpoint` that shares the ``PeerGate``
  of the relayer's ``TlsPolicy`` (a slashed publisher's next handshake is refused) and
  does the CA step of a forced rekey (new certificate for the key the agent just
  rotated to and recorded in the relayer's QS-DAG); then
  :meth:`~pqcnet.relayer.node.RelayerNode.rotate_identity` switches the proof signer, GOAWAYs
  the tunnels and re-listens on the same port. The endpoint does not serve: the
  relayer's server stays the relayer's. A rekey is refused *before* the key rotates
  when it could not complete (no ``ca_dir``, or ``ledger: none`` — the relayer's own
  ledger would then refuse proofs signed by a key it never saw). A
  :class:`~pqcnet.runtime.relay_reports.RelayReportPublisher` sends anchored volume proofs
  on ``relay-reports``; :class:`~pqcnet.runtime.governance.RelayerDirectives` turns a
  rate-limit directive into a per-customer quota (it is ``applied`` only there).
* both roles — at start the ``PeerGate`` is seeded with the nodes the QS-DAG holds
  as slashed, so a restarted node keeps refusing them.
* sentry — a :class:`~pqcnet.runtime.sentry.SentryService` (the same composition as
  ``pqcnet sentry run``: ledger, attestation, config-file hot reload, Prometheus) whose
  :class:`~pqcnet.runtime.governance.QstpEndpoint` obeys slash (gate + close the target's
  tunnels) and forced rekey (new certificate from ``ca_dir`` and re-listen), plus
  :class:`~pqcnet.runtime.governance.SentryDirectives` (rate-limit hot reload).

Directives take effect only once anchored in this node's own QS-DAG: the relayer's
ledger, the sentry's ``ledger`` if its config names one, else a control-plane ledger
under ``control_plane.state_dir`` that learns the genesis by DAG sync. With
``control_plane.ledger: none`` the node obeys no directive (a warning says so).

Control-plane state lives under ``control_plane.state_dir``: the DTN bundle store (messages
for offline peers, delivered on their return), the last CA-signed CRL accepted from
gossip (:class:`~pqcnet.mesh.crl.CrlGate`), and the journal of the
:class:`~pqcnet.mesh.pipeline.SlashingPipeline` (evidence -> proposal -> slash; governance
nodes holding ``governance.signing_keys`` also issue the slash). The pipeline also runs
the relayer's over-claim rule (:func:`pqcnet.relayer.counters.overclaim_rule`, decision
0014): volume claims above client-signed ack counters, anchored as evidence, with the
clients' certificates checked against this node's trust bundle. Waku REST URLs are used
with failover (:meth:`~pqcnet.mesh.waku.WakuTransport.connect_many`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from prometheus_client import start_http_server

from pqcnet._util.env import CA_PASS_ENV, PASS_ENV, env_passphrase
from pqcnet.crypto.pqc import SigningKey
from pqcnet.identity import MeshCA, NodeIdentity
from pqcnet.identity.ca_lock import ca_writer
from pqcnet.identity.spiffe import SpiffeId
from pqcnet.mesh.agent import AgentConfig, ControlPlaneAgent
from pqcnet.mesh.crl import CrlGate
from pqcnet.mesh.directives import (
    ForceRekey,
    GovernancePolicy,
    Outcome,
    RateLimitUpdate,
    SlashNotice,
)
from pqcnet.mesh.dtn import BundleStore
from pqcnet.mesh.envelope import Keyring, NodeKeys
from pqcnet.mesh.errors import DirectiveError, WakuError
from pqcnet.mesh.offload import CryptoPool
from pqcnet.mesh.pipeline import SlashingPipeline
from pqcnet.mesh.qsdag_port import QsdagPort
from pqcnet.mesh.transport import InProcessHub, InProcessTransport, Transport
from pqcnet.mesh.waku import WakuRestClient, WakuTransport
from pqcnet.qsdag import Ledger
from pqcnet.qstp.tls import PeerGate, TlsPolicy
from pqcnet.relayer.counters import ca_trust, overclaim_rule
from pqcnet.runtime.config import ControlPlaneSpec, NodeConfig
from pqcnet.runtime.errors import NodeError
from pqcnet.runtime.governance import QstpEndpoint, RelayerDirectives, SentryDirectives
from pqcnet.runtime.relay_reports import RelayReportPublisher
from pqcnet.runtime.sentry import SentryService

if TYPE_CHECKING:  # the relayer's bus clients (redis, aiokafka) are not in a sentry image
    from pqcnet.relayer.node import RelayerNode

log = logging.getLogger("pqcnet.node")

#: seconds a Waku node gets to answer ``/health`` at start
WAKU_HEALTH_TIMEOUT = 3.0
#: loggers of the Waku REST client's HTTP stack: they log every request at INFO, i.e.
#: every Waku poll (~10 lines/s). Logging writes synchronously on the event loop, so
#: that flood once filled a stderr pipe its reader had stopped draining and blocked the
#: whole node in write(2) — governance gRPC included (see the README section).
CHATTY_LOGGERS = ("httpx", "httpcore")


class _RelayerAgent(ControlPlaneAgent):
    """A relayer's agent: refuses a forced rekey it could not complete, before rotating."""

    can_rekey = ""

    async def rekey(self, new_version: int) -> None:
        if self.can_rekey:
            raise DirectiveError(f"forced rekey refused, key unchanged: {self.can_rekey}")
        await super().rekey(new_version)


class _RelayerRekey:
    """After the endpoint got a certificate for the rotated key, move the relayer to it."""

    def __init__(self, endpoint: QstpEndpoint, node: RelayerNode) -> None:
        self.endpoint, self.node = endpoint, node

    def on_rate_limit(self, update: RateLimitUpdate) -> Outcome:
        return Outcome.IGNORED

    def on_slash(self, notice: SlashNotice) -> Outcome:
        return Outcome.IGNORED  # the endpoint's gate is the relayer's gate

    async def on_force_rekey(self, rekey: ForceRekey) -> Outcome:
        if rekey.target == self.endpoint.node_id and (
                self.endpoint.identity is not self.node.identity):
            await self.node.rotate_identity(self.endpoint.identity)
            return Outcome.APPLIED
        return Outcome.IGNORED


def agent_config(role: str, spec: ControlPlaneSpec) -> AgentConfig:
    """The control-plane agent's behaviour from the node file's ``control_plane``."""
    return AgentConfig(role=role, namespace=spec.namespace,
                       announce_interval_ms=int(spec.announce_interval_s * 1000),
                       peer_expiry_ms=int(spec.announce_interval_s * 3000),
                       tick_ms=max(1, int(spec.tick_s * 1000)),
                       dag_sync_interval_ms=int(spec.dag_sync_interval_s * 1000),
                       dag_pull_from=(None if spec.dag_pull_from is None
                                      else tuple(spec.dag_pull_from)))


def seed_gate(gate: PeerGate, ledger: Ledger | None, own_id: str) -> int:
    """Deny every node the QS-DAG holds as slashed (the gate is in memory; the ledger is
    durable). Returns how many. Slashes name node ids, which is what the gate keys on
    (the node-id segment of the peer's SPIFFE id)."""
    if ledger is None:
        return 0
    slashes = ledger.views.slashes
    denied = 0
    for node_id in slashes.slashed_nodes():
        if node_id != own_id and ledger.is_slashed(node_id):
            gate.deny(node_id, "slashed (QS-DAG)")
            denied += 1
    if denied:
        log.info("slashed peers denied from the QS-DAG", extra={"count": denied})
    return denied


async def _waku_transport(urls: tuple[str, ...]) -> WakuTransport:
    """A transport failing over across ``urls``; at least one must answer ``/health``
    now (a clear start error instead of a node that never hears anything)."""
    errors = []
    for url in urls:
        client = WakuRestClient(url)
        try:
            async with asyncio.timeout(WAKU_HEALTH_TIMEOUT):
                await client.health()
        except (WakuError, TimeoutError) as exc:
            errors.append(f"{url}: {exc or 'timeout'}")
            continue
        finally:
            await client.aclose()
        return WakuTransport.connect_many(urls, timeout_s=2.0, retries=0)
    raise NodeError("no Waku node reachable (" + "; ".join(errors) + ")")


class NodeRuntime:
    """Starts and stops one node with its control plane (see the module docstring)."""

    def __init__(self, cfg: NodeConfig, *, transport: Transport | None = None) -> None:
        self.cfg = cfg
        self._transport = transport
        self.agent: ControlPlaneAgent | None = None
        self.relayer: RelayerNode | None = None
        self.gate: PeerGate | None = None
        self.reports: RelayReportPublisher | None = None
        self.endpoint: QstpEndpoint | None = None
        self.sentry: Any = None
        self.sentry_service: SentryService | None = None
        self.sentry_directives: SentryDirectives | None = None
        self.relayer_directives: RelayerDirectives | None = None
        self.ledger: Ledger | None = None
        self.crl: CrlGate | None = None
        self.pipeline: SlashingPipeline | None = None
        self._trust_anchors: list[x509.Certificate] = []
        self.port = 0
        self.metrics_port: int | None = None
        self.mesh_metrics_port: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closers: list[Callable[[], Awaitable[None] | None]] = []

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the role, then the agent; on failure everything started is stopped."""
        if not log.isEnabledFor(logging.DEBUG):  # per-request lines only when debugging
            for name in CHATTY_LOGGERS:
                logging.getLogger(name).setLevel(logging.WARNING)
        try:
            if self.cfg.role == "relayer":
                await self._start_relayer()
            else:
                await self._start_sentry()
            assert self.agent is not None
            await self.agent.start()
            self._start_pipeline()
            cp = self.cfg.control_plane
            if cp.spec.metrics_port is not None:
                httpd, _thread = start_http_server(cp.spec.metrics_port, addr="127.0.0.1")
                self.mesh_metrics_port = int(httpd.server_port)
                self._closers.append(httpd.shutdown)
        except BaseException:
            await self.stop()
            raise
        log.info("node up", extra={"role": self.cfg.role, "node": self.node_id,
                                   "port": self.port, "transport": cp.spec.transport,
                                   "namespace": cp.spec.namespace})

    @property
    def node_id(self) -> str:
        return self.agent.node_id if self.agent is not None else ""

    async def stop(self) -> None:
        """Stop the agent and the role's node (idempotent)."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.agent is not None:
            with contextlib.suppress(Exception):
                await self.agent.stop()
        for closer in reversed(self._closers):
            try:
                res = closer()
                if asyncio.iscoroutine(res):
                    await res
            except Exception as exc:  # keep closing the rest
                log.warning("close failed during stop", extra={"error": repr(exc)})
        self._closers.clear()
        log.info("node stopped", extra={"role": self.cfg.role})

    # ------------------------------------------------------------------ agent

    async def _make_agent(self, keys: NodeKeys, ledger: Ledger | None, identity: NodeIdentity,
                          cls: type[ControlPlaneAgent] = ControlPlaneAgent) -> ControlPlaneAgent:
        cp = self.cfg.control_plane
        state = cp.state_dir
        state.mkdir(parents=True, exist_ok=True)
        transport = self._transport
        if transport is None:
            transport = (await _waku_transport(cp.waku_rest_urls) if cp.spec.transport == "waku"
                         else InProcessTransport(InProcessHub()))
        ring = Keyring()
        if cp.governance_keys:
            ring.add(cp.spec.governance.issuer, cp.governance_keys[0], 1)
        for node, key in cp.trust.items():
            ring.add(node, key, 1)
        governance = (GovernancePolicy(list(cp.governance_keys), cp.spec.governance.threshold)
                      if cp.governance_keys else None)
        config = agent_config(self.cfg.role, cp.spec)
        if ledger is None and cp.spec.ledger == "node":  # a sentry without its own ledger
            ledger = Ledger.open(state / "ledger")
            self._closers.append(ledger.close)
        self.ledger = ledger if cp.spec.ledger == "node" else None
        port = QsdagPort(self.ledger, keys) if self.ledger is not None else None
        bundles = BundleStore(state / "bundles")
        self._closers.append(bundles.close)
        self.crl = CrlGate(identity.trust_bundle_pem, initial=identity.crl_pem,
                           path=state / "crl.pem")
        self._trust_anchors = identity.trust_anchors
        pool = CryptoPool(cp.spec.sign_threads) if cp.spec.sign_threads else None
        if pool is not None:
            self._closers.append(pool.close)
        # off the loop even when alone: this loop carries the role's traffic
        self.agent = cls(keys, transport, ring, config=config, governance=governance,
                         ledger=port, bundles=bundles, crl=self.crl, crypto=pool,
                         inline_when_alone=False)
        if governance is None:
            log.warning("no governance keys configured; directives will be refused")
        if port is None:
            log.warning("control_plane.ledger is none: this node obeys no governance "
                        "directive (each must be anchored in its own QS-DAG first)")
        return self.agent

    def _start_pipeline(self) -> None:
        """Evidence -> proposal -> slash on a timer (needs the node's ledger)."""
        if self.agent is None or self.ledger is None:
            return
        cp = self.cfg.control_plane
        self.pipeline = SlashingPipeline(
            self.agent, self.ledger, journal=cp.state_dir / "slashing.journal",
            governance_keys=cp.governance_signing_keys,
            rules=[overclaim_rule(ca_trust(self._trust_anchors))])
        self._tasks.append(asyncio.create_task(
            self.pipeline.run(cp.spec.slashing_interval_s), name="slashing"))

    # ------------------------------------------------------------------ relayer

    async def _start_relayer(self) -> None:
        rcfg = self.cfg.relayer
        assert rcfg is not None
        from pqcnet.relayer.node import RelayerNode, load_identity

        identity = load_identity(rcfg)
        self.gate = PeerGate()
        node = self.relayer = RelayerNode(rcfg, identity, TlsPolicy(gate=self.gate))
        self._closers.append(node.stop)
        await node.start()
        self.port, self.metrics_port = node.port, node.metrics_port
        node_id = self.cfg.control_plane.spec.node_id or rcfg.node_id
        seed_gate(self.gate, node.anchor.ledger, node_id)
        keys = NodeKeys(node_id, identity.key)
        agent = await self._make_agent(keys, node.anchor.ledger, identity, _RelayerAgent)
        assert isinstance(agent, _RelayerAgent)
        cp = self.cfg.control_plane
        agent.can_rekey = ("no control_plane.ca_dir to certify the new key" if cp.ca_dir is None
                           else "control_plane.ledger is none: the relayer's ledger would "
                           "refuse proofs under the new key" if cp.spec.ledger != "node" else "")
        self.endpoint = QstpEndpoint(identity, keys, self._issuer(),
                                     policy=TlsPolicy(gate=self.gate))
        self.relayer_directives = RelayerDirectives(node)
        agent.handlers += [self.endpoint, _RelayerRekey(self.endpoint, node),
                           self.relayer_directives]
        if self.cfg.control_plane.spec.publish_reports:
            self.reports = RelayReportPublisher(
                node, agent, interval_s=self.cfg.control_plane.spec.report_interval_s)
            self._tasks.append(asyncio.create_task(self.reports.run(), name="relay-reports"))

    # ------------------------------------------------------------------ sentry

    async def _start_sentry(self) -> None:
        from pqcnet.sentry.config import require_identity

        scfg = self.cfg.sentry
        assert scfg is not None
        identity = NodeIdentity.load(require_identity(scfg), env_passphrase(PASS_ENV))
        keys = NodeKeys(self.cfg.control_plane.spec.node_id or identity.spiffe_id.node_id,
                        identity.key)
        service = self.sentry_service = SentryService(scfg, identity, keys=keys,
                                                      issuer=self._issuer())
        self._closers.append(service.aclose)
        await service.open()
        self.sentry = service.sentry
        agent = await self._make_agent(keys, service.ledger, identity)
        self.sentry_directives = SentryDirectives(service.sentry)
        self.endpoint = service.endpoint
        seed_gate(self.endpoint.gate, service.ledger, keys.node_id)
        agent.handlers += [self.sentry_directives, self.endpoint]
        self.port = await service.serve()
        self.metrics_port = service.metrics_port

    def _issuer(self) -> Callable[[SpiffeId, SigningKey], Awaitable[NodeIdentity]]:
        ca_dir: Path | None = self.cfg.control_plane.ca_dir

        def issue(sid: SpiffeId, key: SigningKey) -> NodeIdentity:
            if ca_dir is None:
                raise DirectiveError("forced rekey needs control_plane.ca_dir (no CA configured)")
            # recorded in the CA's state like any issuance (it was not: the certificate
            # was missing from the issued log, so `ca revoke --spiffe-id` missed it);
            # under the directory's writer lock, refused while `ca serve` serves it
            with ca_writer(ca_dir, f"pqcnet node run ({sid})"):
                ca = MeshCA.load(ca_dir, env_passphrase(CA_PASS_ENV))
                node = ca.issue(sid, key=key)
                ca.save_state(ca_dir)
            return node

        async def in_thread(sid: SpiffeId, key: SigningKey) -> NodeIdentity:
            # the lock may be waited for and the state is fsynced: not on the loop
            return await asyncio.to_thread(issue, sid, key)

        return in_thread


__all__ = ["CA_PASS_ENV", "CHATTY_LOGGERS", "PASS_ENV", "NodeRuntime", "seed_gate"]
