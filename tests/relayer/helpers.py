"""Shared pieces for relayer tests: a collecting sink and a checker for exactly-once order."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import subprocess
import urllib.request
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from pqcnet.relayer.frame import Frame, Topic, shard_for


def one_shard_worker(tmp_path: Path, redis: Callable[..., Any] | None = None,
                     **cfg: Any) -> tuple[Any, Any, CollectSink, Any]:
    """One shard on the embedded bus (or on Redis, given ``redis_bus_factory``), its
    marks store, a :class:`CollectSink` and a worker with ``WorkerConfig(**cfg)``."""
    from pqcnet.relayer.bus.embedded import EmbeddedBus
    from pqcnet.relayer.seqstore import RedisSeqStore, RocksSeqStore
    from pqcnet.relayer.worker import RelayerShardWorker, WorkerConfig

    bus: Any
    store: Any
    if redis is None:
        bus = EmbeddedBus(tmp_path / "bus", shards=1)
        store = RocksSeqStore(tmp_path / "marks")
    else:
        bus = redis(shards=1)
        store = RedisSeqStore(bus.client, bus.prefix)
    sink = CollectSink()
    return bus, store, sink, RelayerShardWorker(bus, 0, store, sink, WorkerConfig(**cfg))


class CollectSink:
    """Records every delivered frame per topic, in delivery order."""

    def __init__(self) -> None:
        self.by_topic: dict[Topic, list[int]] = defaultdict(list)
        self.frames: list[Frame] = []
        self.changed = asyncio.Event()
        self.fail_next = 0
        self.fail_with: Exception = OSError("subscriber went away")
        #: topics nobody takes (a worker that parks passes over their frames); bump
        #: ``generation`` after taking one out, as the hub does when a subscriber joins
        self.absent: set[Topic] = set()
        self.generation = 0

    async def deliver(self, shard: int, frames: Sequence[Frame], *,
                      park: bool = False) -> Sequence[Frame]:
        if self.fail_next:
            self.fail_next -= 1
            raise self.fail_with
        held = [f for f in frames if f.topic in self.absent] if park else []
        for f in frames:
            if not held or f.topic not in self.absent:
                self.by_topic[f.topic].append(f.seq)
                self.frames.append(f)
        self.changed.set()
        return held

    def takes(self, topic: Topic) -> bool:
        return topic not in self.absent

    def total(self) -> int:
        return len(self.frames)

    async def wait_for(self, n: int, limit: float = 30.0) -> None:
        async def _wait() -> None:
            while self.total() < n:
                self.changed.clear()
                await self.changed.wait()
        await asyncio.wait_for(_wait(), limit)


def same_shard(shards: int) -> tuple[str, str]:
    """A channel of ``acme`` and one of ``globex`` whose topics share one of ``shards``."""
    for i in range(10_000):
        for j in range(64):
            if shard_for("acme", f"a{i}", shards) == shard_for("globex", f"g{j}", shards):
                return f"a{i}", f"g{j}"
    raise AssertionError("no shared shard")


def assert_exactly_once_in_order(
    by_topic: dict[Topic, list[int]], expect: dict[Topic, int]
) -> None:
    """Every topic got exactly seqs 1..n, in order, no duplicates."""
    missing, extra = set(expect) - set(by_topic), set(by_topic) - set(expect)
    assert not missing and not extra, (missing, extra)
    for topic, n in expect.items():
        got = by_topic[topic]
        assert got == list(range(1, n + 1)), (topic, got[:20], len(got))


async def eventually(pred: Callable[[], object], limit: float = 60.0, step: float = 0.05) -> None:
    """Poll ``pred`` until true; TimeoutError after ``limit`` seconds (never a timing claim)."""
    async with asyncio.timeout(limit):
        while not pred():  # noqa: ASYNC110 - state lives in other objects; polling is simplest
            await asyncio.sleep(step)


async def private_redis(port: int, data: Path) -> asyncio.subprocess.Process:
    """A redis-server of the test's own on ``port`` with its files in ``data`` (AOF with
    fsync always: what it acknowledged survives its SIGKILL); returns once it accepts
    connections. Stop it with ``kill()`` + ``wait()``."""
    exe = shutil.which("redis-server")
    assert exe, "redis-server (installed by scripts/services install redis)"
    await asyncio.to_thread(data.mkdir, exist_ok=True)
    proc = await asyncio.create_subprocess_exec(
        exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
        "--appendonly", "yes", "--appendfsync", "always", "--save", "",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)

    async def answers() -> bool:
        try:
            _r, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return False
        w.close()
        return True

    async with asyncio.timeout(30):
        while not await answers():
            assert proc.returncode is None, "redis-server exited at start"
            await asyncio.sleep(0.05)
    return proc


def redis_cli(redis_url: str, *args: str) -> str:
    """``redis-cli`` itself: counts that do not go through pqcnet's code."""
    exe = shutil.which("redis-cli")
    assert exe, "redis-cli (installed with redis-server by scripts/services)"
    out = subprocess.run([exe, "-u", redis_url, "--no-raw", *args], check=True,
                         capture_output=True, text=True, timeout=30)
    return out.stdout


@contextlib.asynccontextmanager
async def redis_monitor(redis_url: str) -> AsyncIterator[list[str]]:
    """``redis-cli MONITOR`` for the block: the list it yields holds every command line
    Redis echoed (a script's own calls as ``[db lua]``) once the block is left."""
    exe = shutil.which("redis-cli")
    assert exe, "redis-cli (installed with redis-server by scripts/services)"
    proc = await asyncio.create_subprocess_exec(exe, "-u", redis_url, "MONITOR",
                                                stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    assert (await asyncio.wait_for(proc.stdout.readline(), 10)).strip() == b"OK"
    lines: list[str] = []
    try:
        yield lines
    finally:
        await asyncio.sleep(0.2)  # the last commands reach the monitor
        proc.terminate()
        out, _ = await asyncio.wait_for(proc.communicate(), 10)
        lines += out.decode(errors="replace").splitlines()


def redis_pending(redis_url: str, key: str, group: str, consumer: str | None = None) -> int:
    """Pending entries of ``group`` on stream ``key`` (of one ``consumer`` if given), as
    ``redis-cli XPENDING`` counts them."""
    if consumer is None:
        return int(redis_cli(redis_url, "XPENDING", key, group).splitlines()[0].split()[-1])
    out = redis_cli(redis_url, "XPENDING", key, group, "-", "+", "1000", consumer)
    return len(re.findall(r'"\d+-\d+"', out))  # one entry id per pending entry


def scrape_metrics(port: int) -> dict[str, float]:
    """A relayer's ``/metrics`` over HTTP, as ``{'name{labels}': value}`` (what a
    Prometheus scrape sees, not the in-process registry)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


async def metrics_reach(port: int, want: dict[str, float], limit: float = 10.0) -> None:
    """Scrape ``/metrics`` (over HTTP) until every series in ``want`` has its value;
    AssertionError naming what was seen after ``limit`` seconds."""
    seen: dict[str, float | None] = {}
    try:
        async with asyncio.timeout(limit):
            while True:
                got = await asyncio.to_thread(scrape_metrics, port)
                seen = {k: got.get(k) for k in want}
                if seen == want:
                    return
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"metrics {seen}, want {want}") from None


async def offer_over_quota(pub: Any, channel: str, until: float,
                           counts: dict[str, int]) -> None:
    """Publish 10 frames of customer acme on ``channel`` every 20 ms until ``until``
    (monotonic), far over the small quotas of the quota tests; count the accepted
    (``ok``) and the retriable QuotaExceeded (code 33, ``quota``) — any other refusal
    fails the test."""
    import time

    seq = 0
    while time.monotonic() < until:
        frames = [Frame("acme", channel, seq + i + 1, b"q") for i in range(10)]
        seq += 10
        for r in await pub.publish(frames):
            if r.accepted:
                counts["ok"] += 1
            else:
                assert r.code == 33 and r.retriable, r
                counts["quota"] += 1
        await asyncio.sleep(0.02)
