"""The control-plane agent: one per node; it and the parts it owns are the mesh's I/O.

It owns a :class:`~pqcnet.mesh.transport.Transport` and composes the sans-IO parts —
envelope signer/verifier, peer table, routing cache, DTN bundle store, governance
policy, ledger port — into the node's behaviour on the mesh:

* **announce** itself periodically (``announce`` topic) and expire silent peers;
* **routes**: anchor its own advertisements in its ledger, apply others' to the cache;
* **directives** (``governance`` topic, and directives other nodes anchored that
  arrive by DAG sync): the :class:`~pqcnet.mesh.applier.DirectiveApplier` verifies the
  governance threshold, refuses replays, anchors the directive in this node's ledger
  *before* any effect (no ledger, no effect), then applies the built-in effect (revoke
  a slashed key, rotate our own key on a forced rekey) and calls every registered
  :class:`~pqcnet.mesh.directives.DirectiveHandler`, counting what each really did;
* **gossip** with DTN store-and-forward (:class:`~pqcnet.mesh.gossip.Gossip`), CA-signed
  CRL updates through a :class:`~pqcnet.mesh.crl.CrlGate`; a peer's revocation gossip
  is advisory only;
* **DAG sync**: tips, pulls and vertex chunks (:class:`~pqcnet.mesh.dagsync.DagSync`).

The parts are composed, not mixed in: the agent builds each with what it needs (the
shared :class:`~pqcnet.mesh.publisher.Publisher`, peer table, counters, config and
clock) and calls them; they never reach back into the agent.

Nothing a peer sends can crash the receive loop: every message is verified first
(drops counted by reason in :attr:`ControlPlaneAgent.drops`) and every handler error
is caught, logged and counted.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable

from pqcnet._util.tasks import cancel_and_wait
from pqcnet.crypto.pqc import SigningKey, VerifyKey
from pqcnet.errors import PqcnetError
from pqcnet.mesh import metrics
from pqcnet.mesh._aio import maybe_await
from pqcnet.mesh.applier import DirectiveApplier, PartialListener
from pqcnet.mesh.config import AgentConfig
from pqcnet.mesh.crl import CRL_GOSSIP_KIND, CrlGate
from pqcnet.mesh.dagsync import DAG_MESSAGES, DagSync
from pqcnet.mesh.directives import (
    Action,
    Directive,
    DirectiveHandler,
    ForceRekey,
    GovernancePolicy,
    Outcome,
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
    now_ms,
)
from pqcnet.mesh.errors import (
    CrlRejected,
    DirectiveError,
    EnvelopeRejected,
    LedgerRejected,
    MeshError,
    TransportClosed,
    WakuError,
)
from pqcnet.mesh.gossip import Gossip, GossipListener
from pqcnet.mesh.ledger import LedgerPort
from pqcnet.mesh.messages import (
    Announcement,
    RelayReport,
    RouteAdvertisement,
    RouteEntry,
    SlashingProposal,
)
from pqcnet.mesh.offload import CryptoPool
from pqcnet.mesh.peers import PeerTable, RoutingCache
from pqcnet.mesh.publisher import Publisher
from pqcnet.mesh.transport import Subscription, Transport, WakuMessage

__all__ = ["AgentConfig", "ControlPlaneAgent", "ProposalListener", "ReportListener"]

log = logging.getLogger("pqcnet.mesh.agent")

ReportListener = Callable[[RelayReport, str], Awaitable[None] | None]
ProposalListener = Callable[[SlashingProposal, str], Awaitable[None] | None]


class ControlPlaneAgent:
    """A node's presence on the control plane.

    Its dependencies are fixed at construction, except the ledger, which may be
    attached (or replaced) later by assigning :attr:`ledger`.
    """

    def __init__(self, keys: NodeKeys, transport: Transport, keyring: Keyring, *,
                 config: AgentConfig | None = None,
                 governance: GovernancePolicy | None = None,
                 ledger: LedgerPort | None = None,
                 bundles: BundleStore | None = None,
                 crl: CrlGate | None = None,
                 crypto: CryptoPool | None = None,
                 inline_when_alone: bool = True,
                 clock: Callable[[], int] = now_ms) -> None:
        self.keys = keys
        self.transport = transport
        self.keyring = keyring
        self.config = config or AgentConfig()
        self.bundles = bundles
        self._clock = clock
        keyring.add(keys.node_id, keys.signing_key.public_key, keys.key_version)
        # senders registered in (or rotated in) our QS-DAG are known without bootstrap,
        # and senders the QS-DAG holds as slashed are refused even after a restart
        keyring.lookup = self._ledger_key
        keyring.denied = self._ledger_denied
        self.signer = EnvelopeSigner(keys)
        self.verifier = EnvelopeVerifier(keyring, [keys.recipient_key], self.config.verifier)
        # ``crypto``: sign and seal on its threads (owned and closed by the caller);
        # ``inline_when_alone``: see :mod:`pqcnet.mesh.publisher` (a node carrying
        # traffic on the same loop turns it off)
        self.publisher = Publisher(transport, self.signer, namespace=self.config.namespace,
                                   clock=clock, crypto=crypto,
                                   inline_when_alone=inline_when_alone)
        self.topics = self.publisher.topics
        self.my_inbox = self.publisher.inbox(keys.node_id)
        self.peers = PeerTable(expiry_ms=self.config.peer_expiry_ms)
        self.routes = RoutingCache()
        self.report_listeners: list[ReportListener] = []
        self.proposal_listeners: list[ProposalListener] = []
        self.proposals: list[tuple[SlashingProposal, str]] = []
        #: non-verifier events: handler errors, rejected directives, publish failures
        #: (shared with the parts below, which count into it too)
        self.events: Counter[str] = Counter()
        self.directives = DirectiveApplier(governance, self._builtin, clock=clock,
                                           events=self.events,
                                           max_applied=self.config.max_applied_directives)
        self._gossip = Gossip(self.publisher, self.peers, self.verifier, bundles,
                              self.config, clock, self.events, crl=crl)
        self._dagsync: DagSync | None = None
        self._ledger: LedgerPort | None = None
        self.ledger = ledger
        self._route_version = 0
        self._sub: Subscription | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._last_announce = 0
        #: consecutive failed announcements, and when we last logged about them
        self._announce_failures = 0
        self._announce_logged_ms = 0

    @property
    def clock(self) -> Callable[[], int]:
        """Milliseconds since the epoch (fixed at construction: the parts share it)."""
        return self._clock

    @property
    def ledger(self) -> LedgerPort | None:
        """The ledger port, if any; assigning one (re)builds the DAG sync part."""
        return self._ledger

    @ledger.setter
    def ledger(self, port: LedgerPort | None) -> None:
        self._ledger = port
        self._dagsync = (None if port is None else
                         DagSync(port, self.publisher, self.peers, self.config, self._clock,
                                 self.events))
        loaded = self.directives.attach(port)
        if loaded:
            log.info("directive replay window reloaded from the ledger",
                     extra={"directives": loaded})

    @property
    def crl(self) -> CrlGate | None:
        """The CA's CRL as gossiped (None: CRL gossip is refused as unverifiable)."""
        return self._gossip.crl

    @crl.setter
    def crl(self, gate: CrlGate | None) -> None:
        self._gossip.crl = gate

    @property
    def governance(self) -> GovernancePolicy | None:
        """The governance keys and threshold directives are checked against."""
        return self.directives.policy

    @governance.setter
    def governance(self, policy: GovernancePolicy | None) -> None:
        self.directives.policy = policy

    @property
    def handlers(self) -> list[DirectiveHandler]:
        """Directive consumers, called after anchoring (append to it)."""
        return self.directives.handlers

    @handlers.setter
    def handlers(self, value: list[DirectiveHandler]) -> None:
        self.directives.handlers[:] = value

    @property
    def applied(self) -> OrderedDict[bytes, Directive]:
        """Directive ids anchored and dispatched here (the replay window)."""
        return self.directives.applied

    @property
    def partial_listeners(self) -> list[PartialListener]:
        """Called with directives under the governance threshold (cosigning)."""
        return self.directives.partial_listeners

    @property
    def gossip_listeners(self) -> list[GossipListener]:
        """Called with (item, sender) for every fresh gossip item (append to it)."""
        return self._gossip.listeners

    def _ledger_key(self, node_id: str, key_version: int) -> VerifyKey | None:
        return self.ledger.key_for(node_id, key_version) if self.ledger is not None else None

    def _ledger_denied(self, node_id: str) -> str | None:
        if self.ledger is None or node_id == self.node_id:
            return None
        try:
            return "slashed (QS-DAG)" if self.ledger.is_disabled(node_id) else None
        except PqcnetError:  # a name the ledger cannot hold is not one it slashed
            return None

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
        try:
            await cancel_and_wait(*self._tasks)
        finally:  # the subscription and transport close even when this is cancelled
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
                    await self._gossip.flush(dest)
        if self._dagsync is not None and self._dagsync.due(now):
            await self._dagsync.publish_tips()
        if self.ledger is not None:
            await self.directives.retry_pending()
            for body in self.ledger.take_synced_directives():
                await self._receive_directive(body, "ledger", synced=True)

    # ------------------------------------------------------------------ publishing

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
            await self.publisher.publish(self.topics["announce"], MessageType.NODE_ANNOUNCEMENT,
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
        await self.publisher.publish(self.topics["routes"], MessageType.ROUTE_ADVERTISEMENT,
                                     ad.encode())
        return ad

    async def issue_directive(self, signed: SignedDirective) -> None:
        """Publish a (threshold-)signed directive to the governance topic and process it
        here like any received one (a local refusal is counted, not raised)."""
        await self.publisher.publish(self.topics["governance"],
                                     MessageType.GOVERNANCE_DIRECTIVE, signed.encode())
        await self._receive_directive(signed.encode(), self.node_id)

    async def publish_crl(self, pem: bytes, *, ttl_ms: int | None = None) -> bytes:
        """Apply the CA-signed CRL ``pem`` here, then gossip it (absent peers get it on
        return). Raises :class:`~pqcnet.mesh.errors.CrlRejected` if it is not the CA's
        or not newer than ours. Returns the gossip message id."""
        if self.crl is None:
            raise CrlRejected("no trust bundle configured to check CRLs against",
                              reason="crl_unverifiable")
        crl = await self.crl.offer(pem, self.node_id)
        if ttl_ms is None and crl.next_update is not None:
            left = int(crl.next_update.timestamp() * 1000) - self.clock()
            ttl_ms = left if left > 0 else None
        return await self.gossip(CRL_GOSSIP_KIND, pem, ttl_ms=ttl_ms)

    async def propose_slashing(self, proposal: SlashingProposal) -> None:
        await self.publisher.publish(self.topics["governance"], MessageType.SLASHING_PROPOSAL,
                                     proposal.encode())

    async def publish_report(self, report: RelayReport) -> None:
        """Relayers: publish a volume proof / performance report."""
        await self.publisher.publish(self.topics["relay-reports"], MessageType.RELAY_REPORT,
                                     report.encode())

    async def gossip(self, kind: str, payload: bytes, *, ttl_ms: int | None = None,
                     destination: str = "") -> bytes:
        """Originate a gossip item (to ``destination`` only, if given); returns its
        message id. Absent peers get it as a DTN bundle."""
        return await self._gossip.originate(kind, payload, ttl_ms=ttl_ms,
                                            destination=destination)

    async def flush_bundles(self, dest: str) -> int:
        """Forward every unexpired bundle held for ``dest``; returns how many went out."""
        return await self._gossip.flush(dest)

    async def publish_tips(self) -> None:
        """Tell the mesh what our ledger's tips are (nothing without a ledger)."""
        if self._dagsync is not None:
            await self._dagsync.publish_tips()

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
            await self.directives.receive(msg.body, msg.sender)
        elif t is MessageType.SLASHING_PROPOSAL:
            proposal = SlashingProposal.decode(msg.body)
            if len(self.proposals) < self.config.max_proposals:
                self.proposals.append((proposal, msg.sender))
            for pl in self.proposal_listeners:
                await maybe_await(pl(proposal, msg.sender))
        elif t is MessageType.GOSSIP:
            await self._gossip.on_message(msg)
        elif t is MessageType.RELAY_REPORT:
            report = RelayReport.decode(msg.body)
            for rl in self.report_listeners:
                await maybe_await(rl(report, msg.sender))
        elif t in DAG_MESSAGES and self._dagsync is not None:
            await self._dagsync.handle(msg)

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
            await self._gossip.flush(ann.node_id)

    # ------------------------------------------------------------------ directives

    async def _receive_directive(self, body: bytes, via: str, *, synced: bool = False) -> None:
        """Hand a directive to the applier; a refusal is counted there and logged here."""
        try:
            await self.directives.receive(body, via, synced=synced)
        except (DirectiveError, LedgerRejected) as exc:
            self.events["directive_rejected"] += 1
            log.warning("directive refused", extra={"via": via, "error": str(exc)})

    async def _builtin(self, action: Action) -> Outcome:
        """The agent's own effect of a directive (the ``mesh`` outcome)."""
        if isinstance(action, SlashNotice):
            if action.target == self.node_id:
                self.events["slashed_self"] += 1
                return Outcome.IGNORED
            self.keyring.revoke(action.target, f"slashed: {action.reason}")
            self.routes.drop_advertiser(action.target)
            self.peers.remove(action.target)
            if self.ledger is not None:
                self.ledger.disable_author(action.target, action.reason)
            return Outcome.APPLIED
        if isinstance(action, ForceRekey) and action.target == self.node_id and (
                self.keys.key_version < action.min_key_version or not action.min_key_version):
            await self.rekey(max(self.keys.key_version + 1, action.min_key_version))
            return Outcome.APPLIED
        return Outcome.IGNORED

    async def rekey(self, new_version: int) -> None:
        """Rotate our signing key: record it in the ledger (which numbers the version
        when present), announce the rollover under the old key, then sign with the new one."""
        new_key = SigningKey.generate(self.keys.signing_key.algorithm)
        if self.ledger is not None:
            new_version = self.ledger.record_key_version(new_key.public_key,
                                                         self.keys.signing_key)
        rollover = self.announcement(next_key=new_key, next_version=new_version)
        await self.publisher.publish(self.topics["announce"], MessageType.NODE_ANNOUNCEMENT,
                                     rollover.encode())
        self.signer.rekey(new_key, new_version)
        self.keyring.add(self.node_id, new_key.public_key, new_version)
        self.keyring.retire_below(self.node_id, new_version)
        log.info("rekeyed", extra={"key_version": new_version})
        await self.announce()

