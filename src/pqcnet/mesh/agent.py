"""The control-plane agent: one per node, the only mesh object that does I/O.

It owns a :class:`~pqcnet.mesh.transport.Transport` and composes the sans-IO parts —
envelope signer/verifier, peer table, routing cache, DTN bundle store, governance
policy, ledger port — into the node's behaviour on the mesh:

* **announce** itself periodically (``announce`` topic) and expire silent peers;
* **routes**: anchor its own advertisements in its ledger, apply others' to the cache;
* **directives** (``governance`` topic): verify the governance threshold, anchor the
  directive in the ledger, apply the built-in effect (revoke a slashed key, rotate
  our own key on a forced rekey), then call every registered
  :class:`~pqcnet.mesh.directives.DirectiveHandler`;
* **gossip** with DTN store-and-forward (:mod:`pqcnet.mesh.gossip`);
* **DAG sync**: tips, pulls and vertex chunks (:mod:`pqcnet.mesh.dagsync`).

Nothing a peer sends can crash the receive loop: every message is verified first
(drops counted by reason in :attr:`ControlPlaneAgent.drops`) and every handler error
is caught, logged and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pqcnet.crypto.pqc import SigningKey, VerifyKey
from pqcnet.mesh import metrics
from pqcnet.mesh._aio import maybe_await
from pqcnet.mesh.dagsync import DagSyncMixin
from pqcnet.mesh.directives import (
    Directive,
    DirectiveHandler,
    ForceRekey,
    GovernancePolicy,
    RateLimitUpdate,
    SignedDirective,
    SlashNotice,
)
from pqcnet.mesh.dtn import BundleStore
from pqcnet.mesh.envelope import (
    ControlMessage,
    EnvelopeSigner,
    EnvelopeVerifier,
    Keyring,
    MessageType,
    NodeKeys,
    VerifierConfig,
    now_ms,
)
from pqcnet.mesh.errors import (
    ConfigError,
    DirectiveError,
    EnvelopeRejected,
    LedgerRejected,
    MeshError,
    TransportClosed,
    WakuError,
)
from pqcnet.mesh.gossip import GossipListener, GossipMixin
from pqcnet.mesh.ledger import LedgerPort
from pqcnet.mesh.messages import (
    Announcement,
    DagPull,
    DagTips,
    DagVertices,
    Endpoint,
    RelayReport,
    RouteAdvertisement,
    RouteEntry,
    SlashingProposal,
)
from pqcnet.mesh.peers import PeerTable, RoutingCache
from pqcnet.mesh.transport import Subscription, Transport, WakuMessage, inbox_topic, topic_map

log = logging.getLogger("pqcnet.mesh.agent")

ReportListener = Callable[[RelayReport, str], Awaitable[None] | None]
ProposalListener = Callable[[SlashingProposal, str], Awaitable[None] | None]


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Behaviour and bounds of one agent."""

    role: str = "node"
    #: separates meshes sharing one Waku network (content topic prefix)
    namespace: str = ""
    capabilities: tuple[str, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()
    software_hash: bytes = b""
    staking_address: str = ""
    announce_interval_ms: int = 10_000
    #: a peer silent this long (or 3 announce intervals) is not live
    peer_expiry_ms: int = 30_000
    #: how often the housekeeping loop runs
    tick_ms: int = 500
    #: live peers each gossip hop is forwarded to
    gossip_fanout: int = 3
    #: forwarding hops a new gossip item gets
    gossip_hops: int = 2
    #: default gossip / bundle lifetime
    gossip_ttl_ms: int = 3_600_000
    #: how often tips are published (0 = only on demand)
    dag_sync_interval_ms: int = 2_000
    #: vertices per DAG_VERTICES message (keeps messages under the Waku size limit)
    dag_chunk: int = 8
    #: directive ids remembered to apply each directive once
    max_applied_directives: int = 10_000
    #: slashing proposals kept for governance review
    max_proposals: int = 1_000
    #: while announcing keeps failing (node offline), log it at most this often
    failure_log_interval_ms: int = 60_000
    verifier: VerifierConfig = field(default_factory=VerifierConfig)

    def __post_init__(self) -> None:
        if self.announce_interval_ms <= 0 or self.tick_ms <= 0 or self.dag_chunk < 1:
            raise ConfigError("announce interval, tick and dag_chunk must be positive")
        if self.gossip_fanout < 1 or self.gossip_hops < 0:
            raise ConfigError("gossip fan-out must be >= 1 and hops >= 0")


class ControlPlaneAgent(GossipMixin, DagSyncMixin):
    """A node's presence on the control plane."""

    def __init__(self, keys: NodeKeys, transport: Transport, keyring: Keyring, *,
                 config: AgentConfig | None = None,
                 governance: GovernancePolicy | None = None,
                 ledger: LedgerPort | None = None,
                 bundles: BundleStore | None = None,
                 clock: Callable[[], int] = now_ms) -> None:
        self.keys = keys
        self.transport = transport
        self.keyring = keyring
        self.config = config or AgentConfig()
        self.governance = governance
        self.ledger = ledger
        self.bundles = bundles
        self.clock = clock
        keyring.add(keys.node_id, keys.signing_key.public_key, keys.key_version)
        # senders registered in (or rotated in) our QS-DAG are known without bootstrap
        keyring.lookup = self._ledger_key
        self.signer = EnvelopeSigner(keys)
        self.verifier = EnvelopeVerifier(keyring, [keys.recipient_key], self.config.verifier)
        self.peers = PeerTable(expiry_ms=self.config.peer_expiry_ms)
        self.routes = RoutingCache()
        self.handlers: list[DirectiveHandler] = []
        self.gossip_listeners: list[GossipListener] = []
        self.report_listeners: list[ReportListener] = []
        self.proposal_listeners: list[ProposalListener] = []
        self.proposals: list[tuple[SlashingProposal, str]] = []
        self.applied: OrderedDict[bytes, Directive] = OrderedDict()
        #: non-verifier events: handler errors, rejected directives, publish failures
        self.events: Counter[str] = Counter()
        self._route_version = 0
        self._sub: Subscription | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._last_announce = 0
        self._last_tips = 0
        #: consecutive failed announcements, and when we last logged about them
        self._announce_failures = 0
        self._announce_logged_ms = 0
        self._rng = random.Random()
        self.topics = topic_map(self.config.namespace)
        self.my_inbox = inbox_topic(keys.node_id, self.config.namespace)

    def _ledger_key(self, node_id: str, key_version: int) -> VerifyKey | None:
        return self.ledger.key_for(node_id, key_version) if self.ledger is not None else None

    # ------------------------------------------------------------------ lifecycle

    @property
    def node_id(self) -> str:
        return self.keys.node_id

    @property
    def drops(self) -> Counter[str]:
        """Received messages dropped, by reason."""
        return self.verifier.drops

    async def start(self) -> None:
        """Subscribe to the standard topics and our inbox; start receive + housekeeping."""
        topics = [*self.topics.values(), self.my_inbox]
        self._sub = await self.transport.subscribe(topics)
        self._tasks = [
            asyncio.create_task(self._receive_loop(self._sub), name=f"mesh-rx-{self.node_id}"),
            asyncio.create_task(self._tick_loop(), name=f"mesh-tick-{self.node_id}"),
        ]
        await self.announce()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        if self._sub is not None:
            self._sub.close()
        await self.transport.close()

    async def _receive_loop(self, sub: Subscription) -> None:
        while True:
            try:
                msg = await sub.get()
            except TransportClosed:
                return
            await self.handle(msg)

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.tick_ms / 1000)
            try:
                await self.tick()
            except MeshError as exc:
                self.events["tick_error"] += 1
                log.warning("mesh housekeeping failed", extra={"error": str(exc)})

    async def tick(self) -> None:
        """Housekeeping: announce, expire peers and bundles, flush bundles, publish tips."""
        now = self.clock()
        if now - self._last_announce >= self.config.announce_interval_ms:
            await self.announce()
        for node in self.peers.expire(now):
            log.info("peer expired", extra={"peer": node})
        metrics.PEERS.set(len(self.peers.live(now)))
        if self.bundles is not None:
            self.bundles.expire(now)
            for dest in self.bundles.destinations():
                if self.peers.is_live(dest, now):
                    await self.flush_bundles(dest)
        if (self.ledger is not None and self.config.dag_sync_interval_ms
                and now - self._last_tips >= self.config.dag_sync_interval_ms):
            await self.publish_tips()

    # ------------------------------------------------------------------ publishing

    def _inbox(self, node_id: str) -> str:
        return inbox_topic(node_id, self.config.namespace)

    async def _publish(self, topic: str, type_: MessageType, body: bytes) -> None:
        wire = self.signer.wire(type_, body, now_ms=self.clock())
        await self.transport.publish(topic, wire)

    def announcement(self, *, next_key: SigningKey | None = None,
                     next_version: int = 0) -> Announcement:
        c = self.config
        return Announcement(
            node_id=self.node_id, role=c.role, capabilities=c.capabilities,
            software_hash=c.software_hash, staking_address=c.staking_address,
            endpoints=c.endpoints, key_version=self.keys.key_version,
            seal_key=self.keys.recipient_key.public, interval_ms=c.announce_interval_ms,
            next_key=next_key.public_key if next_key else None, next_key_version=next_version,
        )

    async def announce(self) -> None:
        """Publish our NodeAnnouncement."""
        self._last_announce = self.clock()
        try:
            await self._publish(self.topics["announce"], MessageType.NODE_ANNOUNCEMENT,
                                self.announcement().encode())
        except WakuError as exc:
            self.events["publish_failed"] += 1
            self._announce_failures += 1
            now = self.clock()
            # an offline node fails every tick: say so once, then at most once per
            # failure_log_interval_ms, and everything else at debug level
            if (self._announce_failures == 1
                    or now - self._announce_logged_ms >= self.config.failure_log_interval_ms):
                self._announce_logged_ms = now
                log.info("announce failed; retrying every tick", extra={
                    "error": str(exc), "failures": self._announce_failures})
            else:
                log.debug("announce failed", extra={"error": str(exc)})
            return
        if self._announce_failures:
            log.info("announce recovered", extra={"failures": self._announce_failures})
            self._announce_failures = 0

    async def advertise_routes(self, routes: list[RouteEntry]) -> RouteAdvertisement:
        """Anchor our routes in the ledger, update our own cache, publish them."""
        self._route_version += 1
        ad = RouteAdvertisement(self.node_id, self.clock() * 1000 + self._route_version,
                                tuple(routes))
        if self.ledger is not None:
            self.ledger.anchor_routes(ad.encode())
        self.routes.apply(ad)
        await self._publish(self.topics["routes"], MessageType.ROUTE_ADVERTISEMENT, ad.encode())
        return ad

    async def issue_directive(self, signed: SignedDirective) -> None:
        """Publish a (threshold-)signed directive to the governance topic and apply it here."""
        await self._publish(self.topics["governance"], MessageType.GOVERNANCE_DIRECTIVE,
                            signed.encode())
        await self._on_directive(signed.encode(), self.node_id)

    async def propose_slashing(self, proposal: SlashingProposal) -> None:
        await self._publish(self.topics["governance"], MessageType.SLASHING_PROPOSAL,
                            proposal.encode())

    async def publish_report(self, report: RelayReport) -> None:
        """Relayers: publish a volume proof / performance report."""
        await self._publish(self.topics["relay-reports"], MessageType.RELAY_REPORT, report.encode())

    # ------------------------------------------------------------------ receiving

    async def handle(self, wmsg: WakuMessage) -> ControlMessage | None:
        """Verify and act on one received Waku message (never raises for bad input)."""
        now = self.clock()
        msg = self.verifier.accept(wmsg.payload, now)
        if msg is None or msg.sender == self.node_id:
            return None
        if msg.timestamp_ms and msg.type is not MessageType.GOSSIP:
            metrics.DELIVERY_LATENCY.observe(max(0, now - msg.timestamp_ms) / 1000)
        try:
            await self._dispatch(msg)
        except EnvelopeRejected as exc:
            self.verifier.drops[exc.reason] += 1
            metrics.DROPPED.labels(exc.reason).inc()
        except (DirectiveError, LedgerRejected) as exc:
            self.events["directive_rejected" if isinstance(exc, DirectiveError)
                        else "ledger_rejected"] += 1
            log.warning("control message refused", extra={
                "sender": msg.sender, "type": msg.type.name, "error": str(exc)})
        except MeshError as exc:
            self.events["handler_error"] += 1
            log.warning("control message failed", extra={
                "sender": msg.sender, "type": msg.type.name, "error": str(exc)})
        return msg

    async def _dispatch(self, msg: ControlMessage) -> None:
        t = msg.type
        if t is MessageType.NODE_ANNOUNCEMENT:
            await self._on_announcement(Announcement.decode(msg.body), msg)
        elif t is MessageType.ROUTE_ADVERTISEMENT:
            ad = RouteAdvertisement.decode(msg.body)
            if ad.node_id != msg.sender:
                raise EnvelopeRejected("route advertisement for another node")
            self.routes.apply(ad)
        elif t is MessageType.GOVERNANCE_DIRECTIVE:
            await self._on_directive(msg.body, msg.sender)
        elif t is MessageType.SLASHING_PROPOSAL:
            proposal = SlashingProposal.decode(msg.body)
            if len(self.proposals) < self.config.max_proposals:
                self.proposals.append((proposal, msg.sender))
            for pl in self.proposal_listeners:
                await maybe_await(pl(proposal, msg.sender))
        elif t is MessageType.GOSSIP:
            await self._on_gossip(msg)
        elif t is MessageType.RELAY_REPORT:
            report = RelayReport.decode(msg.body)
            for rl in self.report_listeners:
                await maybe_await(rl(report, msg.sender))
        elif self.ledger is not None:
            if t is MessageType.DAG_TIPS:
                await self._on_tips(DagTips.decode(msg.body), msg.sender)
            elif t is MessageType.DAG_PULL:
                await self._on_pull(DagPull.decode(msg.body), msg.sender)
            elif t is MessageType.DAG_VERTICES:
                await self._on_vertices(DagVertices.decode(msg.body), msg.sender)

    async def _on_announcement(self, ann: Announcement, msg: ControlMessage) -> None:
        if ann.node_id != msg.sender or ann.key_version != msg.key_version:
            raise EnvelopeRejected("announcement does not match its signer")
        if ann.next_key is not None:
            self.keyring.add(ann.node_id, ann.next_key, ann.next_key_version)
            self.keyring.retire_below(ann.node_id, ann.next_key_version)
            log.info("peer key rolled over", extra={
                "peer": ann.node_id, "key_version": ann.next_key_version})
        if self.peers.observe(ann, self.clock()):
            log.info("peer up", extra={"peer": ann.node_id, "role": ann.role})
            await self.flush_bundles(ann.node_id)

    # ------------------------------------------------------------------ directives

    async def _on_directive(self, body: bytes, sender: str) -> None:
        if self.governance is None:
            raise DirectiveError("no governance policy configured; directive ignored")
        signed = SignedDirective.decode(body)
        directive = self.governance.verify(signed, self.clock())
        if directive.directive_id in self.applied:
            return
        action = directive.action
        subject = getattr(action, "target", "") or getattr(action, "scope", "")
        if self.ledger is not None:
            self.ledger.anchor_directive(body, subject)
        self.applied[directive.directive_id] = directive
        while len(self.applied) > self.config.max_applied_directives:
            self.applied.popitem(last=False)
        await self._apply_builtin(action)
        for h in self.handlers:
            try:
                if isinstance(action, RateLimitUpdate):
                    await maybe_await(h.on_rate_limit(action))
                elif isinstance(action, ForceRekey):
                    await maybe_await(h.on_force_rekey(action))
                else:
                    await maybe_await(h.on_slash(action))
            except Exception as exc:  # a consumer's bug must not stop other consumers
                self.events["handler_error"] += 1
                log.exception("directive handler failed", extra={"error": str(exc)})
        metrics.DIRECTIVES.labels(directive.action_name).inc()
        log.info("directive applied", extra={
            "action": directive.action_name, "id": directive.directive_id.hex(),
            "via": sender})

    async def _apply_builtin(self, action: RateLimitUpdate | ForceRekey | SlashNotice) -> None:
        if isinstance(action, SlashNotice):
            if action.target == self.node_id:
                self.events["slashed_self"] += 1
                return
            self.keyring.revoke(action.target, f"slashed: {action.reason}")
            self.routes.drop_advertiser(action.target)
            self.peers.remove(action.target)
            if self.ledger is not None:
                self.ledger.disable_author(action.target, action.reason)
        elif isinstance(action, ForceRekey) and action.target == self.node_id and (
                self.keys.key_version < action.min_key_version or not action.min_key_version):
            await self.rekey(max(self.keys.key_version + 1, action.min_key_version))

    async def rekey(self, new_version: int) -> None:
        """Rotate our signing key: record it in the ledger (which numbers the version
        when present), announce the rollover under the old key, then sign with the new one."""
        new_key = SigningKey.generate(self.keys.signing_key.algorithm)
        if self.ledger is not None:
            new_version = self.ledger.record_key_version(new_key.public_key,
                                                         self.keys.signing_key)
        rollover = self.announcement(next_key=new_key, next_version=new_version)
        await self._publish(self.topics["announce"], MessageType.NODE_ANNOUNCEMENT,
                            rollover.encode())
        self.signer.rekey(new_key, new_version)
        self.keyring.add(self.node_id, new_key.public_key, new_version)
        self.keyring.retire_below(self.node_id, new_version)
        log.info("rekeyed", extra={"key_version": new_version})
        await self.announce()

