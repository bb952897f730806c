"""An independent consumer of the relayers' Kafka topic (run inside a container of the
compose network: the broker advertises kafka:9092): reads every partition from the
beginning to its end offset, without a consumer group (commits nothing, moves no
relayer's offsets), and prints, for one (customer, channel), each seq's payload digests
as found in the log — one per record, so a frame written twice shows twice.

    python3 kafka_dump.py CUSTOMER CHANNEL
"""

import asyncio
import json
import sys

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from pqcnet.relayer.cursor import payload_digest
from pqcnet.relayer.frame import decode


async def main(customer: str, channel: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers="kafka:9092")
    await admin.start()
    try:
        (desc,) = await admin.describe_topics(["pqcnet.relayer"])
    finally:
        await admin.close()
    c = AIOKafkaConsumer(bootstrap_servers="kafka:9092", group_id=None,
                         enable_auto_commit=False, auto_offset_reset="earliest")
    await c.start()
    try:
        tps = [TopicPartition("pqcnet.relayer", p["partition"]) for p in desc["partitions"]]
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        end = await c.end_offsets(tps)
        seen: dict[str, list[str]] = {}
        records = 0
        async def behind() -> bool:
            return any([await c.position(tp) < end[tp] for tp in tps])

        while await behind():
            for recs in (await c.getmany(*tps, timeout_ms=1000)).values():
                for r in recs:
                    records += 1
                    f = decode(r.value)
                    if (f.customer, f.channel) == (customer, channel):
                        seen.setdefault(str(f.seq), []).append(payload_digest(f.payload))
    finally:
        await c.stop()
    print(json.dumps({"partitions": len(tps), "records": records, "seen": seen}))

asyncio.run(main(sys.argv[1], sys.argv[2]))
