"""NATS JetStream as the peer baseline of ``pqcnet bench relayer``.

What a user would pick instead for ordered, deduplicated pub/sub, set up to promise
what pqcnet promises: TLS on every connection, a file-backed stream, publisher
dedup by ``Nats-Msg-Id``, a consumer with explicit acks. Publisher → server →
subscriber on loopback, with the relayer run's frame size and topic count (one
subject per topic). Driven two ways, both measured in the same run:

* through the Python client ``nats-py`` (the same language as pqcnet's clients; it
  is client-bound here: one core at 100 %): async publishes with a bounded pending
  window, a pull consumer fetching in batches and acking each message;
* through NATS's own Go benchmark client, ``nats bench js`` (natscli, built by
  ``scripts/services install nats``): the server's real ceiling on this machine.

The server is ``scripts/services start nats`` (``PQCNET_NATS_URL``, ``PQCNET_NATS_CA``,
``PQCNET_NATS_CLI``); a missing server is reported in the JSON, not guessed.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import ssl
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pqcnet._util.orphans import ending_with_us
from pqcnet._util.tasks import cancel_and_wait
from pqcnet.bench._cpu import settle
from pqcnet.bench._env import services_env
from pqcnet.bench._stats import percentiles

#: Async publishes a nats-py publisher keeps unacknowledged (its pending window).
PUBLISH_WINDOW = 4096
#: Messages one pull request asks for.
FETCH_BATCH = 512
#: Acks the consumer lets be outstanding before the server stops delivering.
MAX_ACK_PENDING = 65_536
#: Dedup window of the bench stream (the server default is 2 minutes).
DUPLICATE_WINDOW_S = 120.0
#: Bound on one `nats bench` run.
GO_BENCH_TIMEOUT_S = 600
#: Latency samples kept per run (every frame up to this; then every k-th).
MAX_LATENCY_SAMPLES = 200_000


@dataclass(frozen=True)
class NatsServer:
    """Where the bench NATS server is and how to trust it."""

    url: str
    ca: str
    cli: str
    #: nats-server's process (from ``scripts/services``' pid file), whose CPU the paced
    #: run waits to go quiet as the relayer's does; None if unknown
    pid: int | None = None

    @classmethod
    def find(cls) -> NatsServer | None:
        url, ca = services_env("PQCNET_NATS_URL"), services_env("PQCNET_NATS_CA")
        if not url or not ca:
            return None
        return cls(url, ca, services_env("PQCNET_NATS_CLI"),
                   _live_pid(services_env("PQCNET_NATS_PID_FILE")))


def _live_pid(pid_file: str) -> int | None:
    """The pid in ``pid_file`` if that process is alive (else None: no settle step)."""
    try:
        pid = int(Path(pid_file).read_text().split()[0]) if pid_file else 0
    except (OSError, ValueError, IndexError):
        return None
    return pid if pid > 0 and Path(f"/proc/{pid}/stat").exists() else None


def stamp(payload_size: int) -> bytes:
    """A payload that carries its send time (ns, monotonic clock) in its first 8 bytes."""
    return time.perf_counter_ns().to_bytes(8, "big") + bytes(max(0, payload_size - 8))


def age_s(payload: bytes) -> float:
    """Seconds since :func:`stamp` made ``payload``."""
    return (time.perf_counter_ns() - int.from_bytes(payload[:8], "big")) / 1e9


class Latencies:
    """A bounded sample of publish→deliver latencies."""

    def __init__(self, expected: int) -> None:
        self.every = max(1, expected // MAX_LATENCY_SAMPLES)
        self.samples: list[float] = []
        self._n = 0

    def add(self, payload: bytes) -> None:
        self._n += 1
        if self._n % self.every == 0 and len(self.samples) < MAX_LATENCY_SAMPLES:
            self.samples.append(age_s(payload))


async def pace(total: int, rate: float, publishers: int,
                 send: Callable[[int, int], Awaitable[None]]) -> None:
    """Call ``send(publisher, i)`` for ``total`` frames at ``rate`` frames/s overall."""
    per = total // publishers
    interval = publishers / rate

    async def one(k: int) -> None:
        start = time.perf_counter()
        for i in range(per):
            delay = start + i * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await send(k, i)

    await asyncio.gather(*(one(k) for k in range(publishers)))


async def nats_py(server: NatsServer, frames: int, topics: int, size: int, publishers: int,
                  paced_frames: int, paced_rate: float) -> dict[str, Any]:
    """Saturated run (frames/s + latency under load), then a paced latency run."""
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig

    ctx = ssl.create_default_context(cafile=server.ca)
    conns = [await nats.connect(server.url, tls=ctx, name=f"pqcnet-bench-{i}")
             for i in range(publishers + 1)]
    sub_nc, pub_ncs = conns[0], conns[1:]

    async def one_run(total: int, rate: float | None) -> dict[str, Any]:
        name = f"PQCB{uuid.uuid4().hex[:8].upper()}"
        js = sub_nc.jetstream()
        await js.add_stream(StreamConfig(
            name=name, subjects=[f"{name}.>"], storage=StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW_S))
        psub = await js.pull_subscribe(f"{name}.>", durable="bench", stream=name,
                                       config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT,
                                                             max_ack_pending=MAX_ACK_PENDING))
        lat = Latencies(total)
        got = 0
        per = total // publishers
        want = per * publishers
        done = asyncio.Event()

        async def consume() -> None:
            nonlocal got
            while got < want:
                try:
                    msgs = await psub.fetch(FETCH_BATCH, timeout=1)
                except nats.errors.TimeoutError:
                    continue
                for m in msgs:
                    lat.add(m.data)
                    await m.ack()
                got += len(msgs)
            done.set()

        pubs = [nc.jetstream(publish_async_max_pending=PUBLISH_WINDOW) for nc in pub_ncs]

        async def send(k: int, i: int) -> None:
            await pubs[k].publish_async(f"{name}.t{(k + i * publishers) % topics}",
                                        stamp(size), headers={"Nats-Msg-Id": f"{k}-{i}"})

        async def flood(k: int) -> None:
            for i in range(per):
                await send(k, i)

        consumer = asyncio.create_task(consume())
        try:
            t0 = time.perf_counter()
            if rate is None:
                await asyncio.gather(*(flood(k) for k in range(publishers)))
            else:
                await pace(want, rate, publishers, send)
            for p in pubs:
                await p.publish_async_completed()
            await asyncio.wait_for(done.wait(), 300)
            elapsed = time.perf_counter() - t0
            await consumer
        finally:
            with contextlib.suppress(nats.errors.Error):
                await cancel_and_wait(consumer)
                await psub.unsubscribe()
            with contextlib.suppress(nats.errors.Error):
                await js.delete_stream(name)  # the file store is not left behind
        return {"frames": want, "frames_per_s": round(want / elapsed),
                "latency": percentiles(lat.samples)}

    try:
        saturated = await one_run(frames, None)
        # the same settle step as the relayer's before its paced run
        settled = await settle([server.pid]) if server.pid is not None else {}
        paced = {**await one_run(paced_frames, paced_rate), **settled}
    finally:
        for nc in conns:
            await nc.close()
    return {"what": "nats-py: async publish (window "
                    f"{PUBLISH_WINDOW}) with Nats-Msg-Id, pull consumer (batch {FETCH_BATCH}), "
                    "explicit ack per message, file storage, TLS",
            "saturated": saturated, "paced": {**paced, "offered_per_s": paced_rate}}


_RATE = re.compile(r"([\d,.]+)\s+msgs/sec")


def nats_go(server: NatsServer, frames: int, topics: int, size: int,
            publishers: int) -> dict[str, Any]:
    """``nats bench js`` (Go client): publishers and one consumer running at once.

    The stream is created first (file storage, dedup window); then a durable consumer
    with explicit acks (``js consume``) and ``publishers`` async publishers with
    ``Nats-Msg-Id`` dedup ids over ``topics`` subjects (``js pub async --dedup
    --multisubject``) run side by side; frames/s is counted from the publishers'
    start until the consumer has every message.
    """
    if not server.cli or not shutil.which(server.cli):
        return {"skipped": "nats CLI not found (scripts/services install nats)"}
    name = f"PQCG{uuid.uuid4().hex[:8].upper()}"
    base = [server.cli, "--server", server.url, "--tlsca", server.ca, "bench", "js"]
    common = ["--stream", name, "--size", f"{size}B", "--no-progress"]
    pub_args = ["--create", "--storage", "file", "--dedup", "--multisubject",
                "--multisubjectmax", str(topics)]
    per = frames // publishers
    try:
        # create the stream (and its first message) so the consumer can bind at once
        _go([*base, "pub", "async", name, *common, "--msgs", "1", *pub_args])
        consumer = subprocess.Popen(
            ending_with_us([*base, "consume", *common, "--clients", "1", "--msgs",
                            str(per * publishers + 1), "--acks", "explicit"]),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            t0 = time.perf_counter()
            pub_rate = _go([*base, "pub", "async", name, *common, "--clients",
                            str(publishers), "--msgs", str(per * publishers), *pub_args])
            text, _ = consumer.communicate(timeout=GO_BENCH_TIMEOUT_S)
        except BaseException as exc:  # failed, timed out or stopped: not left waiting
            consumer.kill()
            consumer.communicate()
            if isinstance(exc, subprocess.TimeoutExpired):
                raise RuntimeError("nats bench js consume did not finish") from None
            raise
        elapsed = time.perf_counter() - t0
        if consumer.returncode != 0:
            raise RuntimeError(f"nats bench js consume failed: {text.strip()[-400:]}")
    finally:
        subprocess.run(ending_with_us([server.cli, "--server", server.url, "--tlsca",
                                       server.ca, "stream", "rm", "-f", name]),
                       capture_output=True, timeout=60, check=False)
    return {"what": "nats bench (natscli, Go): js pub async --dedup --multisubject, "
                    "js consume --acks explicit, at the same time; file storage, TLS",
            "frames": per * publishers, "frames_per_s": round(per * publishers / elapsed),
            "publish_only_frames_per_s": pub_rate, "consume_reported_frames_per_s":
            _rate(text)}


def _rate(text: str) -> int | None:
    rates = [float(m.replace(",", "")) for m in _RATE.findall(text)]
    return round(rates[-1]) if rates else None


def _go(cmd: list[str]) -> int | None:
    proc = subprocess.run(ending_with_us(cmd), capture_output=True, text=True,
                          timeout=GO_BENCH_TIMEOUT_S, check=False)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[-12:])} failed: {text.strip()[-400:]}")
    return _rate(text)
