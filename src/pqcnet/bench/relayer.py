"""``pqcnet bench relayer --backend {embedded,redis,kafka}``: end-to-end frames/s.

The relayer runs as its own process (``pqcnet relayer run``, 32 shards) so it gets a
core of its own; this process runs the publishers and subscribers over real QSTP
tunnels on loopback. Measured: frames/s from the first publish until subscribers
have every frame (ingress → durable bus publish → shard workers → egress), and in
the same run the raw backend write rate with no pqcnet in the path:

* embedded: rocksdict ``WriteBatch`` puts of the same record size, 512 per batch;
* redis: pipelined ``XADD``, 512 per pipeline;
* kafka: aiokafka idempotent ``acks=all`` producer, ``send_batch`` of 512 records.

Targets (issue 4): >= 10,000 frames/s and >= 0.5x the raw write rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import click
import yaml
from tqdm import tqdm

from pqcnet.bench._env import services_env
from pqcnet.identity import dev_identities
from pqcnet.relayer.client import PublisherClient, SubscriberClient
from pqcnet.relayer.frame import Frame, encode

TARGET_FPS = 10_000
TARGET_RATIO = 0.5


async def _raw_rate(backend: str, n: int, size: int, tmp: Path, url: str) -> float:
    rec = encode(Frame("bench-customer", "bench-channel", 1, os.urandom(size)))
    if backend == "embedded":
        import rocksdict

        from pqcnet.relayer.bus.embedded import open_rocks

        db = open_rocks(tmp / "raw")
        t0 = time.perf_counter()
        for start in range(0, n, 512):
            wb = rocksdict.WriteBatch(raw_mode=True)
            for i in range(start, min(start + 512, n)):
                wb.put(i.to_bytes(10, "big"), rec)
            db.write(wb)
        dt = time.perf_counter() - t0
        db.close()
        return n / dt
    if backend == "redis":
        import redis.asyncio as aioredis

        r = aioredis.from_url(url)
        key = f"bench:raw:{uuid.uuid4().hex[:8]}"
        t0 = time.perf_counter()
        for start in range(0, n, 512):
            pipe = r.pipeline(transaction=False)
            for _ in range(start, min(start + 512, n)):
                pipe.xadd(key, {b"d": rec})
            await pipe.execute()
        dt = time.perf_counter() - t0
        await r.delete(key)
        await r.aclose()
        return n / dt
    from aiokafka import AIOKafkaProducer

    from pqcnet.relayer.bus.kafka import KafkaBus

    topic = f"bench-raw-{uuid.uuid4().hex[:8]}"
    setup = KafkaBus(url, 32, topic=topic)
    await setup.start()  # same topic shape (32 partitions) as the relayer's
    await setup.close()
    prod = AIOKafkaProducer(bootstrap_servers=url, enable_idempotence=True, acks="all",
                            linger_ms=2)
    await prod.start()
    t0 = time.perf_counter()
    futs = []
    for start in range(0, n, 512):  # batches of 512 records, spread over the partitions
        batch = prod.create_batch()
        for _ in range(start, min(start + 512, n)):
            if batch.append(key=None, value=rec, timestamp=None) is None:
                batch.close()
                futs.append(await prod.send_batch(batch, topic, partition=start // 512 % 32))
                batch = prod.create_batch()
                batch.append(key=None, value=rec, timestamp=None)
        batch.close()
        futs.append(await prod.send_batch(batch, topic, partition=start // 512 % 32))
    await asyncio.gather(*futs)
    dt = time.perf_counter() - t0
    await prod.stop()
    return n / dt


async def _e2e(port: int, ids: Any, frames: int, publishers: int, topics: int, batch: int,
               size: int) -> tuple[float, int]:
    customers = [f"cust{i}" for i in range(4)]
    subs = []
    got = {"n": 0}
    done = asyncio.Event()
    for c in customers:
        s = await SubscriberClient.connect("127.0.0.1", port, ids[2])
        await s.subscribe(c)
        subs.append(s)

    async def drain(s: SubscriberClient) -> None:
        async for b in s.batches():
            got["n"] += len(b)
            if got["n"] >= frames:
                done.set()

    drains = [asyncio.create_task(drain(s)) for s in subs]
    clients = [await PublisherClient.connect("127.0.0.1", port, ids[1])
               for _ in range(publishers)]
    per_pub = frames // publishers
    payload = os.urandom(size)
    bar = tqdm(total=frames, unit="frame", desc="relayer e2e", disable=None)

    async def pub(k: int, client: PublisherClient) -> None:
        mine = [(customers[t % 4], f"ch{t}") for t in range(k, topics, publishers)]
        seq = {t: 0 for t in mine}
        sent = 0
        inflight: set[asyncio.Task[Any]] = set()
        while sent < per_pub:
            fr: list[Frame] = []
            for _ in range(min(batch, per_pub - sent)):
                t = mine[(sent + len(fr)) % len(mine)]
                seq[t] += 1
                fr.append(Frame(t[0], t[1], seq[t], payload))
            sent += len(fr)
            task = asyncio.create_task(client.publish(fr))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
            bar.update(len(fr))
            if len(inflight) >= 8:
                await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
        for res in await asyncio.gather(*inflight):
            assert all(r.accepted for r in res)

    t0 = time.perf_counter()
    await asyncio.gather(*(pub(k, c) for k, c in enumerate(clients)))
    await asyncio.wait_for(done.wait(), 300)
    elapsed = time.perf_counter() - t0
    bar.close()
    for d in drains:
        d.cancel()
    for client in clients:
        await client.close()
    for s in subs:
        await s.close()
    return per_pub * publishers / elapsed, got["n"]


async def _relayer_proc(cfg: Path) -> tuple[asyncio.subprocess.Process, int]:
    pqcnet = str(Path(sys.executable).parent / "pqcnet")
    log = (cfg.parent / "relayer.log").open("ab")
    proc = await asyncio.create_subprocess_exec(
        pqcnet, "relayer", "run", "--config", str(cfg), stdout=asyncio.subprocess.PIPE,
        stderr=log)
    log.close()
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 120)
    if not line:
        raise click.ClickException("relayer did not start: "
                                   + (cfg.parent / "relayer.log").read_text()[-1500:])
    return proc, int(json.loads(line)["port"])


def run(backend: str = "embedded", frames: int = 60_000, publishers: int = 4,
        topics: int = 64, batch: int = 256, size: int = 64) -> dict[str, Any]:
    """Run the benchmark; returns the JSON-able result."""
    url = ""
    if backend == "redis":
        url = services_env("PQCNET_REDIS_URL")
    elif backend == "kafka":
        url = services_env("PQCNET_KAFKA_BOOTSTRAP")
    if backend != "embedded" and not url:
        raise click.ClickException(f"{backend} is not running (scripts/services start)")

    async def go() -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="pqcnet-bench-relayer-") as d:
            tmp = Path(d)
            _, ids = dev_identities("pqcnet.bench", "spiffe://pqcnet.bench/b/relayer/r",
                                    "spiffe://pqcnet.bench/b/publisher/p",
                                    "spiffe://pqcnet.bench/b/subscriber/s")
            ids[0].save(tmp / "ident", None)
            cfg: dict[str, Any] = {"node_id": "bench-relayer", "listen_port": 0,
                                   "identity_dir": str(tmp / "ident"),
                                   "data_dir": str(tmp / "data"), "shards": 32,
                                   "backend": backend}
            if backend == "redis":
                cfg.update(redis_url=url, redis_prefix=f"bench:{uuid.uuid4().hex[:8]}")
            if backend == "kafka":
                cfg.update(kafka_bootstrap=url, kafka_topic=f"bench-{uuid.uuid4().hex[:8]}")
            path = tmp / "relayer.yaml"
            path.write_text(yaml.safe_dump({"relayer": cfg}))
            proc, port = await _relayer_proc(path)
            try:
                fps, received = await _e2e(port, ids, frames, publishers, topics, batch, size)
            finally:
                proc.terminate()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 30)
                if proc.returncode is None:
                    proc.kill()
            raw = await _raw_rate(backend, frames, size, tmp, url)
        return {
            "benchmark": "relayer", "backend": backend, "shards": 32, "frames": frames,
            "received": received, "publishers": publishers, "topics": topics,
            "batch": batch, "payload_bytes": size,
            "e2e_frames_per_s": round(fps), "baseline": {
                "what": {"embedded": "rocksdict WriteBatch put (512/batch)",
                         "redis": "pipelined XADD (512/pipeline)",
                         "kafka": "aiokafka idempotent acks=all send_batch (512/batch)"}[backend],
                "raw_writes_per_s": round(raw)},
            "ratio": round(fps / raw, 3),
            "targets": {"frames_per_s": TARGET_FPS, "ratio": TARGET_RATIO,
                        "met_fps": fps >= TARGET_FPS, "met_ratio": fps / raw >= TARGET_RATIO},
        }

    return asyncio.run(go())


@click.command()
@click.option("--backend", type=click.Choice(["embedded", "redis", "kafka"]),
              default="embedded", show_default=True)
@click.option("--frames", default=60_000, show_default=True, type=click.IntRange(1000))
@click.option("--publishers", default=4, show_default=True, type=click.IntRange(1, 64))
@click.option("--topics", default=64, show_default=True, type=click.IntRange(1))
@click.option("--batch", default=256, show_default=True, type=click.IntRange(1, 4096))
@click.option("--size", default=64, show_default=True, type=click.IntRange(0),
              help="Payload bytes per frame.")
def cli(backend: str, frames: int, publishers: int, topics: int, batch: int, size: int) -> None:
    """End-to-end relayer frames/s (32 shards) vs the raw backend write rate."""
    click.echo(json.dumps(run(backend, frames, publishers, topics, batch, size), indent=2))
