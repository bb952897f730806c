"""Kafka bus (aiokafka): one topic, one partition per shard, manual commits.

* The topic is created by the backend through the admin client with ``shards``
  partitions (>= 32 by default); an existing topic with fewer partitions is a
  :class:`ConfigError`-style :class:`BusError`, never silently mis-sharded.
* The producer is idempotent with ``acks=all``: a publish returns only after the
  broker's in-sync replicas have the records, and producer retries never duplicate.
* Consumption, ``rebalance=False`` (a relayer with ``owned_shards``): *explicit
  partition assignment* with the group id used only
  for committed offsets. Each relayer owns a fixed set of shards (``owned``; default
  all), so there is no group-join / rebalance round on start (each costs seconds) and
  a shard is never read by two relayers at once.
* Consumption, ``rebalance=True`` (the relayer's default, ``kafka_rebalance``): the
  group protocol assigns partitions among the relayers of a group. On revoke, the
  listener waits (up to ``revoke_grace`` s) for the shard's worker to ack what it
  consumed, commits, and stops acking that shard; on assign, the shard's next
  ``consume`` raises a retriable error so its worker resets to the committed offset
  and its stored marks. Nothing acked is replayed and nothing unacked is lost. With
  node-local marks a new owner's marks for the shard's topics are older than the
  previous owner's, so its first frame per topic waits ``gap_timeout`` and is reported
  as a gap before delivery resumes, in order; a node configured with ``redis_url``
  keeps marks and volume in Redis instead (:func:`pqcnet.relayer.node.shared_marks`),
  and they move with the partition; its writes are fenced by the group generation
  (:mod:`.kafka_owners`, decision 0025: every reset claims the partition first). A
  dead member's partitions move after ``session_timeout`` seconds without heartbeats.
* Commits happen after the worker has delivered and persisted its dedup marks, so a
  crash replays, never skips.
* One fetch loop per consumer reads every assigned partition and wakes only the shard
  worker whose records arrived (:mod:`.kafka_pump`; bounded per shard by pausing the
  partition); a rewind drops what it buffered before seeking.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaConnectionError,
    KafkaError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    TopicAlreadyExistsError,
    UnknownProducerId,
)

from pqcnet._util.tasks import cancel_and_wait
from pqcnet.relayer.bus.base import Bus, Delivery, Offset
from pqcnet.relayer.bus.kafka_owners import PartitionOwners, owner_token
from pqcnet.relayer.bus.kafka_pump import PartitionPump
from pqcnet.relayer.errors import BusError, BusUnavailable

T = TypeVar("T")
#: producer-state errors after which an idempotent producer never recovers by itself
_PRODUCER_FATAL = (OutOfOrderSequenceNumber, UnknownProducerId, InvalidProducerEpoch,
                   ProducerFenced)
#: default partitions of the relayer topic (the issue asks for >= 32)
DEFAULT_PARTITIONS = 32
#: longest a consumer's fetch waits at the broker when nothing is new, ms (aiokafka's
#: default is 500). A rewind (a parked topic's replay, a worker reset) waits for the
#: fetch in flight and then one more: 1.02 s per replay at 500, 0.42 s at 100
#: (``pqcnet bench parking --backend kafka``). A fetch returns as soon as a record
#: arrives either way; an idle consumer sends 10 fetches/s instead of 2.
FETCH_MAX_WAIT_MS = 100


def _bus_error(exc: KafkaError) -> BusError:
    """A Kafka error as the bus error the shard workers and the ingress handle."""
    if getattr(exc, "retriable", False):
        return BusUnavailable(f"kafka retriable error: {exc}")
    return BusError(f"kafka error: {exc}")


async def _settled(futs: list[asyncio.Future[Any]]) -> list[Any]:
    """The batches' record metadata. Shielded: cancelling aiokafka's batch futures (our
    timeout) would make the idempotent producer skip sequence numbers, and fail later
    with OutOfOrderSequenceNumber."""
    gathered = asyncio.gather(*futs)
    gathered.add_done_callback(_retrieve)  # no "exception never retrieved" noise
    return list(await asyncio.shield(gathered))


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


class KafkaBus(Bus):
    """Shards as partitions of one Kafka topic."""

    name = "kafka"
    batched_shards = True

    def __init__(
        self,
        bootstrap: str,
        shards: int = DEFAULT_PARTITIONS,
        *,
        topic: str = "pqcnet.relayer",
        owned: Iterable[int] | None = None,
        replication: int = 1,
        op_timeout: float = 10.0,
        client_id: str = "pqcnet-relayer",
        linger_ms: int = 2,
        commit_interval: float = 0.0,
        rebalance: bool = False,
        revoke_grace: float = 5.0,
        session_timeout: float = 10.0,
        instance_id: str | None = None,
    ) -> None:
        if shards < 1:
            raise ValueError("shards must be >= 1")
        self.bootstrap, self.topic, self._shards = bootstrap, topic, shards
        self.owned = sorted(set(owned)) if owned is not None else list(range(shards))
        self.replication, self.op_timeout, self.client_id = replication, op_timeout, client_id
        self._linger_ms = linger_ms
        self._producer: AIOKafkaProducer | None = None
        self._consumers: dict[str, AIOKafkaConsumer] = {}
        self._start_lock = asyncio.Lock()
        #: seconds between offset commits (0: commit inside every ack). Lazy commits
        #: turn 32 shards x N acks/s into a few commit requests/s; a crash then replays
        #: at most this much, which the shard workers' sequence window suppresses.
        self.commit_interval = commit_interval
        self._acked: dict[str, dict[TopicPartition, int]] = {}
        self._committer: asyncio.Task[None] | None = None
        self._producer_broken = False
        #: group protocol assigns partitions (True) or ``owned`` is fixed (False)
        self.rebalance = rebalance
        self.revoke_grace = revoke_grace
        #: group session: a dead member's partitions move after this many seconds
        self.session_timeout = session_timeout
        #: static group membership (group.instance.id): a restart under the same id
        #: gets its partitions back without a rebalance; a clean stop does not leave
        self.instance_id = instance_id
        self.assigned: set[int] = set() if rebalance else set(self.owned)
        self._reset_needed: set[int] = set()
        self._revoking: set[int] = set()
        #: partitions held when the rebalance in progress revoked them (None: none is)
        self._held_before: set[int] | None = None
        self._consumed: dict[int, int] = {}  # shard -> highest offset handed out
        #: (shard, group) -> the partition's last offset at its rewind, until handed out
        self._catch_up: dict[tuple[int, str], int] = {}
        self._changed = asyncio.Event()
        #: group -> the fetch loop feeding its shard workers (see :mod:`.kafka_pump`)
        self._pumps: dict[str, PartitionPump] = {}
        #: owner keys fencing a cluster's shared marks and volume (decision 0025): set
        #: by the node when the group rebalances and the marks are in Redis
        self.owners: PartitionOwners | None = None

    def partitions(self) -> int:
        return self._shards

    def assignment(self) -> list[int]:
        return sorted(self.assigned - self._revoking)

    def owns(self, shard: int) -> bool:
        return shard in self.assigned and shard not in self._revoking

    @property
    def fenced_out(self) -> int:  # type: ignore[override]
        """Partition claims refused because a newer group generation held them."""
        return self.owners.refused if self.owners is not None else 0

    def owner_token(self, shard: int) -> str | None:
        """This member's token for ``shard`` (its group generation and member), or
        None when the group does not give it the partition now. A partition being
        revoked is still ours until the revocation ends: its in-flight batches are
        saved and acked under the generation that assigned it (the revoke callback runs
        before the next join)."""
        if not self.rebalance or shard not in self.assigned or len(self._consumers) != 1:
            return None
        coordinator = next(iter(self._consumers.values()))._coordinator
        if coordinator is None or coordinator.generation < 0:
            return None
        return owner_token(coordinator.generation,
                           self.instance_id or str(coordinator.member_id))

    def tp(self, shard: int) -> TopicPartition:
        """The Kafka partition of ``shard``."""
        return TopicPartition(self.topic, shard)

    async def _call(self, aw: Awaitable[T], limit: float | None = None) -> T:
        try:
            async with asyncio.timeout(limit or self.op_timeout):
                return await aw
        except TimeoutError:
            raise BusUnavailable("kafka call timed out") from None
        except KafkaConnectionError as exc:
            raise BusUnavailable(f"kafka unavailable: {exc}") from None
        except _PRODUCER_FATAL as exc:
            # e.g. after a broker restart: start a new producer (new producer id) on the
            # next publish; records of the failed batch are replayed (dups are suppressed)
            self._producer_broken = True
            raise BusUnavailable(f"kafka producer state lost ({exc}); recreating") from None
        except KafkaError as exc:
            raise _bus_error(exc) from None

    async def start(self) -> None:
        async with self._start_lock:
            if self._producer is not None:
                return
            await self._ensure_topic()
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap, client_id=self.client_id,
                enable_idempotence=True, acks="all", linger_ms=self._linger_ms,
                request_timeout_ms=int(self.op_timeout * 1000),
            )
            try:
                await self._call(producer.start())
            except BusError:
                await producer.stop()
                raise
            self._producer = producer

    async def _ensure_topic(self) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, client_id=self.client_id)
        try:
            await self._call(admin.start())
            try:
                await self._call(admin.create_topics([NewTopic(
                    self.topic, self._shards, self.replication,
                    topic_configs={"min.insync.replicas": "1"})]))
            except TopicAlreadyExistsError:
                pass
            except BusError as exc:
                if "TopicAlreadyExists" not in str(exc):
                    raise
            have = 0
            async with asyncio.timeout(self.op_timeout):  # a new topic's metadata lags a bit
                while True:
                    meta: Any = await self._call(admin.describe_topics([self.topic]))
                    have = len(meta[0]["partitions"]) if meta else 0
                    if have:
                        break
                    await asyncio.sleep(0.1)
            if have < self._shards:
                raise BusError(f"kafka topic {self.topic} has {have} partitions, "
                               f"config wants {self._shards}")
        finally:
            await admin.close()

    async def _consumer(self, group: str) -> AIOKafkaConsumer:
        consumer = self._consumers.get(group)
        if consumer is not None:
            return consumer
        async with self._start_lock:  # 32 workers ask at once: create exactly one
            return await self._new_consumer(group)

    async def _new_consumer(self, group: str) -> AIOKafkaConsumer:
        consumer = self._consumers.get(group)
        if consumer is None:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap, group_id=group, client_id=self.client_id,
                enable_auto_commit=False, auto_offset_reset="earliest",
                isolation_level="read_committed", fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
                session_timeout_ms=int(self.session_timeout * 1000),
                heartbeat_interval_ms=max(100, int(self.session_timeout * 1000 / 3)),
                group_instance_id=self.instance_id if self.rebalance else None,
            )
            await self._call(consumer.start())
            if self.rebalance:
                consumer.subscribe(topics=[self.topic], listener=_Rebalance(self, group))
            else:
                consumer.assign([self.tp(s) for s in self.owned])
            self._consumers[group] = consumer
            pump = self._pumps[group] = PartitionPump(
                consumer, self.topic, lambda: self.assigned - self._revoking)
            pump.start()
        return consumer

    async def _producer_ready(self) -> AIOKafkaProducer:
        if self._producer_broken and self._producer is not None:
            old, self._producer, self._producer_broken = self._producer, None, False
            with contextlib.suppress(KafkaError):
                await old.stop()
        if self._producer is None:
            await self.start()
        assert self._producer is not None
        return self._producer

    async def _enqueue(self, producer: AIOKafkaProducer, shard: int, records: Sequence[bytes]
                       ) -> tuple[list[asyncio.Future[Any]], list[int]]:
        """Hand ``records`` to the producer as whole record batches (one send each, not
        one per record: the per-record path costs ~70 us of Python per record); returns
        the batches' futures and record counts."""
        sizes: list[int] = []
        futs = []
        batch = producer.create_batch()
        n = 0
        for rec in records:
            if batch.append(key=None, value=rec, timestamp=None) is None:
                batch.close()
                futs.append(await producer.send_batch(batch, self.topic, partition=shard))
                sizes.append(n)
                batch, n = producer.create_batch(), 0
                if batch.append(key=None, value=rec, timestamp=None) is None:
                    raise BusError(f"record of {len(rec)} bytes exceeds the batch size")
            n += 1
        batch.close()
        futs.append(await producer.send_batch(batch, self.topic, partition=shard))
        sizes.append(n)
        return futs, sizes

    async def publish(self, shard: int, records: Sequence[bytes]) -> list[Offset]:
        self.check_shard(shard)
        if not records:
            return []
        producer = await self._producer_ready()

        async def send_all() -> list[Offset]:
            futs, sizes = await self._enqueue(producer, shard, records)
            out: list[Offset] = []
            for meta, count in zip(await _settled(futs), sizes, strict=True):
                out += range(int(meta.offset), int(meta.offset) + count)
            return out

        return await self._call(send_all())

    async def publish_many(self, batches: Mapping[int, Sequence[bytes]]) -> None:
        """Every shard's batches handed to the producer before waiting for any: its
        sender then carries them in one produce request per broker (one round trip for
        a group commit, not one per shard). Not atomic across partitions — a failure
        raises for all of them and the caller sends all to the overflow queue; what did
        land is there twice and the shard workers drop the second copy as a duplicate,
        as after a publish that timed out."""
        for shard in batches:
            self.check_shard(shard)
        if not any(batches.values()):
            return
        producer = await self._producer_ready()

        async def send_all() -> None:
            futs: list[asyncio.Future[Any]] = []
            for shard, records in batches.items():
                if records:
                    futs += (await self._enqueue(producer, shard, records))[0]
            await _settled(futs)

        await self._call(send_all())

    def interrupt(self, shard: int) -> None:
        for pump in self._pumps.values():
            pump.interrupt(shard)

    async def consume(
        self, shard: int, group: str, *, max_records: int = 512, block: float = 0.5
    ) -> list[Delivery]:
        self.check_shard(shard)
        if shard not in self.owned:
            raise BusError(f"shard {shard} is not owned by this relayer")
        await self._consumer(group)
        if shard in self._reset_needed:
            self._reset_needed.discard(shard)
            raise BusUnavailable(f"shard {shard} (re)assigned to this relayer: resetting")
        if shard not in self.assigned or shard in self._revoking:  # not (or no longer) ours
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(block):
                    await self._changed.wait()
            return []
        pump = self._pumps[group]
        await pump.wait(shard, block)  # a revoke ends it (the pump drops the partition)
        if shard not in self.assigned or shard in self._revoking:
            return []  # revoked while we waited
        try:
            out = pump.take(shard, max_records)
        except KafkaError as exc:
            raise _bus_error(exc) from None
        except OSError as exc:
            raise BusUnavailable(f"kafka unavailable: {exc}") from None
        if out:
            self._consumed[shard] = int(out[-1].offset)
            end = self._catch_up.get((shard, group))
            if end is not None and int(out[-1].offset) >= end:
                del self._catch_up[shard, group]
        return out

    async def ack(self, shard: int, group: str, deliveries: Sequence[Delivery]) -> None:
        self.check_shard(shard)
        if not deliveries:
            return
        await self._consumer(group)
        if shard not in self.assigned:
            return  # revoked: the new owner resumes from what we committed at revoke
        upto = max(int(d.offset) for d in deliveries) + 1
        acked = self._acked.setdefault(group, {})
        acked[self.tp(shard)] = max(upto, acked.get(self.tp(shard), 0))
        if not self.commit_interval:
            await self._commit(group)
        elif self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_loop())

    async def _commit(self, group: str) -> None:
        offsets = {tp: o for tp, o in self._acked.get(group, {}).items()
                   if tp.partition in self.assigned}
        if offsets:
            await self._call(self._consumers[group].commit(offsets))

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(self.commit_interval)
            for group in list(self._consumers):
                try:
                    await self._commit(group)
                except BusError as exc:  # retried next round; acks stay in memory
                    logging.getLogger(__name__).warning(
                        "kafka commit failed", extra={"group": group, "error": str(exc)})

    async def lag(self, shard: int, group: str) -> int:
        return (await self.lags([shard], group))[shard]

    async def lags(self, shards: Iterable[int], group: str) -> dict[int, int]:
        """Every assigned shard's end offset in one ``ListOffsets`` request (the
        backpressure sample asks for all of them every ``backpressure_interval``: one
        request each was 64 a second for 32 partitions), less what this relayer acked
        (or the group committed). A failed request raises: no shard's lag is known."""
        order = list(shards)
        for s in order:
            self.check_shard(s)
        consumer = await self._consumer(group)
        out = {s: 0 for s in order if s not in self.assigned}  # not ours to deliver
        tps = {s: self.tp(s) for s in order if s not in out}
        if not tps:
            return out
        ends = await self._call(consumer.end_offsets(list(tps.values())))
        for s, tp in tps.items():
            committed = self._acked.get(group, {}).get(tp)
            if committed is None:
                committed = await self._call(consumer.committed(tp))
            if committed is None:
                committed = (await self._call(consumer.beginning_offsets([tp])))[tp]
            out[s] = max(0, int(ends[tp]) - int(committed))
        return out

    async def rewind(self, shard: int, group: str) -> None:
        consumer = await self._consumer(group)
        if shard not in self.assigned:
            return
        if self.owners is not None:  # before any mark is read: a stale member's later
            await self.owners.claim(shard)  # saves are refused from here on
        tp = self.tp(shard)
        committed = self._acked.get(group, {}).get(tp)
        if committed is None:
            committed = await self._call(consumer.committed(tp))
        if committed is None:
            committed = (await self._call(consumer.beginning_offsets([tp])))[tp]
        end = int((await self._call(consumer.end_offsets([tp])))[tp])
        # no await from here: nothing the fetch loop buffered before the seek survives it
        if shard not in self.assigned:
            return
        self._pumps[group].drop(shard)
        consumer.seek(tp, committed)
        if int(committed) < end:  # caught up once the record at end - 1 is handed out
            self._catch_up[shard, group] = end - 1
        else:
            self._catch_up.pop((shard, group), None)

    def caught_up(self, shard: int, group: str) -> bool:
        return (shard, group) not in self._catch_up

    async def healthy(self) -> bool:
        if self._producer is None:
            return False
        try:
            await self._call(self._producer.client.fetch_all_metadata(), 2.0)
        except BusError:
            return False
        return True

    async def close(self) -> None:
        try:
            await cancel_and_wait(self._committer)
            for group in list(self._consumers):
                with contextlib.suppress(BusError):
                    await self._commit(group)
        finally:  # the clients close even when this close is cancelled (commits may not)
            for pump in self._pumps.values():
                await pump.close()
            self._pumps.clear()
            for consumer in self._consumers.values():
                await consumer.stop()
            self._consumers.clear()
            # leaving the group hands every partition back without a revoke callback:
            # say so (the ownership journal's ``released``), as a rebalance would
            if (left := set(self.assigned)) and self.rebalance:
                self.assigned.clear()
                if self.on_assignment is not None:
                    self.on_assignment(set(), left)
            if self._producer is not None:
                await self._producer.stop()
                self._producer = None


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Hands shards over between relayers of one group without loss or replays."""

    def __init__(self, bus: KafkaBus, group: str) -> None:
        self.bus, self.group = bus, group

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        bus = self.bus
        shards = {tp.partition for tp in revoked if tp.topic == bus.topic}
        acked = bus._acked.setdefault(self.group, {})
        if bus._held_before is None:
            bus._held_before = set(bus.assigned)
        bus._revoking |= shards  # hand out nothing new; let in-flight batches finish

        def settled() -> bool:  # every consumed record of these shards is acked
            return all(acked.get(bus.tp(s), 0) > bus._consumed.get(s, -1) for s in shards
                       if s in bus._consumed)

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(bus.revoke_grace):
                while not settled():  # noqa: ASYNC110 - the workers ack from other tasks
                    await asyncio.sleep(0.02)
        with contextlib.suppress(BusError):
            await bus._commit(self.group)
        bus.assigned -= shards
        bus._revoking -= shards
        pump = bus._pumps.get(self.group)
        for s in shards:
            acked.pop(bus.tp(s), None)
            bus._consumed.pop(s, None)
            if pump is not None:
                pump.drop(s)  # fetched, never handed out: the next owner reads them
        bus._changed.set()
        if shards and bus.on_assignment is not None:
            bus.on_assignment(set(), shards)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        bus = self.bus
        shards = {tp.partition for tp in assigned if tp.topic == bus.topic}
        new = shards - bus.assigned
        acked = bus._acked.setdefault(self.group, {})
        for s in new:
            acked.pop(bus.tp(s), None)  # the previous owner's commit is the truth now
            bus._consumed.pop(s, None)
        before = bus._held_before if bus._held_before is not None else set(bus.assigned)
        bus._held_before = None
        bus.assigned |= shards
        bus._reset_needed |= new
        bus._changed.set()
        if new and bus.on_assignment is not None:
            bus.on_assignment(new, set())
        came, went = shards - before, before - shards
        if (came or went) and bus.on_moved is not None:
            bus.on_moved(came, went)
