"""Kafka bus (aiokafka): one topic, one partition per shard, manual commits.

* The topic is created by the backend through the admin client with ``shards``
  partitions (>= 32 by default); an existing topic with fewer partitions is a
  :class:`ConfigError`-style :class:`BusError`, never silently mis-sharded.
* The producer is idempotent with ``acks=all``: a publish returns only after the
  broker's in-sync replicas have the records, and producer retries never duplicate.
* Consumption uses *explicit partition assignment* with the group id used only for
  committed offsets. Each relayer owns a fixed set of shards (``owned``; default
  all), so there is no group-join / rebalance round on start (each costs seconds) and
  a shard is never read by two relayers at once. Commits happen after the worker has
  delivered and persisted its dedup marks, so a crash replays, never skips.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable, Sequence
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError

from relayer.bus.base import Bus, Delivery, Offset
from relayer.errors import BusError, BusUnavailable

T = TypeVar("T")
#: default partitions of the relayer topic (the issue asks for >= 32)
DEFAULT_PARTITIONS = 32


class KafkaBus(Bus):
    """Shards as partitions of one Kafka topic."""

    name = "kafka"

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

    def partitions(self) -> int:
        return self._shards

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
        except KafkaError as exc:
            if getattr(exc, "retriable", False):
                raise BusUnavailable(f"kafka retriable error: {exc}") from None
            raise BusError(f"kafka error: {exc}") from None

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
        if consumer is None:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap, group_id=group, client_id=self.client_id,
                enable_auto_commit=False, auto_offset_reset="earliest",
                isolation_level="read_committed",
            )
            await self._call(consumer.start())
            consumer.assign([self.tp(s) for s in self.owned])
            self._consumers[group] = consumer
        return consumer

    async def publish(self, shard: int, records: Sequence[bytes]) -> list[Offset]:
        self.check_shard(shard)
        if not records:
            return []
        if self._producer is None:
            await self.start()
        assert self._producer is not None
        producer = self._producer

        async def send_all() -> list[Offset]:
            futs = [await producer.send(self.topic, rec, partition=shard) for rec in records]
            return [int(m.offset) for m in await asyncio.gather(*futs)]

        return await self._call(send_all())

    async def consume(
        self, shard: int, group: str, *, max_records: int = 512, block: float = 0.5
    ) -> list[Delivery]:
        self.check_shard(shard)
        if shard not in self.owned:
            raise BusError(f"shard {shard} is not owned by this relayer")
        consumer = await self._consumer(group)
        tp = self.tp(shard)
        got = await self._call(
            consumer.getmany(tp, timeout_ms=int(block * 1000), max_records=max_records),
            self.op_timeout + block)
        return [Delivery(shard, int(r.offset), r.value or b"") for r in got.get(tp, [])]

    async def ack(self, shard: int, group: str, deliveries: Sequence[Delivery]) -> None:
        self.check_shard(shard)
        if not deliveries:
            return
        consumer = await self._consumer(group)
        upto = max(int(d.offset) for d in deliveries) + 1
        await self._call(consumer.commit({self.tp(shard): upto}))

    async def lag(self, shard: int, group: str) -> int:
        self.check_shard(shard)
        consumer = await self._consumer(group)
        tp = self.tp(shard)
        end = (await self._call(consumer.end_offsets([tp])))[tp]
        committed = await self._call(consumer.committed(tp))
        if committed is None:
            committed = (await self._call(consumer.beginning_offsets([tp])))[tp]
        return max(0, int(end) - int(committed))

    async def rewind(self, shard: int, group: str) -> None:
        consumer = await self._consumer(group)
        tp = self.tp(shard)
        committed = await self._call(consumer.committed(tp))
        if committed is None:
            await self._call(consumer.seek_to_beginning(tp))
        else:
            consumer.seek(tp, committed)

    async def healthy(self) -> bool:
        if self._producer is None:
            return False
        try:
            await self._call(self._producer.client.fetch_all_metadata(), 2.0)
        except BusError:
            return False
        return True

    async def close(self) -> None:
        for consumer in self._consumers.values():
            await consumer.stop()
        self._consumers.clear()
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
