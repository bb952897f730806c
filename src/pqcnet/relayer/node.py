"""The relayer node: composes bus, workers, ingress, overflow, backpressure, metering,
proofs, Prometheus and the governance gRPC service — and nothing else.

Background tasks it owns (all cancelled on :meth:`RelayerNode.stop`):

* one :class:`~pqcnet.relayer.worker.RelayerShardWorker` per owned shard;
* the overflow replayer (:meth:`BufferedPublisher.run`);
* the flow loop: every ``backpressure_interval`` s, backlog = bus lag + overflow depth
  per shard → :class:`FlowController` → FLOW PAUSE/RESUME on publisher tunnels;
* the epoch loop: each closed epoch → signed volume proof(s) → intent recorded →
  anchored in the QS-DAG → proof files → intent cleared (see
  :mod:`pqcnet.relayer.proofstore`: a crash anywhere anchors an epoch exactly once).

If the bus cannot be reached at start (a broker outage), the relayer starts
**degraded** instead of failing: ingress accepts into the overflow queue, a
``bus-connect`` task retries with capped backoff, and once the bus answers the workers
and the overflow replayer start and drain the queue in order. ``degraded`` (and the
``pqcnet_relayer_degraded`` gauge, and the ``ready`` line of ``pqcnet relayer run``)
says so meanwhile; no epoch is proven while degraded.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import inspect
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pqcnet._util.confdiff import changed_keys, plain
from pqcnet._util.env import env_passphrase
from pqcnet._util.ops_http import not_expired, start_ops_server
from pqcnet.errors import PqcnetError
from pqcnet.identity import NodeIdentity, SpiffeId
from pqcnet.identity.policy import compile_layouts
from pqcnet.qsdag import Ledger
from pqcnet.qstp import aio
from pqcnet.qstp.aio.forward import serve_forward
from pqcnet.qstp.aio.tunnel import openssl_checked
from pqcnet.qstp.budget import budget_metrics
from pqcnet.qstp.config import QstpConfiguration
from pqcnet.qstp.tls import TlsPolicy
from pqcnet.relayer.authz import Authorizer, Quotas, authz_policy
from pqcnet.relayer.backpressure import FlowController
from pqcnet.relayer.bus.base import Bus
from pqcnet.relayer.bus.embedded import EmbeddedBus
from pqcnet.relayer.bus.leases import OwnershipJournal
from pqcnet.relayer.cluster_quotas import ClusterQuotas
from pqcnet.relayer.config import RelayerConfig
from pqcnet.relayer.counters import (
    ClaimCheck,
    CounterBook,
    CounterStore,
    SignedAckCounter,
    Tolerance,
    ca_trust,
    check_claims,
)
from pqcnet.relayer.egress import SubscriberHub
from pqcnet.relayer.errors import (
    BusError,
    BusUnavailable,
    ConfigError,
    FrameRejected,
    ProofError,
    ReceiptRefused,
    RelayerError,
)
from pqcnet.relayer.frame import Frame, FrameLimits, Topic, decode
from pqcnet.relayer.gapfence import GapFence, SeqRanges
from pqcnet.relayer.governance import VolumeMetricsService, serve_governance
from pqcnet.relayer.ingress import Ingress
from pqcnet.relayer.ledger_api import LedgerService
from pqcnet.relayer.metering import VolumeMeter, VolumeRecord
from pqcnet.relayer.overflow import BufferedPublisher, OverflowQueue
from pqcnet.relayer.proof import (
    LedgerAnchor,
    PerformanceReport,
    VolumeProof,
    build_volume_proofs,
    check_records,
    sign_report,
    split_records,
)
from pqcnet.relayer.proofstore import Intent, ProofStore
from pqcnet.relayer.receipts import VolumeReceipt, build_receipt
from pqcnet.relayer.seqstore import RedisSeqStore, RocksSeqStore, SeqStore, client_name
from pqcnet.relayer.settlement import Settlement, bounded, families, settlement
from pqcnet.relayer.worker import RelayerShardWorker, WorkerConfig

log = logging.getLogger(__name__)
#: seconds one lag() sample may take before the last known value is used
LAG_TIMEOUT = 1.0
#: seconds shard workers get on stop to finish their current step
STOP_GRACE = 3.0
#: seconds connecting the bus may take at start before the relayer starts degraded
BUS_START_TIMEOUT = 10.0
#: signed receipts kept for repeated requests (building one hashes its epoch's tree)
RECEIPT_CACHE = 256
#: seconds a proven epoch's records read back for a governance pull stay cached
RECORDS_CACHE_IDLE = 30.0


def make_bus(cfg: RelayerConfig, data_dir: Path) -> Bus:
    """The configured backend (not yet started)."""
    if cfg.backend == "redis":
        from pqcnet.relayer.bus.redis_streams import RedisStreamsBus

        return RedisStreamsBus(cfg.redis_url, cfg.shards, prefix=cfg.redis_prefix,
                               consumer=cfg.node_id, op_timeout=cfg.publish_timeout,
                               max_len=cfg.redis_max_len,
                               lease=cfg.redis_lease if cfg.redis_leases else None)
    if cfg.backend == "kafka":
        from pqcnet.relayer.bus.kafka import KafkaBus

        return KafkaBus(cfg.kafka_bootstrap, cfg.shards, topic=cfg.kafka_topic,
                        owned=cfg.shards_owned, client_id=cfg.node_id,
                        commit_interval=cfg.kafka_commit_interval,
                        rebalance=cfg.rebalancing,
                        session_timeout=cfg.kafka_session_timeout,
                        instance_id=cfg.node_id if cfg.kafka_static_membership else None)
    return EmbeddedBus(data_dir / "bus", cfg.shards, sync=cfg.sync)


def shared_marks(cfg: RelayerConfig, bus: Bus) -> RedisSeqStore:
    """Dedup marks and metered volume in Redis for a Kafka cluster (``redis_url``); when
    the group rebalances, writes are fenced by the partitions' owner keys (decision
    0025: a stale member neither moves the marks nor meters)."""
    import redis.asyncio as aioredis

    from pqcnet.relayer.bus.kafka import KafkaBus
    from pqcnet.relayer.bus.kafka_owners import PartitionOwners

    client = aioredis.from_url(cfg.redis_url, socket_connect_timeout=cfg.publish_timeout,
                               client_name=client_name(cfg.node_id, "marks"))
    fence = None
    if isinstance(bus, KafkaBus) and bus.rebalance:
        bus.owners = PartitionOwners(client, cfg.redis_prefix, bus.owner_token)
        fence = bus.owners.fence
    return RedisSeqStore(client, cfg.redis_prefix, cfg.node_id, fence=fence)


def make_quotas(cfg: RelayerConfig) -> Quotas:
    """This host's quota buckets, or (``quota_scope: cluster``) the cluster's in Redis."""
    if cfg.quota_scope == "host":
        return Quotas(cfg.quotas)
    import redis.asyncio as aioredis

    client = aioredis.from_url(cfg.redis_url, socket_connect_timeout=cfg.publish_timeout,
                               client_name=client_name(cfg.node_id, "quotas"))
    return ClusterQuotas(cfg.quotas, client, cfg.redis_prefix, timeout=cfg.publish_timeout)


def _identity_passphrase(cfg: RelayerConfig) -> bytes | None:
    if not cfg.identity_passphrase_env:
        return None
    return env_passphrase(cfg.identity_passphrase_env,
                          missing=lambda msg: ConfigError(f"identity_passphrase_env: {msg}"))


def _sibling(directory: Path, tag: str) -> Path:
    return directory.with_name(f".{directory.name}.{tag}")


def load_identity(cfg: RelayerConfig) -> NodeIdentity:
    """The node identity named by the config.

    If a crash fell between the two renames of :func:`save_identity` (no
    ``identity_dir``, a complete ``.<name>.rekey`` beside it), the swap is finished here.
    """
    if not cfg.identity_dir:
        raise ConfigError("identity_dir: required to run a relayer")
    directory = Path(cfg.identity_dir)
    staged = _sibling(directory, "rekey")
    if not directory.exists() and staged.is_dir():
        staged.rename(directory)
    return NodeIdentity.load(directory, _identity_passphrase(cfg))


def save_identity(cfg: RelayerConfig, identity: NodeIdentity) -> None:
    """Replace ``identity_dir`` with ``identity`` as a whole (blocking; fsyncs).

    The key is encrypted like the original (``identity_passphrase_env``). The new
    identity is written complete into a sibling directory, then the old directory is
    renamed away and the new one into place, so a reader sees the old identity or the
    new one — never a new key with an old certificate (which ``load`` refuses).
    """
    directory = Path(cfg.identity_dir)
    staged, previous = _sibling(directory, "rekey"), _sibling(directory, "prev")
    shutil.rmtree(staged, ignore_errors=True)
    shutil.rmtree(previous, ignore_errors=True)
    identity.save(staged, _identity_passphrase(cfg))
    NodeIdentity.load(staged, _identity_passphrase(cfg))  # readable before it replaces
    directory.rename(previous)
    staged.rename(directory)
    fd = os.open(directory.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the renames themselves are durable
    finally:
        os.close(fd)
    shutil.rmtree(previous, ignore_errors=True)


def _read_tls(cfg: RelayerConfig) -> tuple[bytes, bytes] | None:
    if not cfg.grpc_tls_cert:
        return None
    try:
        return Path(cfg.grpc_tls_key).read_bytes(), Path(cfg.grpc_tls_cert).read_bytes()
    except OSError as exc:
        raise ConfigError(f"grpc_tls_cert/key: {exc.filename}: {exc.strerror}") from None


class RelayerNode:
    """One running relayer."""

    def __init__(self, cfg: RelayerConfig, identity: NodeIdentity,
                 policy: TlsPolicy | None = None, *, reuse_port: bool = False,
                 own_port: int | None = None, quotas: Quotas | None = None) -> None:
        self.cfg, self.identity, self.policy = cfg, identity, policy or TlsPolicy()
        #: SO_REUSEPORT on the QSTP listener (``relayer run --workers N``) ...
        self.reuse_port = reuse_port
        #: ... and a port of this worker alone (0: any free one), where subscribers reach
        #: the shards it owns; bound port in :attr:`own_port` once listening
        self.own_port = own_port
        if cfg.spiffe_layouts:  # peers' SPIFFE IDs of other shapes: read tenant/role
            self.policy = dataclasses.replace(
                self.policy, spiffe_layouts=compile_layouts(cfg.spiffe_layouts))
        self.data_dir = Path(cfg.data_dir)
        self.registry = CollectorRegistry()
        self.meter = VolumeMeter(cfg.epoch_seconds, registry=self.registry,
                                 max_label_series=cfg.metrics_max_label_series)
        self.meter.sealed_records = self._proven_records
        #: the records of the proven epoch read last (epoch, records, monotonic time of
        #: the last use): a governance pull pages through one epoch at a time; dropped
        #: by the epoch loop once unused for RECORDS_CACHE_IDLE seconds
        self._records_cache: tuple[int, tuple[VolumeRecord, ...], float] | None = None
        self.flow = FlowController(cfg.high_water, cfg.low_water)
        self.hub = SubscriberHub(ack_timeout=cfg.subscriber_ack_timeout)
        #: True while the bus has not been reached since start: frames go to the overflow
        #: queue only, no shard workers, no epoch proofs (readiness: degraded)
        self.degraded = False
        #: static config keys a reload found changed (they apply at a restart)
        self.restart_pending: list[str] = []
        #: late-frame refusal, shared by ingress and shard workers (decision 0012)
        self._shard_set = frozenset(cfg.shards_owned)
        self.fence = GapFence(self._stored_marks, self._stored_gaps, owns=self._owns,
                              assigned=self._assigned)
        self.authz = Authorizer(authz_policy(cfg.authz))
        #: per-customer quotas (``relayer run --workers N``: shared by the workers;
        #: ``quota_scope: cluster``: drawn from the cluster's Redis)
        self.quotas = quotas if quotas is not None else make_quotas(cfg)
        self.hub.may_receive = self.authz.may_receive
        self.hub.on_generation = self._look_at_parked
        self.proofs: dict[int, VolumeProof] = {}
        """epoch -> its proof's header (part 0 when the epoch was split over several
        trees); the records are in the proof files (:meth:`proof_parts`)"""
        self._parts: dict[int, tuple[VolumeProof, ...]] = {}
        #: epoch -> customer -> [bytes, frames] of its signed records (settlement's
        #: "proved"), so a proven epoch's per-topic records leave memory
        self._proved: dict[int, dict[str, list[int]]] = {}
        self.proof_store = ProofStore(self.data_dir / "proofs")
        #: clients' signed ack counters (decision 0014), checked against our claims
        self.counters = CounterBook(ca_trust(identity.trust_anchors))
        self.counter_store = CounterStore(self.data_dir / "counters")
        self.tolerance = Tolerance(cfg.counter_tolerance_ratio, cfg.counter_tolerance_frames)
        #: proven records by claim status, counted once per epoch by audit_claims()
        self.claim_stats: collections.Counter[str] = collections.Counter()
        self._audited: set[int] = set()
        self._receipts: collections.OrderedDict[tuple[str, int], VolumeReceipt] = (
            collections.OrderedDict())
        self.backlog: dict[int, int] = {}
        self._bus_lag: dict[int, int] = {}
        self.started_at = 0.0
        self.port = 0
        #: the QSTP settings of the ingress: per-tunnel windows and the budget all
        #: tunnels share (one per process, so /metrics reads it)
        self.qstp_config = QstpConfiguration().with_buffer(cfg.tunnel_buffer_bytes,
                                                           cfg.tunnel_buffer_total_bytes)
        self.metrics_port: int | None = None
        self.grpc_port: int | None = None
        #: bound port of the QSTP governance listener (None: off)
        self.governance_qstp_port: int | None = None
        self.workers: list[RelayerShardWorker] = []
        self._tasks: list[asyncio.Task[None]] = []
        #: a Kafka cluster with redis_url: its group's assignment changes, journalled
        self._journal: OwnershipJournal | None = None
        #: everything opened by start(), closed newest first by stop()
        self._stack = contextlib.AsyncExitStack()
        self._server: aio.Server | None = None
        #: identity rotations done while running (forced rekeys)
        self.rekeys = 0
        self.bus: Bus
        self.ingress: Ingress
        self.publisher: BufferedPublisher
        self.overflow: OverflowQueue
        self.anchor: LedgerAnchor
        self.store: SeqStore

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Open everything and start serving; raises :class:`RelayerError` on failure
        (after closing whatever had been opened)."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise
        log.info("relayer up", extra={"node": self.cfg.node_id, "port": self.port,
                                      "backend": self.cfg.backend, "shards": len(self.workers)})

    async def _start(self) -> None:
        cfg, stack = self.cfg, self._stack
        # QSTP's one-off OpenSSL self-check (a child process) runs while the stores open:
        # it is a large part of a restart's time to ready (the recovery benchmark)
        selfcheck = asyncio.create_task(openssl_checked(), name="openssl-selfcheck")
        stack.callback(selfcheck.cancel)  # a failed start does not leave it behind
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.started_at = time.time()
        # closed after the bus: its close revokes the group's partitions, which the
        # ownership journal writes with the shared marks' Redis client
        after_bus = contextlib.AsyncExitStack()
        stack.push_async_callback(after_bus.aclose)
        self.bus = make_bus(cfg, self.data_dir)
        self.bus.on_assignment = self._assignment_changed
        self.bus.on_moved = self._shards_moved
        stack.push_async_callback(_quietly, self.bus.close)
        store = self.bus.seq_store()
        if store is None and cfg.backend == "kafka" and cfg.redis_url:
            # a cluster's shared marks and volume: they move with a partition
            shared = shared_marks(cfg, self.bus)
            after_bus.push_async_callback(_quietly, shared.aclose)
            store = shared
            # who owned which partition when, next to the marks (Redis leases journal
            # their own changes); the last revokes' entries best effort
            if cfg.rebalancing:
                self._journal = OwnershipJournal(shared.client, cfg.redis_prefix,
                                                 cfg.node_id)
                after_bus.push_async_callback(_quietly, self._journal.close, STOP_GRACE)
        elif store is None and cfg.rebalancing:
            log.warning("kafka cluster with node-local dedup marks: a partition taken "
                        "over replays to subscribers (their cursor drops it) and may be "
                        "metered twice; set redis_url for shared marks")
        if store is None:
            rocks = RocksSeqStore(self.data_dir / "marks", sync=cfg.sync)
            stack.push_async_callback(_quietly, rocks.close)
            store = rocks
        self.store = store
        if isinstance(self.quotas, ClusterQuotas):
            stack.push_async_callback(_quietly, self.quotas.aclose)
        if isinstance(store, RedisSeqStore):  # shared by a cluster: skips agreed there
            self.fence.confirmer = store.agreement.confirm
        self.overflow = OverflowQueue(self.data_dir / "overflow", cfg.shards,
                                      max_records=cfg.overflow_max_records, sync=cfg.sync)
        stack.push_async_callback(_quietly, self.overflow.close)
        self.publisher = BufferedPublisher(self.bus, self.overflow,
                                           publish_timeout=cfg.publish_timeout)
        self.ingress = Ingress(self.publisher, self.hub,
                               limits=FrameLimits(cfg.max_payload, cfg.max_id),
                               retry_after=cfg.retry_after, fence=self.fence,
                               authz=self.authz, quotas=self.quotas, services=self)
        self._open_ledger()
        self._load_proofs()
        self.counter_store.load(self.counters)
        stack.callback(self._save_counters)
        try:
            async with asyncio.timeout(BUS_START_TIMEOUT):
                await self._open_bus()
        except (BusError, TimeoutError) as exc:
            if isinstance(exc, BusError) and not exc.retriable:
                raise
            # degraded start: accept into the overflow queue, connect in the background
            self.degraded = True
            self.publisher.bus_down = True
            log.warning("bus unavailable at start: degraded (overflow queue only)",
                        extra={"backend": cfg.backend, "error": str(exc) or "timeout"})
            self._tasks.append(asyncio.create_task(self._connect_bus(), name="bus-connect"))
        else:
            self._start_workers()
        self._tasks.append(asyncio.create_task(self._flow_loop(), name="flow"))
        self._tasks.append(asyncio.create_task(self._epoch_loop(), name="epochs"))
        await selfcheck
        await self._listen(cfg.listen_port)
        stack.push_async_callback(_quietly, self._close_server)
        if cfg.metrics_port is not None:
            self.registry.register(_NodeCollector(self))
            httpd = start_ops_server(cfg.metrics_port, cfg.metrics_host,
                                     registry=self.registry, ready=self.ready)
            self.metrics_port = httpd.port
            stack.push_async_callback(_quietly, httpd.server_close)
            stack.push_async_callback(_quietly, httpd.shutdown)
        if cfg.grpc_port is not None:
            tls = _read_tls(cfg)
            service = VolumeMetricsService(self.meter, self.report)
            anchors = Path(cfg.ledger_anchors) if cfg.ledger_anchors else None
            grpc_server, self.grpc_port = await serve_governance(
                service, cfg.grpc_host, cfg.grpc_port, tls=tls,
                ledger=LedgerService(self.anchor.ledger, anchors))
            stack.push_async_callback(_quietly, grpc_server.stop, 0.5)
        if cfg.governance_qstp_port is not None:
            assert self.grpc_port is not None  # the config requires grpc_port
            gov = await serve_forward(
                cfg.grpc_host, self.grpc_port, cfg.listen_host, cfg.governance_qstp_port,
                self.identity, replace(self.policy,
                                       allowed_peers=tuple(cfg.governance_allowed_peers)))
            self.governance_qstp_port = gov.port
            stack.push_async_callback(_quietly, _close_qstp, gov)

    def _assignment_changed(self, gained: set[int], lost: set[int]) -> None:
        """A step of a Kafka group's assignment change goes to the ownership journal
        (Redis leases journal their own), in the order the steps came: an eager
        rebalance's revoke and the next assignment's claim of the same partition."""
        if self._journal is not None:
            for shards, event in ((gained, "claimed"), (lost, "released")):
                if shards:
                    self._journal.post(shards, event)

    def _shards_moved(self, came: set[int], went: set[int]) -> None:
        """A cluster's shards moved for good (``Bus.on_moved``). What this process
        registered in flight for a shard that went is dropped now: the new owner reads
        those frames, never this one (the gauge stayed up until the shard's next
        admission here, which may never come). A shard that came gets its frames still
        in this process's overflow queue registered, as at a start (``restore``): a bus
        outage both queues acknowledged frames and moves shards, and without it the
        worker could skip the gap of an acknowledged, queued frame. A Kafka partition
        revoked and handed straight back by an eager rebalance neither came nor went:
        its registrations stay (dropping them would reopen the gap race)."""
        self.fence.forget_shards(went)
        if came and self.workers:  # before the workers start, _start_workers does it
            restored = sum(self.fence.restore(s, self._queued(s)) for s in sorted(came))
            if restored:
                log.info("overflow frames of shards that came here held in flight",
                         extra={"frames": restored, "shards": sorted(came)})

    async def _open_bus(self) -> None:
        """Connect the bus and load what this node metered before (raises if down)."""
        await self.bus.start()
        if not await self.bus.healthy():
            raise BusUnavailable(f"{self.cfg.backend} bus not answering")
        self.meter.apply(await self.store.load_volume())  # counted before a restart
        self._seal_proven()

    def _start_workers(self) -> None:
        """Shard workers and the overflow replayer (the bus is connected)."""
        cfg = self.cfg
        wcfg = WorkerConfig(group=cfg.group, batch=cfg.batch, max_reorder=cfg.max_reorder,
                            gap_timeout=cfg.gap_timeout, max_topics=cfg.max_topics,
                            park_max_records=cfg.park_max_records,
                            idle_poll_timeout=cfg.idle_poll_timeout)
        agreement = self.store.agreement if isinstance(self.store, RedisSeqStore) else None
        self.workers = [RelayerShardWorker(self.bus, s, self.store, self.hub, wcfg,
                                           meter=self.meter, fence=self.fence,
                                           agreement=agreement)
                        for s in cfg.shards_owned]
        # frames acknowledged before a restart and still queued hold their gaps too
        restored = sum(self.fence.restore(w.shard, self._queued(w.shard)) for w in self.workers)
        if restored:
            log.info("overflow frames from before the start held in flight",
                     extra={"frames": restored})
        self._tasks += [asyncio.create_task(w.run(), name=f"shard-{w.shard}")
                        for w in self.workers]
        self._tasks.append(asyncio.create_task(self.publisher.run(), name="overflow-replay"))

    def _queued(self, shard: int) -> Iterator[Frame]:
        """The overflow queue's frames of ``shard`` (a corrupt record is the worker's to
        report when the replay brings it to the bus)."""
        for rec in self.overflow.scan(shard):
            try:
                yield decode(rec)
            except FrameRejected:
                continue

    async def _connect_bus(self) -> None:
        """Degraded start: retry the bus with capped backoff, then run normally (the
        overflow replayer drains what was accepted meanwhile, in order)."""
        backoff = 0.2
        while True:
            await asyncio.sleep(backoff)
            try:
                async with asyncio.timeout(BUS_START_TIMEOUT):
                    await self._open_bus()
            except (BusError, TimeoutError) as exc:
                backoff = min(backoff * 2, 5.0)
                log.info("bus still unavailable", extra={"error": str(exc) or "timeout"})
                continue
            self._start_workers()
            self.degraded = False
            me = asyncio.current_task()
            if me in self._tasks:  # finished, not failed: not a stopped worker for ready()
                self._tasks.remove(me)
            log.warning("bus connected: leaving degraded mode",
                        extra={"backend": self.cfg.backend, "overflow": self.overflow.total()})
            return

    async def _stored_marks(self, shard: int, topics: Sequence[Topic]) -> dict[Topic, int]:
        """Durable next seqs for the gap fence (a shard's worker may live elsewhere).

        Never blocks ingress on the broker: while the bus is down or degraded (the marks
        store may be that broker, e.g. Redis) or the read fails or times out, none are
        known and the fence uses the local workers' in-memory marks only.
        """
        if self.degraded or self.publisher.bus_down:
            return {}
        try:
            async with asyncio.timeout(self.cfg.publish_timeout):
                return await self.store.load_topics(shard, topics)
        except (BusError, TimeoutError) as exc:
            log.info("marks unreadable for the gap fence; local marks only",
                     extra={"shard": shard, "error": str(exc) or "timeout"})
            return {}

    def _look_at_parked(self) -> None:
        """A subscriber joined or the grants changed: a worker with parked topics looks
        at them now instead of after its consume wait (``poll_timeout``): every bus ends
        that wait (Redis with ``CLIENT UNBLOCK``), best effort."""
        for w in self.workers:
            if w.parked_topics:
                self.bus.interrupt(w.shard)

    def _owns(self, shard: int) -> bool:
        """A shard worker of this process takes ``shard``'s records now, or will once
        a degraded start reaches the bus (the gap fence registers admissions in flight
        only then)."""
        return shard in self._shard_set and (self.degraded or self.bus.owns(shard))

    def _assigned(self, shard: int) -> bool:
        """:meth:`_owns` until an ownership change says otherwise (``Bus.in_assignment``: a
        Redis lease running late on its renewal is still assigned): what the gap fence's
        in-flight registry follows."""
        return shard in self._shard_set and (self.degraded or self.bus.in_assignment(shard))

    async def _stored_gaps(self, shard: int, topics: Sequence[Topic]) -> Mapping[Topic, SeqRanges]:
        """Recorded skipped ranges for the gap fence, read only for a *retry* below the
        delivery point. Unlike the marks, an unanswered read refuses the retry
        (retriable): accepting it unchecked could acknowledge a frame in a skipped gap
        that is then suppressed as a duplicate."""
        if self.degraded or self.publisher.bus_down:
            raise BusUnavailable("marks store unreachable: a retry below the delivery point "
                                 "cannot be checked against skipped gaps now")
        try:
            async with asyncio.timeout(self.cfg.publish_timeout):
                return await self.store.load_gaps(shard, topics)
        except TimeoutError:
            raise BusUnavailable("marks store timed out: a retry below the delivery point "
                                 "cannot be checked against skipped gaps now") from None

    def ready(self) -> dict[str, bool | str]:
        """``/readyz``: listening, identity valid, every shard worker and the overflow
        replay alive (a worker that died on a bus error makes the node unready)."""
        dead = sorted(t.get_name() for t in self._tasks if t.done())
        return {"listening": self._server is not None or "not listening",
                "identity": not_expired(self.identity.not_after),
                "workers": not dead or f"stopped: {', '.join(dead)}"}

    async def _listen(self, port: int) -> None:
        server = await aio.serve(
            self.ingress.handle_tunnel, self.cfg.listen_host, port, self.identity,
            self.policy, reuse_port=self.reuse_port,
            config=self.qstp_config, max_tunnels=self.cfg.max_tunnels)
        self._server, self.port = server, server.port
        if self.own_port is not None:
            self.own_port = await server.listen_also(self.cfg.listen_host, self.own_port)

    async def _close_server(self) -> None:
        """Close the QSTP server in use (GOAWAY on its tunnels)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await asyncio.wait_for(server.wait_closed(), 5)

    @property
    def server(self) -> aio.Server | None:
        """The QSTP server while running (identity reload binds to it)."""
        return self._server

    async def rotate_identity(self, identity: NodeIdentity) -> None:
        """Switch to ``identity`` (a new key + certificate) while running.

        Records nothing: whoever rotated the key (the control-plane agent after a
        ForceRekey) already recorded the new key version in this node's QS-DAG, so the
        next volume proofs and reports — signed with the new key from now on — are
        accepted there. Then the QSTP server rotates (``Server.rotate_identity``: GOAWAY
        on every tunnel, the publisher and subscriber SDKs reconnect to the same port
        and meet the new certificate). Frames in flight are safe: acked ones are on the bus, the
        unacked ones are retried by the publisher. Last, the new identity replaces
        ``identity_dir`` on disk (:func:`save_identity`), so a restart presents the key
        the ledger now expects; if that write fails the node runs on the new identity
        and :class:`RelayerError` says it was not saved.
        """
        if self._server is None:
            raise RelayerError("relayer is not running")
        self.identity = identity
        self.anchor.signer = identity.key
        await self._server.rotate_identity(identity, reason="relayer identity rotated")
        self.rekeys += 1
        log.info("relayer identity rotated", extra={
            "node": self.cfg.node_id, "port": self.port, "serial": identity.serial})
        try:
            await asyncio.to_thread(save_identity, self.cfg, identity)
        except (OSError, PqcnetError) as exc:
            log.error("rotated identity not written to identity_dir",
                      extra={"node": self.cfg.node_id, "error": str(exc)})
            raise RelayerError(f"identity rotated but not saved to {self.cfg.identity_dir}: "
                               f"{exc}") from None
        log.info("rotated identity saved", extra={"node": self.cfg.node_id,
                                                  "dir": str(self.cfg.identity_dir)})

    def reload(self, cfg: RelayerConfig, *, started: RelayerConfig | None = None) -> list[str]:
        """Hot-reload the policy part of ``cfg`` (``authz``, ``quotas``) while running;
        the rest of the config is fixed for the life of the process. Tunnels stay up;
        the next frame, subscription and delivery are decided by the new policy, and
        existing quota buckets keep their level. Returns the static keys ``cfg``
        changes against ``started`` (the file as this process loaded it; default: the
        running config): they apply only at a restart, so they are logged and
        ``pqcnet_relayer_config_restart_pending`` is 1 until the file matches again."""
        policy = authz_policy(cfg.authz)  # compile first: a bad policy changes nothing
        self.authz.policy = policy
        self.hub.policy_changed()
        self.quotas.reload(cfg.quotas, time.monotonic())
        self.cfg = self.cfg.replace(authz=cfg.authz.model_dump(by_alias=True),
                                    quotas=cfg.quotas.model_dump())
        log.info("relayer policy reloaded", extra={
            "customers_with_rules": sorted(cfg.authz.customers),
            "quota_customers": sorted(cfg.quotas.customers)})
        self.restart_pending = changed_keys(_static(started or self.cfg), _static(cfg))
        if self.restart_pending:
            log.warning("config keys changed that apply only at a restart",
                        extra={"keys": self.restart_pending})
        return self.restart_pending

    def apply_rate_limit(self, scope: str, rate: float, burst: float) -> None:
        """A governance rate-limit directive: ``scope`` names a customer (``*``: every
        customer) whose frames/s quota at this relayer becomes ``rate`` with ``burst``."""
        if not scope:
            raise ConfigError("rate-limit scope must be a customer name or '*'")
        if not (rate > 0 and burst >= 1):
            raise ConfigError(f"rate limit needs rate > 0 and burst >= 1, got {rate}/{burst}")
        spec = self.quotas.apply_rate_limit(scope, rate, burst, time.monotonic())
        self.cfg = self.cfg.replace(quotas=spec.model_dump())
        log.info("rate limit directive applied", extra={"scope": scope, "rate": rate,
                                                        "burst": burst})

    def _open_ledger(self) -> None:
        path = Path(self.cfg.ledger_dir) if self.cfg.ledger_dir else self.data_dir / "ledger"
        ledger = Ledger.open(path, sync=self.cfg.sync)
        self._stack.push_async_callback(_quietly, ledger.close)
        key = self.identity.key
        if ledger.genesis_id is None:
            if not self.cfg.ledger_dev_genesis:
                raise ConfigError(
                    f"ledger_dir: ledger {path} has no genesis; create it with `pqcnet ledger "
                    f"--path {path} init --network NAME --authority {self.cfg.node_id} --key "
                    "AUTHORITY.pem` (or set ledger_dev_genesis: true)")
            ledger.init_genesis("pqcnet-dev", self.cfg.node_id, key)
        self.anchor = LedgerAnchor(ledger, self.cfg.node_id, key)

    async def stop(self) -> None:
        """Stop tasks and close everything (idempotent).

        Workers first get :data:`STOP_GRACE` seconds to finish their current step
        (deliver → marks → ack), so a clean stop or a Kafka handover replays nothing;
        a worker still blocked after that (e.g. holding frames for an absent
        subscriber) is cancelled — its unacked frames are redelivered later.
        """
        for w in self.workers:
            w.stop()
            self.bus.interrupt(w.shard)  # a quiet shard's consume may wait for seconds
        worker_tasks = [t for t in self._tasks if t.get_name().startswith("shard-")]
        if worker_tasks:
            await asyncio.wait(worker_tasks, timeout=STOP_GRACE)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        # a rebalance the bus's close sets off must not reach the fence: the overflow
        # queue it would read closes first (the ownership journal still gets it)
        self.bus.on_moved = None
        await self._stack.aclose()

    # ------------------------------------------------------------------ loops
    async def sample_backlog(self) -> None:
        """One backpressure round over all owned shards."""
        shards = self.cfg.shards_owned
        if not self.publisher.bus_down:  # a down bus would only make lags() wait; skip it
            try:
                async with asyncio.timeout(LAG_TIMEOUT):
                    self._bus_lag.update(await self.bus.lags(shards, self.cfg.group))
            except (RelayerError, TimeoutError):
                pass  # keep the last known lags; the overflow depth still counts
        behind = {w.shard: w.behind_park for w in self.workers}
        for s in shards:
            # records a worker consumed past a parked topic are done, only not yet
            # acknowledged on the bus: not a backlog its publishers should pause for
            backlog = (max(0, self._bus_lag.get(s, 0) - behind.get(s, 0))
                       + self.overflow.depth(s))
            self.backlog[s] = backlog
            change = self.flow.update(s, backlog)
            if change is not None:
                self.ingress.apply_flow(change)

    async def _flow_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.backpressure_interval)
            try:
                await self.sample_backlog()
            except Exception:  # keep the loop alive whatever a backend throws
                log.exception("backpressure sampling failed")

    def settlement(self) -> Settlement:
        """Volume per (customer, state) over the held epochs (:mod:`.settlement`);
        "anchored" is looked up in the ledger itself."""
        ledger = self.anchor.ledger

        def is_anchored(epoch: int, part: int) -> bool:
            vid = self.anchor.part_receipts.get((epoch, part))
            return vid is not None and ledger.has(vid)

        for _ in range(3):  # read from the scrape thread while the loop may add an epoch
            try:
                return settlement(self.meter, dict(self._parts), dict(self._proved),
                                  is_anchored)
            except RuntimeError:
                continue
        return settlement(self.meter, dict(self._parts), dict(self._proved), is_anchored)

    def proof_parts(self, epoch: int, *, records: bool = False) -> tuple[VolumeProof, ...]:
        """Every proof of a proven ``epoch`` (one unless it was split), part order.

        Headers only unless ``records``: then they are read from the proof files (a
        proven epoch's per-topic records are not kept in memory — at 1M topics they
        were ~100 MiB per epoch). A missing or damaged file is a ``ProofError``."""
        parts = self._parts.get(epoch, ())
        if not records or not parts:
            return parts
        return tuple(p for p, _ in self.proof_store.read_parts(epoch))

    def _proven_records(self, epoch: int) -> tuple[VolumeRecord, ...]:
        """A proven epoch's records from its proof files (the meter's ``sealed_records``);
        ``ProofError`` when a file is missing or damaged."""
        cached = self._records_cache
        if cached is not None and cached[0] == epoch:
            recs = cached[1]
        else:
            recs = tuple(r for p in self.proof_parts(epoch, records=True) for r in p.records)
        self._records_cache = (epoch, recs, time.monotonic())
        return recs

    def _seal_proven(self) -> None:
        """After the persisted volume is loaded: seal every proven epoch, keeping what
        reached the meter after its proof (late frames) in memory."""
        for e in sorted(self._parts):
            try:
                self.meter.seal(e, proven=self._proven_records(e))
            except ProofError as exc:  # its records stay in memory: nothing is lost
                log.error("proven epoch not sealed", extra={"epoch": e, "error": str(exc)})
        self._records_cache = None

    def _remember_proven(self, epoch: int, parts: Sequence[VolumeProof]) -> None:
        """Keep a proven epoch's headers and per-customer totals; drop its records."""
        totals: dict[str, list[int]] = {}
        for p in parts:
            for r in p.records:
                t = totals.setdefault(r.customer, [0, 0])
                t[0] += r.bytes
                t[1] += r.frames
        self._parts[epoch] = tuple(p.header() for p in parts)
        self.proofs[epoch] = self._parts[epoch][0]
        self._proved[epoch] = totals

    def prove_closed_epochs(self, now: float | None = None) -> list[VolumeProof]:
        """Prove and anchor every epoch before the current one not yet proven.

        Unfinished intents (a crash mid-anchoring) are finished first. An epoch with a
        batch still between delivery and its volume write waits (with every later one)
        for the next round (:meth:`VolumeMeter.settled`). An epoch whose
        proof fails with a typed error is logged and retried next round; it never stops
        the epochs after it.
        """
        current = self.meter.epoch(now)
        out: list[VolumeProof] = []
        pending = set(self.proof_store.intent_epochs())
        for e in sorted(pending | set(self.meter.epochs())):
            if e in self.proofs or (e >= current and e not in pending):
                continue
            if e not in pending and not self.meter.settled(e):
                break  # a batch of it is still being delivered: next round, in order
            try:
                parts = self._prove_epoch(e, pending)
            except (PqcnetError, OSError) as exc:
                log.error("volume proof failed; retried next round",
                          extra={"epoch": e, "error": str(exc)})
                continue
            out += parts
            log.info("volume proof anchored", extra={
                "epoch": e, "parts": len(parts), "records": sum(p.record_count for p in parts),
                "bytes": sum(p.total_bytes for p in parts)})
        return out

    def _prove_epoch(self, epoch: int, pending: set[int]) -> list[VolumeProof]:
        """Intent (durable) → anchor each part once → proof files → intent cleared."""
        if epoch in pending:
            intent = self._with_records(self.proof_store.read_intent(epoch))
        else:
            intent = Intent(epoch, self.anchor.next_counter(), tuple(build_volume_proofs(
                self.cfg.node_id, epoch, self.meter.records(epoch), self.identity.key)))
            self.proof_store.write_intent(intent)
        vids = [self.anchor.find_anchored(p, intent.counter) or self.anchor.anchor_proof(p)
                for p in intent.proofs]
        for p, vid in reversed(list(zip(intent.proofs, vids, strict=True))):
            self.proof_store.write(p, vid)  # part 0 last: its file names a complete epoch
        self.proof_store.clear_intent(epoch)
        self._remember_proven(epoch, intent.proofs)
        # the proof holds the meter's records of the epoch as they are now (a batch of
        # it still on its way was waited for: settled)
        self.meter.seal(epoch)
        return list(intent.proofs)

    def _with_records(self, intent: Intent) -> Intent:
        """The intent's headers with their records, rebuilt from the persisted volume
        (which must commit to the same roots: the epoch was closed when it was signed)."""
        slices = split_records(self.meter.records(intent.epoch))
        if len(slices) != len(intent.proofs):
            raise ProofError(f"epoch {intent.epoch}: volume splits into {len(slices)} parts, "
                             f"the intent has {len(intent.proofs)}")
        out = []
        for header, recs in zip(intent.proofs, slices, strict=True):
            proof = replace(header, records=tuple(recs))
            check_records(proof)  # the same root and totals as signed
            out.append(proof)
        return replace(intent, proofs=tuple(out))

    def _save_counters(self) -> None:
        try:
            self.counter_store.save(self.counters)
        except OSError as exc:
            log.error("signed counters not saved", extra={"error": str(exc)})

    def audit_claims(self, now: float | None = None) -> dict[str, int]:
        """Check each proven epoch, once, against the clients' signed counters as soon as
        their final counters are due (one whole epoch after it closed); counts records
        per status in :attr:`claim_stats` (exported) and logs over-claims."""
        due_before = self.meter.epoch(now) - 1
        found: collections.Counter[str] = collections.Counter()
        for e in sorted(self.proofs):
            if e >= due_before or e in self._audited:
                continue
            self._audited.add(e)
            try:
                checks = self.check_claims(e)
            except ProofError as exc:  # its proof file went missing or bad: say so, go on
                log.error("claim check skipped", extra={"epoch": e, "error": str(exc)})
                continue
            for check in checks:
                found[check.status] += 1
                if check.status == "overclaimed":
                    log.warning("volume claim above the clients' signed counters", extra={
                        "epoch": e, "customer": check.record.customer,
                        "channel": check.record.channel, "claimed": check.record.frames,
                        "signed": check.signed_frames})
        self.claim_stats.update(found)
        return dict(found)

    async def prune_epochs(self) -> int:
        """Drop proven epochs beyond the newest ``keep_epochs`` ones; returns how many.

        Only anchored epochs go (they are in ``self.proofs``, which is filled after the
        anchor). Persisted volume is deleted before the proof file: a crash in between
        leaves a proof without volume (harmless), never volume without its proof (which
        would be proven and anchored a second time after a restart).
        """
        proven = sorted(self.proofs)
        old = proven[: max(0, len(proven) - self.cfg.keep_epochs)]
        if not old:
            return 0
        cutoff = old[-1] + 1
        if self._records_cache is not None and self._records_cache[0] < cutoff:
            self._records_cache = None
        await self.store.prune_volume(cutoff)
        self.meter.forget_before(cutoff)
        self.counters.forget_before(cutoff)
        self.counter_store.prune(cutoff)
        self.proof_store.prune(old)
        for e in old:
            del self.proofs[e]
            self._parts.pop(e, None)
            self._proved.pop(e, None)
            self._audited.discard(e)
            self.anchor.forget(e)
        for key in [k for k in self._receipts if k[1] < cutoff]:
            del self._receipts[key]
        log.info("proven epochs pruned", extra={"before_epoch": cutoff, "count": len(old)})
        return len(old)

    def _load_proofs(self) -> None:
        """Proofs made before a restart: never prove (and anchor) an epoch twice."""
        epoch: int | None = None
        parts: list[VolumeProof] = []
        for proof, vid in self.proof_store.load():  # epoch order, part 0 first
            if proof.epoch != epoch and parts:
                self._remember_proven(parts[0].epoch, parts)
                parts = []
            epoch = proof.epoch
            parts.append(proof)
            self.anchor.remember(proof, vid)
        if parts:
            self._remember_proven(parts[0].epoch, parts)

    async def _epoch_loop(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.cfg.epoch_seconds / 4))
            if self.degraded:  # volume of earlier runs not loaded yet: proving would lie
                continue
            cache = self._records_cache
            if cache is not None and time.monotonic() - cache[2] > RECORDS_CACHE_IDLE:
                self._records_cache = None
            try:
                self.prove_closed_epochs()
                self.audit_claims()
                self._save_counters()
                await self.prune_epochs()
                for s in self.cfg.shards_owned:
                    await self.bus.compact(s, [self.cfg.group])
            except Exception:
                log.exception("volume proof / log trim failed")

    # ------------------------------------------------------------------ ingress services
    def add_counters(self, peer: str, counters: Sequence[SignedAckCounter]) -> int:
        """Keep a client's signed ack counters (only those it signed itself)."""
        return self.counters.add(counters, peer=peer)

    def receipt(self, peer: str, customer: str, epoch: int) -> VolumeReceipt:
        """The signed receipt of ``customer`` for a proven ``epoch``; only a caller whose
        SPIFFE tenant is the customer gets it."""
        if SpiffeId.parse(peer).tenant != customer:
            raise ReceiptRefused(f"tenant of {peer} may not read customer {customer!r}")
        return self.receipt_for(customer, epoch)

    def receipt_for(self, customer: str, epoch: int) -> VolumeReceipt:
        """The signed receipt (cached: the last :data:`RECEIPT_CACHE` are kept)."""
        cached = self._receipts.get((customer, epoch))
        if cached is not None and cached.signer_key_id == self.identity.key.key_id:
            self._receipts.move_to_end((customer, epoch))
            return cached
        if epoch not in self._parts:
            raise ReceiptRefused(f"epoch {epoch} is not proven here (yet, or any more)")
        parts = self.proof_parts(epoch, records=True)
        ledger = self.anchor.ledger
        vertices = [ledger.get(self.anchor.part_receipt(epoch, p.part)).encode() for p in parts]
        receipt = build_receipt(self.cfg.node_id, customer, epoch, parts, vertices,
                                self.identity.key)
        self._receipts[(customer, epoch)] = receipt
        while len(self._receipts) > RECEIPT_CACHE:
            self._receipts.popitem(last=False)
        return receipt

    def check_claims(self, epoch: int) -> list[ClaimCheck]:
        """Each record of a proven epoch against the clients' signed counters."""
        return check_claims([r for p in self.proof_parts(epoch, records=True)
                             for r in p.records], self.counters, self.tolerance)

    def report(self, epoch_from: int = 0, epoch_to: int | None = None) -> PerformanceReport:
        """Signed performance report over proven epochs in the range."""
        proofs = tuple(p for e in sorted(self.proofs)
                       if e >= epoch_from and (epoch_to is None or e <= epoch_to)
                       for p in self.proof_parts(e, records=True))
        receipts = tuple(self.anchor.part_receipts[(p.epoch, p.part)] for p in proofs
                         if (p.epoch, p.part) in self.anchor.part_receipts)
        last = epoch_to if epoch_to is not None else (proofs[-1].epoch if proofs else epoch_from)
        unsigned = PerformanceReport(self.cfg.node_id, epoch_from, last, proofs, receipts,
                                     time.time() - self.started_at)
        return sign_report(unsigned, self.identity.key)


async def _close_qstp(server: aio.Server) -> None:
    server.close()
    await asyncio.wait_for(server.wait_closed(), 5)


async def _quietly(close: Callable[..., Any], *args: Any) -> None:
    """Run one closer of :meth:`RelayerNode.stop`; a failure is logged and the rest still
    close (a stuck backend must not keep the ledger open)."""
    try:
        res = close(*args)
        if inspect.isawaitable(res):
            await res
    except Exception as exc:
        log.warning("close failed during stop", extra={"closer": getattr(close, "__qualname__",
                                                                         repr(close)),
                                                       "error": repr(exc)})


class _NodeCollector(Collector):
    """Scrape-time gauges and counters read from the node's state."""

    def __init__(self, node: RelayerNode) -> None:
        self.node = node

    def collect(self) -> Iterator[Any]:
        n = self.node
        lag = GaugeMetricFamily("pqcnet_relayer_shard_backlog_records",
                                "Records not yet acked by the shard worker (bus lag + overflow)",
                                labels=["shard"])
        for s, v in sorted(n.backlog.items()):
            lag.add_metric([str(s)], v)
        yield lag
        yield GaugeMetricFamily("pqcnet_relayer_overflow_records",
                                "Records waiting in the local overflow queue",
                                value=n.overflow.total())
        yield GaugeMetricFamily("pqcnet_relayer_degraded",
                                "1 while the bus was not reached since start (overflow only)",
                                value=1 if n.degraded else 0)
        yield GaugeMetricFamily("pqcnet_relayer_owned_shards",
                                "Shards this relayer works on now (a cluster: its Redis "
                                "leases or Kafka assignment)",
                                value=len(n.bus.assignment()) if not n.degraded else 0)
        yield GaugeMetricFamily("pqcnet_relayer_paused_shards",
                                "Shards whose publishers are paused", value=len(n.flow.paused))
        yield GaugeMetricFamily("pqcnet_relayer_subscribers", "Subscriber streams",
                                value=n.hub.count())
        yield GaugeMetricFamily("pqcnet_relayer_held_frames",
                                "Frames whose delivery waits because no subscriber takes "
                                "their topic and parking is off or full (their shard's other "
                                "topics wait too)",
                                value=n.hub.held)
        yield GaugeMetricFamily("pqcnet_relayer_parked_topics",
                                "Topics with no subscriber whose frames the shard workers "
                                "pass over now (delivered when one subscribes)",
                                value=sum(w.parked_topics for w in n.workers))
        yield GaugeMetricFamily("pqcnet_relayer_records_behind_park",
                                "Records consumed past a parked topic's first frame, kept "
                                "unacknowledged on the bus (bounded by park_max_records)",
                                value=sum(w.behind_park for w in n.workers))
        yield CounterMetricFamily("pqcnet_relayer_subscriber_quarantine_refusals",
                                  "Subscriptions refused because their peer's subscriptions "
                                  "to the customer were evicted repeatedly",
                                  value=n.hub.quarantine_refusals)
        yield CounterMetricFamily("pqcnet_relayer_subscriber_ack_timeouts",
                                  "Subscribers evicted for leaving a delivered batch "
                                  "unacknowledged past subscriber_ack_timeout",
                                  value=n.hub.ack_timeouts)
        yield from budget_metrics(n.qstp_config.receive_budget, "relayer")
        yield GaugeMetricFamily("pqcnet_relayer_config_restart_pending",
                                "1 while the config file's static part differs from the "
                                "running one (the reload's log line names the keys)",
                                value=1 if n.restart_pending else 0)
        yield GaugeMetricFamily("pqcnet_relayer_tunnels_active",
                                "QSTP tunnels open (past the handshake)",
                                value=len(n.ingress.sessions))
        yield from aio.server_metrics(n._server, "relayer")
        ing = CounterMetricFamily("pqcnet_relayer_ingress_frames",
                                  "Publisher frames by outcome", labels=["result"])
        st = n.ingress.stats
        for k, v in (("accepted", st.accepted), ("rejected", st.rejected),
                     ("overflowed", st.overflowed)):
            ing.add_metric([k], v)
        yield ing
        refusals = CounterMetricFamily(
            "pqcnet_relayer_authz_refusals",
            "Frames and subscriptions refused by the data-plane authorization, by operation",
            labels=["op"])
        for op, v in sorted(n.authz.refusals.items()):
            refusals.add_metric([op], v)
        yield refusals
        yield CounterMetricFamily("pqcnet_relayer_quota_refused_frames",
                                  "Publisher frames refused by a customer quota",
                                  value=n.quotas.refused)
        if isinstance(n.quotas, ClusterQuotas):
            calls = CounterMetricFamily(
                "pqcnet_relayer_quota_cluster_calls",
                "Draws from the cluster's shared quota buckets in Redis, by outcome (an "
                "error starts a fallback to host buckets)", labels=["outcome"])
            for outcome, v in sorted(n.quotas.calls.items()):
                calls.add_metric([outcome], v)
            yield calls
            yield GaugeMetricFamily("pqcnet_relayer_quota_cluster_fallback",
                                    "1 while Redis failed the cluster quotas and this "
                                    "relayer uses host buckets",
                                    value=1 if n.quotas.in_fallback else 0)
        fence = CounterMetricFamily(
            "pqcnet_relayer_gap_fence_events",
            "Gap fence (late frames): refused, skips held for an in-flight frame, "
            "admissions untracked (in-flight bound), retries checked against stored gaps, "
            "frames of a skipped gap that reached the worker anyway (dropped), overflow "
            "frames registered in flight at start; in a cluster: frames marked acknowledged "
            "for another relayer's shard, skips reserved or held by such a mark, refused "
            "frames of an agreed skip dropped; skips held while a shard worker had not "
            "read the log up to its end at the worker's reset",
            labels=["event"])
        fs = n.fence.stats
        for k, v in (("refused", fs.refused), ("held", fs.held), ("untracked", fs.untracked),
                     ("gap_reads", fs.gap_reads), ("late_on_bus", fs.late_on_bus),
                     ("restored", fs.restored), ("marked", fs.marked),
                     ("reserved", fs.reserved), ("held_elsewhere", fs.held_elsewhere),
                     ("refused_on_bus", fs.refused_on_bus),
                     ("held_catching_up", sum(w.stats.held_catching_up for w in n.workers))):
            fence.add_metric([k], v)
        yield fence
        yield GaugeMetricFamily(
            "pqcnet_relayer_shards_catching_up",
            "Shards worked here whose worker has not yet read the records the bus held at "
            "its last reset (a start, a takeover): no gap is skipped on them meanwhile",
            value=sum(1 for w in n.workers if n.bus.owns(w.shard)
                      and not n.bus.caught_up(w.shard, w.config.group)))
        yield GaugeMetricFamily("pqcnet_relayer_gap_fence_inflight_frames",
                                "Frames acknowledged for shards read here and not yet read "
                                "by their worker (a gap is not skipped past them)",
                                value=n.fence.inflight)
        for name, attr, doc in (("delivered", "delivered", "Frames delivered to subscribers"),
                                ("duplicates", "duplicates", "Duplicate frames suppressed"),
                                ("gaps", "gaps", "Sequence gaps reported and skipped")):
            yield CounterMetricFamily(f"pqcnet_relayer_{name}_frames", doc,
                                      value=sum(getattr(w.stats, attr) for w in n.workers))
        yield CounterMetricFamily(
            "pqcnet_relayer_stale_claimed_entries",
            "Bus entries taken from a former shard owner that read them after its lease "
            "ran out (Redis cluster sweep)", value=n.bus.stale_claimed)
        yield CounterMetricFamily(
            "pqcnet_relayer_taken_over_entries",
            "Bus entries taken over from other members' pending lists when this relayer "
            "began reading a shard (Redis XAUTOCLAIM after a claim or restart)",
            value=n.bus.taken_over)
        yield CounterMetricFamily(
            "pqcnet_relayer_fenced_reads",
            "Reads and claims of a shard refused because this relayer no longer held it "
            "(Redis: its lease was gone; Kafka with redis_url: a newer group generation "
            "held the partition): a paused or partitioned former owner",
            value=n.bus.fenced_out)
        claims = CounterMetricFamily(
            "pqcnet_relayer_claims_records",
            "Proven volume records checked against client-signed counters, by status",
            labels=["status"])
        for status in ("supported", "overclaimed", "unsupported"):
            claims.add_metric([status], n.claim_stats[status])
        yield claims
        if not n.degraded:  # volume of earlier runs not loaded yet: it would lie
            yield from families(bounded(n.settlement(), n.cfg.metrics_max_label_series))
        yield GaugeMetricFamily("pqcnet_relayer_proven_epochs",
                                "Epochs whose anchored volume proof is held", value=len(n.proofs))
        try:  # read from the scrape thread; a closed ledger (stopping) has no numbers
            own, orphans = n.anchor.next_counter(), n.anchor.ledger.orphan_count
        except (PqcnetError, OSError, AttributeError):
            own = orphans = -1
        if own >= 0:
            yield GaugeMetricFamily("pqcnet_relayer_ledger_own_vertices",
                                    "Vertices this relayer appended to its QS-DAG", value=own)
            yield GaugeMetricFamily("pqcnet_relayer_ledger_orphans",
                                    "Vertices parked in the QS-DAG orphan pool", value=orphans)
        yield GaugeMetricFamily("pqcnet_relayer_signed_counters",
                                "Client-signed ack counters held", value=len(n.counters))
        for name, attr, doc in (("mark_evictions_topics", "evictions",
                                 "Topic marks dropped from the in-memory LRU"),
                                ("mark_loads_topics", "mark_loads",
                                 "Topic marks read from the marks store on an LRU miss"),
                                ("parked_frames", "parked",
                                 "Frames passed over because no subscriber took their topic"),
                                ("park_replays", "park_replays",
                                 "Shard replays because a parked topic got a subscriber"),
                                ("park_overflows", "park_overflows",
                                 "Shards that reached park_max_records and held instead")):
            yield CounterMetricFamily(f"pqcnet_relayer_{name}", doc,
                                      value=sum(getattr(w.stats, attr) for w in n.workers))


def _static(cfg: RelayerConfig) -> dict[str, Any]:
    """The part of ``cfg`` a hot reload cannot change (all but ``authz`` and ``quotas``)."""
    return {k: v for k, v in plain(cfg).items() if k not in ("authz", "quotas")}
