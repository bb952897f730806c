"""Rounds of the relayer's trim loop on the embedded bus, timed (run with the tree to
measure on ``PYTHONPATH``): each round publishes one record to every shard, consumes
and acks it, and trims every shard, as a relayer at low steady traffic does each second.
Prints JSON: rounds, seconds, max RSS."""

import asyncio
import json
import resource
import sys
import tempfile
import time

from pqcnet.relayer.bus.embedded import EmbeddedBus


async def main(rounds: int, shards: int = 32) -> None:
    bus = EmbeddedBus(tempfile.mkdtemp() + "/bus", shards=shards)
    t0 = time.perf_counter()
    for _ in range(rounds):
        for s in range(shards):
            await bus.publish(s, [b"x" * 64])
            await bus.ack(s, "g", await bus.consume(s, "g", block=0.1))
        for s in range(shards):
            await bus.lag(s, "g")
            bus.trim(s, ["g"])
    print(json.dumps({"rounds": rounds, "shards": shards,
                      "seconds": round(time.perf_counter() - t0, 3),
                      "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))
    await bus.close()


asyncio.run(main(int(sys.argv[1])))
