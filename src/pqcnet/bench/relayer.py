"""``pqcnet bench relayer --backend {embedded,redis,kafka}``: end-to-end frames/s.

The relayer runs as its own process (``pqcnet relayer run``, 32 shards) so it gets a
core of its own; this process runs the publishers and subscribers over real QSTP
tunnels on loopback. Measured: frames/s from the first publish until subscribers
have every frame (ingress → durable bus publish → shard workers → egress), and in
the same run the raw backend write rate with no pqcnet in the path:

* embedded: rocksdict ``WriteBatch`` puts of the same record size, 512 per batch;
* redis: pipelined ``XADD``, 512 per pipeline;
* kafka: aiokafka idempotent ``acks=all`` producer, ``send_batch`` of 512 records.

Before the timed run untimed ones of a fifth of ``--frames`` each (other topics,
prefixes ``warm0``, ``warm1``...) bring the pipeline to its steady state: at least two,
and more while a round is still over 1.2x faster than the one before (at most
:data:`WARMUP_MAX_ROUNDS`); their rates are in the JSON (``saturated.warmup_rounds``,
the last one as ``saturated.warmup``). On Kafka a new 32-partition topic settles in the
first seconds: in five 60k-frame runs without a warm-up a stall of ~0.7 s at the start
(deliveries at ~2.5k frames/s) came in some runs and not others, 26k-48k frames/s; on
2026-12-03 the stall lasted up to ~4 s in most runs, longer than one warm-up round —
the broker's request log put it in its produce handling (``localTimeMs`` 0.3-1.5 s per
produce request), which a bare aiokafka producer and consumer on a new topic did not
see (benchmarks/README.md, "Kafka's first seconds, continued").

Every frame carries its send time, so the subscribers also measure publish→deliver
latency: in the saturated run (8 requests of ``--batch`` frames in flight per
publisher, so p50 ≈ frames in flight / throughput by Little's law) and in a *paced*
run (one-frame publishes at ``--paced-rate``, below saturation: what one frame costs).
The paced run starts once the relayer went quiet after the saturated one (at most
15 s, ``settled_after_s`` in the JSON): before, its first seconds paid for the
saturated phase's after-work, and the paced Redis p99 depended on what ran before.
nats-py's paced run waits the same way for nats-server (its pid from
``scripts/services``), so both p99s of the ratio start from a quiet server.

Same-run baselines beyond the raw backend (issue 15), same frame size and topic count:

* the QSTP small-frame echo rate over as many tunnels (:mod:`pqcnet.bench._echo`):
  every relayed frame crosses QSTP twice, so this is the tunnel's own ceiling;
* NATS JetStream with TLS, file storage, ``Nats-Msg-Id`` dedup and explicit acks
  (:mod:`pqcnet.bench._nats`), driven by ``nats-py`` (saturated and paced, with
  latency) and by NATS's Go benchmark client (``nats bench js``), when
  ``scripts/services start nats`` runs; otherwise the JSON says it was skipped.

``--workers N`` (redis, kafka): the relayer runs as ``pqcnet relayer run --workers N``
(N processes on one port, the shards split between them), and the same run measures
one worker first: the JSON's ``workers`` part has both frames/s, their ratio, and the
relayer processes' CPU-seconds per frame (from ``/proc/<pid>/stat``, every worker
summed; ``per_worker`` splits it), whose N-worker / 1-worker ratio predicts scaling on
a host with a core per worker. Publishers use the shared port; one subscriber per
customer per worker (each worker delivers the shards it owns).

``--quota-rate R --quota-scope host|cluster``: every customer gets a quota of R
frames/s (one second's burst) checked by this host's buckets or drawn from the
cluster's in Redis (``quota_scope``; cluster: backend redis, or kafka with
``--marks-in-redis``), and the same run measures the relayer without quotas first: the
JSON's ``quotas`` part has both frames/s, CPU per frame and paced latency, and their
ratios — the cost of checking a quota. R must exceed what the run reaches per customer
(the bench stops with an error at a refused frame).

``--marks-in-redis`` (kafka): the relayer keeps its dedup marks and metered volume in
Redis (``redis_url``, a fresh prefix), as a Kafka relayer cluster does to move them with
a partition — fenced by the group generation (decision 0025); without it they stay in
the relayer's node-local RocksDB. The JSON's ``marks`` says which ran.

What the bench relayer wrote to Redis / Kafka (its prefix, its topic) is dropped once
measured, and the JSON's ``broker_state`` lists it (:mod:`pqcnet.bench._broker`);
``--keep-broker-state`` keeps it to look at. A run that fails or is interrupted drops
it too, and says on stderr what it dropped: Ctrl-C (SIGINT) and SIGTERM stop the run
that way (``pqcnet bench`` runs under :func:`pqcnet._util.signals.stopping`), exit
status 130 / 143, also where SIGINT came in ignored — in the same-run baselines too:
the echo server is stopped, the NATS streams deleted, ``nats bench`` ended.

Targets (issue 4): >= 10,000 frames/s and >= 0.5x the raw write rate. Issue 15: end
to end >= 0.5x the echo ceiling; embedded >= 1x NATS (Go client), Redis/Kafka >= 0.6x;
paced p99 <= 1.5x NATS's (nats-py, the only NATS client here that reports latency);
N=2 workers >= 1.3x one, CPU-seconds per frame within 15 % of one worker's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import click
import yaml
from tqdm import tqdm

from pqcnet._util.orphans import ending_with_us
from pqcnet.bench._broker import drop_kafka_topic, drop_relayer_state
from pqcnet.bench._cpu import cpu_seconds, settle
from pqcnet.bench._echo import echo_rate
from pqcnet.bench._env import services_env
from pqcnet.bench._nats import Latencies, NatsServer, nats_go, nats_py, pace, stamp
from pqcnet.bench._stats import machine, percentiles, ratio
from pqcnet.identity import NodeIdentity, dev_identities
from pqcnet.relayer.client import PublisherClient, SubscriberClient
from pqcnet.relayer.frame import Frame, encode

TARGET_FPS = 10_000
TARGET_RATIO = 0.5
#: issue 15: end to end >= 0.5x the QSTP small-frame echo ceiling
TARGET_VS_ECHO = 0.5
#: issue 15: embedded >= 1x NATS JetStream (Go client); Redis/Kafka >= 0.6x
TARGET_VS_NATS_BROKER = 0.6
#: issue 15: p99 publish->deliver <= NATS's x1.5
TARGET_P99_VS_NATS = 1.5
#: issue 15: 2 workers >= 1.3x one worker ...
TARGET_WORKERS_SPEEDUP = 1.3
#: ... with CPU-seconds per frame within 15 % of the 1-worker figure
TARGET_CPU_PER_FRAME_DRIFT = 0.15
#: seconds the workers get to split the shards (leases / group rebalance) before load
WORKERS_SETTLE = 6.0
#: each untimed warm-up round before the timed run: this share of ``--frames``
WARMUP_SHARE = 5
#: warm-up rounds at most (the last ones only while the rate still climbs)
WARMUP_MAX_ROUNDS = 6
#: a warm-up round this much faster than the one before: not steady yet, one more
WARMUP_STILL_CLIMBING = 1.2


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
    from aiokafka.errors import KafkaError

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
    try:
        await drop_kafka_topic(url, topic)
    except (OSError, KafkaError) as exc:  # measured already: say so, keep the number
        click.echo(f"warning: could not delete the raw baseline's topic {topic}: {exc!r}",
                   err=True)
    return n / dt


async def _drop(cfg: Path) -> dict[str, Any]:
    """Drop the bench relayer's broker state; a broker that fails to is reported, not
    raised (the measurement is done)."""
    from aiokafka.errors import KafkaError
    from redis.exceptions import RedisError

    try:
        return await drop_relayer_state(cfg)
    except (OSError, RedisError, KafkaError) as exc:
        return {"error": f"could not drop the run's broker state: {exc!r}"}


class _Clients:
    """Publishers and subscribers on their own QSTP tunnels, for one relayer."""

    def __init__(self, pubs: list[PublisherClient], subs: list[SubscriberClient]) -> None:
        self.pubs = pubs
        self.subs = subs
        self.got = 0
        self.want = 0
        self.lat: Latencies = Latencies(1)
        self.done = asyncio.Event()
        self._drains = [asyncio.create_task(self._drain(s)) for s in subs]

    @classmethod
    async def connect(cls, port: int, ids: Any, publishers: int,
                      sub_ports: list[int] | None = None) -> _Clients:
        """Publishers on ``port``; a subscriber per customer on each of ``sub_ports``
        (every worker's own port; default ``port``)."""
        subs = []
        for sp in sub_ports or [port]:
            for c in CUSTOMERS:
                s = await SubscriberClient.connect("127.0.0.1", sp, ids[2])
                await s.subscribe(c)
                subs.append(s)
        pubs = [await PublisherClient.connect("127.0.0.1", port, ids[1])
                for _ in range(publishers)]
        return cls(pubs, subs)

    async def _drain(self, s: SubscriberClient) -> None:
        async for b in s.batches():
            for f in b:
                self.lat.add(f.payload)
            self.got += len(b)
            if self.got >= self.want:
                self.done.set()

    def expect(self, n: int) -> None:
        self.got, self.want, self.lat = 0, n, Latencies(n)
        self.done.clear()

    async def close(self) -> None:
        for d in self._drains:
            d.cancel()
        for client in self.pubs:
            await client.close()
        for s in self.subs:
            await s.close()


CUSTOMERS = [f"cust{i}" for i in range(4)]


def _dump_tasks() -> None:
    """Print every asyncio task's stack to stderr (``bench relayer`` on SIGUSR1)."""
    for task in asyncio.all_tasks():
        print(f"-- task {task.get_name()}", file=sys.stderr)
        task.print_stack(limit=12, file=sys.stderr)
    sys.stderr.flush()


def _topics(k: int, topics: int, publishers: int, prefix: str) -> list[tuple[str, str]]:
    return [(CUSTOMERS[t % 4], f"{prefix}{t}") for t in range(k, topics, publishers)]


async def _saturated(clients: _Clients, frames: int, topics: int, batch: int,
                     size: int, prefix: str = "ch") -> dict[str, Any]:
    """Every publisher keeps 8 requests of ``batch`` frames in flight (on topics named
    ``prefix`` + number, each starting at seq 1)."""
    publishers = len(clients.pubs)
    per_pub = frames // publishers
    clients.expect(per_pub * publishers)
    bar = tqdm(total=frames, unit="frame", desc=f"relayer e2e ({prefix})", disable=None)

    refused: list[str] = []

    def answered(task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is None:
            refused.extend(r.reason for r in task.result() if not r.accepted)

    def stop_if_refused() -> None:
        if refused:  # a quota below the run's rate, say: the run would wait for ever
            raise click.ClickException(f"the relayer refused frames: {refused[0]}")

    async def pub(k: int, client: PublisherClient) -> None:
        mine = _topics(k, topics, publishers, prefix)
        seq = {t: 0 for t in mine}
        sent = 0
        inflight: set[asyncio.Task[Any]] = set()
        while sent < per_pub:
            fr: list[Frame] = []
            for _ in range(min(batch, per_pub - sent)):
                t = mine[(sent + len(fr)) % len(mine)]
                seq[t] += 1
                fr.append(Frame(t[0], t[1], seq[t], stamp(size)))
            sent += len(fr)
            task = asyncio.create_task(client.publish(fr))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
            task.add_done_callback(answered)
            bar.update(len(fr))
            if len(inflight) >= 8:
                await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                stop_if_refused()
        await asyncio.gather(*inflight)
        stop_if_refused()

    t0 = time.perf_counter()
    await asyncio.gather(*(pub(k, c) for k, c in enumerate(clients.pubs)))
    await asyncio.wait_for(clients.done.wait(), 300)
    elapsed = time.perf_counter() - t0
    bar.close()
    return {"frames": clients.want, "received": clients.got,
            "frames_per_s": round(clients.want / elapsed),
            "latency": percentiles(clients.lat.samples),
            "in_flight_frames": publishers * 8 * batch}


async def _warm_up(clients: _Clients, frames: int, topics: int, batch: int,
                   size: int) -> list[dict[str, int]]:
    """Untimed saturated rounds until the rate stops climbing (two at least)."""
    rounds: list[dict[str, int]] = []
    while len(rounds) < WARMUP_MAX_ROUNDS:
        r = await _saturated(clients, frames, topics, batch, size, prefix=f"warm{len(rounds)}")
        rounds.append({"frames": r["frames"], "frames_per_s": r["frames_per_s"]})
        if len(rounds) >= 2 and (rounds[-1]["frames_per_s"]
                                 < WARMUP_STILL_CLIMBING * rounds[-2]["frames_per_s"]):
            break
    return rounds


async def _paced_run(clients: _Clients, frames: int, topics: int, size: int,
                     rate: float) -> dict[str, Any]:
    """One-frame publishes at ``rate`` frames/s overall: latency below saturation."""
    publishers = len(clients.pubs)
    clients.expect(frames // publishers * publishers)
    mine = [_topics(k, topics, publishers, "paced") for k in range(publishers)]
    seqs: dict[tuple[str, str], int] = {}
    tasks: set[asyncio.Task[Any]] = set()

    async def send(k: int, i: int) -> None:
        t = mine[k][i % len(mine[k])]
        seqs[t] = seqs.get(t, 0) + 1
        task = asyncio.create_task(clients.pubs[k].publish([Frame(t[0], t[1], seqs[t],
                                                                  stamp(size))]))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    await pace(clients.want, rate, publishers, send)
    await asyncio.gather(*tasks)
    await asyncio.wait_for(clients.done.wait(), 300)
    return {"frames": clients.want, "received": clients.got, "offered_per_s": rate,
            "latency": percentiles(clients.lat.samples)}


def relayer_config(tmp: Path, backend: str, url: str, marks_url: str = "",
                   **extra: Any) -> Path:
    """Write a bench relayer's config in ``tmp`` (its identity saved in ``tmp/ident``)
    on ``backend`` (a fresh Redis prefix or Kafka topic and group each time; a Kafka
    relayer given ``marks_url`` keeps its marks and volume in that Redis, under a fresh
    prefix); returns the file. The bench tenant may publish and subscribe as any
    customer."""
    cfg: dict[str, Any] = {
        "node_id": "bench-relayer", "listen_port": 0, "identity_dir": str(tmp / "ident"),
        "data_dir": str(tmp / "data"), "backend": backend,
        "authz": {"customers": {"*": [{"from": ["spiffe://pqcnet.bench/b/*/*"],
                                       "methods": ["publish", "subscribe"]}]}},
        **extra}
    tag = uuid.uuid4().hex[:8]
    if backend == "redis":
        cfg.update(redis_url=url, redis_prefix=f"bench:{tag}")
    elif backend == "kafka":
        cfg.update(kafka_bootstrap=url, kafka_topic=f"bench-{tag}", group=f"bench-{tag}")
        if marks_url:
            cfg.update(redis_url=marks_url, redis_prefix=f"bench:{tag}")
    path = tmp / "relayer.yaml"
    path.write_text(yaml.safe_dump({"relayer": cfg}))
    return path


async def relayer_process(cfg: Path, workers: int = 1
                        ) -> tuple[asyncio.subprocess.Process, dict[str, Any]]:
    """``pqcnet relayer run`` (``--workers N``) and its ready line, with ``pids`` (the
    processes doing the work) and ``sub_ports`` (where subscribers reach them)."""
    pqcnet = str(Path(sys.executable).parent / "pqcnet")
    log = (cfg.parent / "relayer.log").open("ab")
    proc = await asyncio.create_subprocess_exec(
        *ending_with_us([pqcnet, "relayer", "run", "--config", str(cfg), "--workers",
                         str(workers)]), stdout=asyncio.subprocess.PIPE, stderr=log)
    log.close()
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 120)
    except BaseException:  # interrupted or timed out before ready: not left running
        proc.kill()
        await proc.wait()
        raise
    if not line:
        raise click.ClickException("relayer did not start: "
                                   + (cfg.parent / "relayer.log").read_text()[-1500:])
    ready: dict[str, Any] = json.loads(line)
    ready.setdefault("pids", [proc.pid])
    ready["sub_ports"] = ready.get("worker_ports") or [ready["port"]]
    return proc, ready


def run(backend: str = "embedded", frames: int = 60_000, publishers: int = 4,
        topics: int = 64, batch: int = 256, size: int = 64, paced_frames: int = 1000,
        paced_rate: float = 200.0, baselines: bool = True, workers: int = 1,
        marks_in_redis: bool = False, keep_broker_state: bool = False,
        quota_scope: str | None = None, quota_rate: float = 0.0) -> dict[str, Any]:
    """Run the benchmark; returns the JSON-able result."""
    quota = _quota_config(backend, workers, marks_in_redis, quota_scope, quota_rate)
    if workers > 1 and backend == "embedded":
        raise click.ClickException("--workers > 1 needs --backend redis or kafka: the "
                                   "embedded backend is single-process")
    if marks_in_redis and backend != "kafka":
        raise click.ClickException("--marks-in-redis is for --backend kafka (redis keeps "
                                   "its marks in Redis anyway; embedded keeps them local)")
    if size < 8:
        raise click.ClickException("--size must be >= 8: frames carry their send time")
    url = ""
    if backend == "redis":
        url = services_env("PQCNET_REDIS_URL")
    elif backend == "kafka":
        url = services_env("PQCNET_KAFKA_BOOTSTRAP")
    if backend != "embedded" and not url:
        raise click.ClickException(f"{backend} is not running (scripts/services start)")
    marks_url = services_env("PQCNET_REDIS_URL") if marks_in_redis else ""
    if marks_in_redis and not marks_url:
        raise click.ClickException("--marks-in-redis: redis is not running "
                                   "(scripts/services start redis)")
    before = machine()

    async def e2e(n_workers: int, paced_run: bool, extra: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="pqcnet-bench-relayer-") as d:
            tmp = Path(d)
            _, ids = dev_identities("pqcnet.bench", "spiffe://pqcnet.bench/b/relayer/r",
                                    "spiffe://pqcnet.bench/b/publisher/p",
                                    "spiffe://pqcnet.bench/b/subscriber/s")
            ids[0].save(tmp / "ident", None)
            path = relayer_config(tmp, backend, url, marks_url, shards=32, **(extra or {}))
            try:
                res = await measure(tmp, path, ids, n_workers, paced_run)
            except BaseException:  # failed or interrupted (Ctrl-C): dropped all the same
                if not keep_broker_state:
                    left = await _drop(path)
                    print(f"bench relayer: the run failed; its broker state: {left}",
                          file=sys.stderr)
                raise
            res["broker_state"] = {"kept": True} if keep_broker_state else await _drop(path)
            return res

    async def measure(tmp: Path, path: Path, ids: list[NodeIdentity], n_workers: int,
                      paced_run: bool) -> dict[str, Any]:
        """One relayer (``n_workers`` processes) measured; it has exited on return."""
        proc, ready = await relayer_process(path, n_workers)
        paced: dict[str, Any] = {}
        try:
            if n_workers > 1:  # let the workers split the shards before the load
                await asyncio.sleep(WORKERS_SETTLE)
            clients = await _Clients.connect(ready["port"], ids, publishers,
                                             ready["sub_ports"])
            try:
                warm = await _warm_up(clients, max(frames // WARMUP_SHARE, 1000),
                                      topics, batch, size)
                cpu0 = [cpu_seconds(p) for p in ready["pids"]]
                gen0 = time.process_time()
                sat = await _saturated(clients, frames, topics, batch, size)
                gen = time.process_time() - gen0
                cpu = [cpu_seconds(p) - c for p, c in zip(ready["pids"], cpu0, strict=True)]
                if paced_run:
                    settled = await settle(ready["pids"])
                    pcpu0 = [cpu_seconds(p) for p in ready["pids"]]
                    paced = await _paced_run(clients, paced_frames, topics, size,
                                             paced_rate)
                    paced.update(settled)
                    pcpu = sum(cpu_seconds(p) - c
                               for p, c in zip(ready["pids"], pcpu0, strict=True))
                    # what one single-frame request costs the relayer (idle work
                    # of the run's seconds included)
                    paced["relayer_cpu_us_per_frame"] = round(
                        pcpu / max(paced["frames"], 1) * 1e6, 1)
            finally:
                await clients.close()
        finally:
            proc.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 30)
            if proc.returncode is None:
                proc.kill()
        raw = await _raw_rate(backend, frames, size, tmp, url) if paced_run else 0.0
        sat["warmup_rounds"] = warm
        sat["warmup"] = warm[-1]
        sat["relayer_cpu_seconds"] = round(sum(cpu), 3)
        sat["relayer_cpu_us_per_frame"] = round(sum(cpu) / sat["frames"] * 1e6, 2)
        sat["per_worker_cpu_seconds"] = [round(c, 3) for c in cpu]
        # who is the bottleneck: a share near 1.0 is a process using its whole core
        wall = sat["frames"] / sat["frames_per_s"]
        sat["relayer_cpu_share"] = round(sum(cpu) / wall / n_workers, 3)
        sat["load_generator_cpu_seconds"] = round(gen, 3)
        sat["load_generator_cpu_share"] = round(gen / wall, 3)
        return {"saturated": sat, "paced": paced, "raw": raw}

    async def go() -> dict[str, Any]:
        # SIGUSR1: every task's stack on stderr (where an interrupted run waits; the
        # interrupt test asks before it gives up on a bench that did not exit)
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, _dump_tasks)
        one = await e2e(1, workers == 1) if workers > 1 else None
        unlimited = await e2e(1, True) if quota else None
        res = await e2e(workers, True, quota)
        res["one_worker"], res["no_quota"] = one, unlimited
        return res

    res = asyncio.run(go())
    sat, raw = res["saturated"], res["raw"]
    fps = sat["frames_per_s"]
    peers = _peer_baselines(frames, topics, size, publishers, paced_frames, paced_rate,
                            baselines)
    echo = peers["qstp_echo"].get("frames_per_s")
    go_fps = peers["nats_go"].get("frames_per_s")
    py = peers["nats_py"]
    py_paced_p99 = py.get("paced", {}).get("latency", {}).get("p99_ms")
    py_sat_p99 = py.get("saturated", {}).get("latency", {}).get("p99_ms")
    ratios = {
        "vs_raw_backend_writes": ratio(fps, raw),
        "vs_qstp_echo_ceiling": ratio(fps, echo),
        "vs_nats_go": ratio(fps, go_fps),
        "vs_nats_py": ratio(fps, py.get("saturated", {}).get("frames_per_s")),
        "paced_p99_vs_nats_py_paced_p99": ratio(res["paced"]["latency"]["p99_ms"],
                                                py_paced_p99),
        "saturated_p99_vs_nats_py_saturated_p99": ratio(sat["latency"]["p99_ms"], py_sat_p99),
    }
    nats_floor = 1.0 if backend == "embedded" else TARGET_VS_NATS_BROKER
    out = {
        "benchmark": "relayer", "backend": backend, "shards": 32, "frames": frames,
        "received": sat["received"], "publishers": publishers, "topics": topics,
        "batch": batch, "payload_bytes": size,
        "marks": "redis" if backend == "redis" or marks_in_redis else "node-local",
        "e2e_frames_per_s": fps,
        "pqcnet": {"saturated": sat, "paced": res["paced"]},
        "baseline": {
            "what": {"embedded": "rocksdict WriteBatch put (512/batch)",
                     "redis": "pipelined XADD (512/pipeline)",
                     "kafka": "aiokafka idempotent acks=all send_batch (512/batch)"}[backend],
            "raw_writes_per_s": round(raw)},
        "ratio": ratio(fps, raw),
        "baselines": peers,
        "ratios": ratios,
        "targets": {
            "frames_per_s": TARGET_FPS, "ratio": TARGET_RATIO,
            "vs_qstp_echo": TARGET_VS_ECHO, "vs_nats_go": nats_floor,
            "p99_vs_nats_max": TARGET_P99_VS_NATS,
            "met_fps": fps >= TARGET_FPS, "met_ratio": fps / raw >= TARGET_RATIO,
            "met_vs_qstp_echo": _met(ratios["vs_qstp_echo_ceiling"], TARGET_VS_ECHO),
            "met_vs_nats_go": _met(ratios["vs_nats_go"], nats_floor),
            "met_p99_vs_nats": _met(ratios["paced_p99_vs_nats_py_paced_p99"],
                                    TARGET_P99_VS_NATS, below=True),
        },
        "machine": {"before": before, "after": machine()},
        # what each relayer of the run left on the brokers, dropped unless kept
        "broker_state": [r["broker_state"]
                         for r in (res["one_worker"], res["no_quota"], res) if r],
    }
    if res["one_worker"] is not None:
        out["workers"] = _workers_part(workers, res["one_worker"]["saturated"], sat)
    if res["no_quota"] is not None:
        out["quotas"] = _quotas_part(quota, res["no_quota"], res)
    return out


def _quota_config(backend: str, workers: int, marks_in_redis: bool,
                  scope: str | None, rate: float) -> dict[str, Any] | None:
    """The relayer config keys of ``--quota-scope/--quota-rate`` (None: no quotas)."""
    if scope is None and not rate:
        return None
    if scope is None or rate <= 0:
        raise click.ClickException("--quota-scope and --quota-rate go together")
    if workers > 1:
        raise click.ClickException("--quota-scope: measure quotas with one worker")
    if scope == "cluster" and not (backend == "redis" or marks_in_redis):
        raise click.ClickException("--quota-scope cluster keeps the quotas in Redis: "
                                   "--backend redis, or kafka with --marks-in-redis")
    return {"quota_scope": scope, "quotas": {"default": {"frames_per_s": rate}}}


def _quotas_part(quota: dict[str, Any] | None, off: dict[str, Any],
                 on: dict[str, Any]) -> dict[str, Any]:
    """The relayer with quotas against the same relayer without, in the same run."""
    assert quota is not None
    part: dict[str, Any] = {"scope": quota["quota_scope"],
                            "frames_per_s_per_customer": quota["quotas"]["default"][
                                "frames_per_s"]}
    for name, r in (("without", off), ("with", on)):
        sat, paced = r["saturated"], r["paced"]
        part[name] = {"frames_per_s": sat["frames_per_s"],
                      "relayer_cpu_us_per_frame": sat["relayer_cpu_us_per_frame"],
                      "paced_p50_ms": paced["latency"]["p50_ms"],
                      "paced_p99_ms": paced["latency"]["p99_ms"]}
    w, o = part["with"], part["without"]
    part["ratio_frames_per_s"] = ratio(w["frames_per_s"], o["frames_per_s"])
    part["ratio_cpu_per_frame"] = ratio(w["relayer_cpu_us_per_frame"],
                                        o["relayer_cpu_us_per_frame"])
    part["paced_p99_added_ms"] = round(w["paced_p99_ms"] - o["paced_p99_ms"], 3)
    return part


def _workers_part(workers: int, one: dict[str, Any], many: dict[str, Any]) -> dict[str, Any]:
    """N workers against one worker measured in the same run."""
    speedup = ratio(many["frames_per_s"], one["frames_per_s"])
    cpu = ratio(many["relayer_cpu_us_per_frame"], one["relayer_cpu_us_per_frame"])
    return {
        "workers": workers,
        "one_worker": {k: one[k] for k in ("frames_per_s", "relayer_cpu_seconds",
                                           "relayer_cpu_us_per_frame", "latency")},
        "n_workers": {k: many[k] for k in ("frames_per_s", "relayer_cpu_seconds",
                                           "relayer_cpu_us_per_frame",
                                           "per_worker_cpu_seconds", "latency")},
        "speedup_vs_one_worker": speedup,
        "cpu_per_frame_vs_one_worker": cpu,
        "targets": {"speedup": TARGET_WORKERS_SPEEDUP,
                    "cpu_per_frame_drift_max": TARGET_CPU_PER_FRAME_DRIFT,
                    "met_speedup": _met(speedup, TARGET_WORKERS_SPEEDUP),
                    "met_cpu_per_frame": (None if cpu is None
                                          else abs(cpu - 1) <= TARGET_CPU_PER_FRAME_DRIFT)},
    }


def _met(value: float | None, target: float, *, below: bool = False) -> bool | None:
    if value is None:
        return None
    return value <= target if below else value >= target


def _peer_baselines(frames: int, topics: int, size: int, publishers: int,
                    paced_frames: int, paced_rate: float, enabled: bool) -> dict[str, Any]:
    """The tunnel's ceiling and the peer (NATS JetStream), same sizes, same run."""
    if not enabled:
        off = {"skipped": "--no-baselines"}
        return {"qstp_echo": off, "nats_py": off, "nats_go": off}
    out: dict[str, Any] = {"qstp_echo": echo_rate(frames, size, publishers)}
    server = NatsServer.find()
    if server is None:
        off = {"skipped": "NATS not running (scripts/services install nats && "
                          "scripts/services start nats)"}
        out.update(nats_py=off, nats_go=off)
        return out
    out["nats_py"] = asyncio.run(nats_py(server, frames, topics, size, publishers,
                                         paced_frames, paced_rate))
    out["nats_go"] = nats_go(server, frames, topics, size, publishers)
    return out


@click.command()
@click.option("--backend", type=click.Choice(["embedded", "redis", "kafka"]),
              default="embedded", show_default=True)
@click.option("--frames", default=60_000, show_default=True, type=click.IntRange(100))
@click.option("--publishers", default=4, show_default=True, type=click.IntRange(1, 64))
@click.option("--topics", default=64, show_default=True, type=click.IntRange(1))
@click.option("--batch", default=256, show_default=True, type=click.IntRange(1, 4096))
@click.option("--size", default=64, show_default=True, type=click.IntRange(8),
              help="Payload bytes per frame (the first 8 carry the send time).")
@click.option("--paced-frames", default=1000, show_default=True, type=click.IntRange(10),
              help="Frames of the latency run (one-frame publishes at --paced-rate).")
@click.option("--paced-rate", default=200.0, show_default=True,
              type=click.FloatRange(1, 1e6), help="Offered frames/s of the latency run.")
@click.option("--baselines/--no-baselines", default=True, show_default=True,
              help="Measure the QSTP echo ceiling and NATS JetStream (if running) too.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 16),
              help="Relayer processes (relayer run --workers N; redis/kafka); with N > 1 "
                   "one worker is measured first in the same run.")
@click.option("--marks-in-redis", is_flag=True,
              help="kafka: dedup marks and metered volume in Redis (redis_url), as a Kafka "
                   "relayer cluster keeps them, fenced by the group generation; default: "
                   "the relayer's node-local RocksDB.")
@click.option("--quota-scope", type=click.Choice(["host", "cluster"]),
              help="Give every customer a quota of --quota-rate frames/s, checked by this "
                   "host (host) or drawn from the cluster's Redis (cluster); the run "
                   "measures the relayer without quotas first.")
@click.option("--quota-rate", default=0.0, type=click.FloatRange(0),
              help="Frames/s per customer with --quota-scope (above what the run reaches).")
@click.option("--keep-broker-state", is_flag=True,
              help="Keep what the bench relayer wrote to Redis / Kafka (its prefix, its "
                   "topic) to look at; default: dropped once measured.")
def cli(backend: str, frames: int, publishers: int, topics: int, batch: int, size: int,
        paced_frames: int, paced_rate: float, baselines: bool, workers: int,
        marks_in_redis: bool, keep_broker_state: bool, quota_scope: str | None,
        quota_rate: float) -> None:
    """End-to-end relayer frames/s and publish→deliver latency (32 shards) vs the raw
    backend, the QSTP small-frame echo ceiling and NATS JetStream (nats-py and Go)."""
    click.echo(json.dumps(run(backend, frames, publishers, topics, batch, size,
                              paced_frames, paced_rate, baselines, workers,
                              marks_in_redis, keep_broker_state, quota_scope,
                              quota_rate), indent=2))
