"""Kafka (KRaft) from ``scripts/services``: aiokafka talks to it, and a record survives.

Kafka 4 dropped old protocol versions (KIP-896), so "aiokafka can fetch metadata and
produce/consume against the pinned broker" is worth a test of its own. The restart test
shows an ``acks=all`` record acknowledged before ``scripts/services restart kafka`` is
consumed after it, from the same bootstrap address.
"""

from __future__ import annotations

import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests import services_ctl

pytestmark = [pytest.mark.services, pytest.mark.timeout(180)]

#: Partitions for the test topic: the relayer creates its topic with >= 32.
PARTITIONS = 32


async def _create_topic(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(name=topic, num_partitions=PARTITIONS, replication_factor=1)]
        )
    finally:
        await admin.close()


async def _produce(bootstrap: str, topic: str, values: list[bytes], partition: int) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True
    )
    await producer.start()
    try:
        for value in values:
            meta = await producer.send_and_wait(topic, value, partition=partition)
            assert meta.partition == partition
    finally:
        await producer.stop()


async def _consume(bootstrap: str, topic: str, partition: int, count: int) -> list[bytes]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        got: list[bytes] = []
        while len(got) < count:
            batch = await consumer.getmany(tp, timeout_ms=10_000)
            records = batch.get(tp, [])
            if not records:
                break
            got.extend(r.value for r in records if r.value is not None)
        return got
    finally:
        await consumer.stop()


async def test_metadata_and_roundtrip(kafka_bootstrap: str) -> None:
    assert kafka_bootstrap.startswith("127.0.0.1:")
    topic = f"pqcnet-test-services-{uuid.uuid4().hex[:12]}"
    await _create_topic(kafka_bootstrap, topic)

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        [described] = await admin.describe_topics([topic])
        assert described["error_code"] == 0
        assert {p["partition"] for p in described["partitions"]} == set(range(PARTITIONS))
        assert all(p["leader"] == 1 for p in described["partitions"])
    finally:
        await admin.close()

    value = uuid.uuid4().bytes
    await _produce(kafka_bootstrap, topic, [value], partition=7)
    assert await _consume(kafka_bootstrap, topic, partition=7, count=1) == [value]


async def test_acknowledged_records_survive_restart(kafka_bootstrap: str) -> None:
    topic = f"pqcnet-test-restart-{uuid.uuid4().hex[:12]}"
    await _create_topic(kafka_bootstrap, topic)
    values = [f"record-{i}".encode() for i in range(20)]
    await _produce(kafka_bootstrap, topic, values, partition=3)

    services_ctl.restart("kafka")
    assert services_ctl.env()["PQCNET_KAFKA_BOOTSTRAP"] == kafka_bootstrap

    assert await _consume(kafka_bootstrap, topic, partition=3, count=len(values)) == values
