"""``pqcnet bench parking``: what a topic nobody reads costs the others on its shard.

A relayer process (``pqcnet relayer run``, ``--backend`` embedded, redis or kafka,
**one shard**, so every topic shares it) and, in this process, publishers and
subscribers over real QSTP tunnels:

* **baseline** — the ``live`` customer publishes ``--frames`` frames on 4 topics (one
  publisher each, ``--batch`` frames per request, one request in flight) and its
  subscriber drains them: frames/s from the first publish to the last frame received;
* **parked** — a fresh relayer, the same load, plus the ``idle`` customer publishing
  ``--parked-share`` as many frames on a channel nobody subscribes to, mixed in: the
  live customer's frames/s and its ratio to the baseline (parking's cost: the extra
  records and the passing over). Then the idle customer's subscriber arrives: seconds
  until it has every parked frame — the replay of the records behind the park — and
  the replayed records per second;
* **off** — ``park_max_records: 0`` (what the relayer did before parking): live frames
  delivered within ``--hold-window`` seconds after the first idle frame; the shard
  holds, so this is about one batch.

Every frame is checked at the subscribers: each seq once, in order, per topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import click

from pqcnet.bench._env import services_env
from pqcnet.bench._stats import machine, ratio
from pqcnet.bench.relayer import relayer_config, relayer_process
from pqcnet.identity import NodeIdentity, dev_identities
from pqcnet.relayer.client import PublisherClient, SubscriberClient
from pqcnet.relayer.frame import Frame, Topic

LIVE_TOPICS = 4
IDLE: Topic = ("idle", "nobody-reads")


class _Drain:
    """A subscriber that records each topic's seqs and counts what it got."""

    def __init__(self, client: SubscriberClient) -> None:
        self.client = client
        self.seqs: dict[Topic, list[int]] = defaultdict(list)
        self.got = 0
        self.changed = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for batch in self.client.batches():
            for f in batch:
                self.seqs[f.topic].append(f.seq)
            self.got += len(batch)
            self.changed.set()

    async def wait_for(self, n: int, limit: float) -> float:
        """Seconds until ``n`` frames were received (raises after ``limit``)."""
        t0 = time.perf_counter()
        async with asyncio.timeout(limit):
            while self.got < n:
                self.changed.clear()
                await self.changed.wait()
        return time.perf_counter() - t0

    def check(self, expect: dict[Topic, int]) -> None:
        for topic, n in expect.items():
            if self.seqs[topic] != list(range(1, n + 1)):
                raise click.ClickException(f"{topic}: not every seq once in order")

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.client.close()


async def _publish(client: PublisherClient, topic: Topic, first: int, last: int,
                   batch: int, size: int) -> None:
    """Seqs ``first..last`` of ``topic``, ``batch`` per request, one request in flight."""
    for start in range(first, last + 1, batch):
        results = await client.publish([Frame(*topic, s, b"x" * size)
                                        for s in range(start, min(start + batch, last + 1))])
        if not all(r.accepted for r in results):
            raise click.ClickException(f"publish refused: {results[0]}")


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise click.ClickException(f"{name} not on /metrics")


async def _one(ids: list[NodeIdentity], frames: int, idle_frames: int, batch: int,
               size: int, park_max_records: int, hold_window: float,
               backend: str = "embedded", url: str = "") -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pqcnet-bench-parking-") as d:
        tmp = Path(d)
        ids[0].save(tmp / "ident", None)
        path = relayer_config(tmp, backend, url, shards=1, metrics_port=0,
                              park_max_records=park_max_records)
        proc, ready = await relayer_process(path)
        port, mport = int(ready["port"]), int(ready["metrics_port"])
        live = _Drain(await _subscriber(port, ids[2], "live"))
        pubs = [await PublisherClient.connect("127.0.0.1", port, ids[1])
                for _ in range(LIVE_TOPICS + 1)]
        idle: _Drain | None = None
        out: dict[str, Any] = {}
        try:
            per = frames // LIVE_TOPICS
            topics = [("live", f"t{i}") for i in range(LIVE_TOPICS)]
            await asyncio.sleep(0.3)  # subscribed
            jobs = [_publish(p, t, 1, per, batch, size)
                    for p, t in zip(pubs, topics, strict=False)]
            if idle_frames:
                # the idle customer's first request before any live frame: every live
                # frame is behind the park; the rest mixed in
                head = min(batch, idle_frames)
                await _publish(pubs[-1], IDLE, 1, head, batch, size)
                jobs.append(_publish(pubs[-1], IDLE, head + 1, idle_frames, batch, size))
            t0 = time.perf_counter()
            if park_max_records == 0 and idle_frames:
                tasks = [asyncio.create_task(j) for j in jobs]
                await asyncio.sleep(hold_window)
                out["live_frames_in_window"] = live.got
                out["hold_window_s"] = hold_window
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                return out
            await asyncio.gather(*jobs)
            await live.wait_for(per * LIVE_TOPICS, 300)
            dt = time.perf_counter() - t0
            live.check(dict.fromkeys(topics, per))
            out["live_frames"] = per * LIVE_TOPICS
            out["live_frames_per_s"] = round(per * LIVE_TOPICS / dt, 1)
            if idle_frames:
                # every record is behind the park (the idle customer's came first); the
                # last step counts its records after the subscriber already has them
                want = per * LIVE_TOPICS + idle_frames
                for _ in range(100):
                    behind = _metric(mport, "pqcnet_relayer_records_behind_park")
                    if behind >= want:
                        break
                    await asyncio.sleep(0.05)
                out["records_behind_park"] = int(behind)
                out["parked_topics"] = int(_metric(mport, "pqcnet_relayer_parked_topics"))
                idle = _Drain(await _subscriber(port, ids[2], "idle"))
                replay = await idle.wait_for(idle_frames, 300)
                idle.check({IDLE: idle_frames})
                out["idle_frames"] = idle_frames
                out["replay_s"] = round(replay, 3)
                out["replayed_records_per_s"] = round(behind / replay, 1) if replay else None
                out["park_replays"] = int(_metric(mport, "pqcnet_relayer_park_replays_total"))
            return out
        finally:
            for drain in (live, idle):
                if drain is not None:
                    await drain.close()
            for p in pubs:
                await p.close()
            proc.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 30)
            if proc.returncode is None:
                proc.kill()


async def _subscriber(port: int, ident: NodeIdentity, customer: str) -> SubscriberClient:
    client = await SubscriberClient.connect("127.0.0.1", port, ident)
    await client.subscribe(customer)
    return client


def run(frames: int = 40_000, parked_share: float = 0.1, batch: int = 256, size: int = 64,
        hold_window: float = 3.0, backend: str = "embedded") -> dict[str, Any]:
    """Run the benchmark; returns the JSON-able result."""
    url = ""
    if backend != "embedded":
        url = services_env("PQCNET_REDIS_URL" if backend == "redis"
                           else "PQCNET_KAFKA_BOOTSTRAP")
        if not url:
            raise click.ClickException(f"{backend} is not running (scripts/services start)")
    _, ids = dev_identities("pqcnet.bench", "spiffe://pqcnet.bench/b/relayer/r",
                            "spiffe://pqcnet.bench/b/publisher/p",
                            "spiffe://pqcnet.bench/b/subscriber/s")
    idle = max(1, int(frames * parked_share))
    before = machine()
    base = asyncio.run(_one(ids, frames, 0, batch, size, 50_000, hold_window, backend, url))
    parked = asyncio.run(_one(ids, frames, idle, batch, size, max(50_000, 2 * frames),
                              hold_window, backend, url))
    off = asyncio.run(_one(ids, frames, idle, batch, size, 0, hold_window, backend, url))
    return {
        "benchmark": "parking",
        "setup": {"backend": backend, "frames": frames, "parked_share": parked_share,
                  "batch": batch,
                  "size": size, "shards": 1, "live_topics": LIVE_TOPICS},
        "baseline": base,
        "parked": parked,
        "parking_off": off,
        "ratios": {"live_with_parked_vs_baseline": ratio(parked["live_frames_per_s"],
                                                         base["live_frames_per_s"])},
        "machine": {"before": before, "after": machine()},
    }


@click.command("parking")
@click.option("--frames", default=40_000, show_default=True, type=click.IntRange(LIVE_TOPICS),
              help="Live customer's frames (over 4 topics).")
@click.option("--parked-share", default=0.1, show_default=True,
              type=click.FloatRange(0.0, 1.0, min_open=True),
              help="Frames of the customer nobody subscribes to, as a share of --frames.")
@click.option("--batch", default=256, show_default=True, type=click.IntRange(1, 4096))
@click.option("--size", default=64, show_default=True, type=click.IntRange(1))
@click.option("--hold-window", default=3.0, show_default=True,
              type=click.FloatRange(0.5, 60), help="Seconds watched with parking off.")
@click.option("--backend", default="embedded", show_default=True,
              type=click.Choice(["embedded", "redis", "kafka"]),
              help="The relayer's bus (redis/kafka: scripts/services start).")
def cli(frames: int, parked_share: float, batch: int, size: int, hold_window: float,
        backend: str) -> None:
    """A topic nobody subscribes to vs the live topics on its shard: live frames/s with
    it parked vs without it, the replay when its subscriber comes, and parking off."""
    click.echo(json.dumps(run(frames, parked_share, batch, size, hold_window, backend),
                          indent=2))
