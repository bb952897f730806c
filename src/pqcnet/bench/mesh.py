"""``pqcnet bench mesh``: control messages end to end through real go-waku nodes.

Two runs over the same pair of nodes (publish through node A's REST API, poll node
B's), same message count, same payload size:

* ``raw``    — the bytes published as-is (no pqcnet work): Waku + REST cost alone;
* ``pqcnet`` — each message signed (ML-DSA-65) and sealed (X25519+ML-KEM-768) by the
  sender through :class:`~pqcnet.mesh.publisher.Publisher` (on ``--sign-threads``
  threads of a :class:`~pqcnet.mesh.offload.CryptoPool`, 0: on the event loop), opened
  and verified (signature, replay window, skew) by the receiver.

Both modes publish and poll through the same :class:`~pqcnet.mesh.waku.WakuTransport`
and HTTP client (:mod:`pqcnet.mesh.http1`, keep-alive), so the ratio is pqcnet's own
cost over what a lean REST publisher pays.

Each mode runs twice: *saturated* (``--inflight`` publishes in flight, as fast as
they go: messages/s) and *paced* (``--paced-rate`` messages/s offered, below
saturation: publish-to-accept latency). Latency from the saturated run is mostly
queueing — with N publishes in flight, Little's law makes p50 ≈ N / throughput, so it
only restates the throughput; the paced run measures what one message costs.
Targets (issue 15): throughput >= 0.8x raw, paced p50 <= raw p50 + 3 ms. The JSON
also has this process's CPU per message (signing, sealing, HTTP, polling) per run.
Without Waku URLs (``--waku`` or ``PQCNET_WAKU_REST_URLS``) it falls back to
the in-process transport and says so in the JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import struct
import time
import uuid
from typing import Any

import click
from tqdm import tqdm

from pqcnet.bench._env import services_env
from pqcnet.bench._stats import machine
from pqcnet.mesh.envelope import EnvelopeSigner, EnvelopeVerifier, Keyring, MessageType, NodeKeys
from pqcnet.mesh.offload import CryptoPool
from pqcnet.mesh.publisher import Publisher
from pqcnet.mesh.transport import InProcessHub, InProcessTransport, Transport
from pqcnet.mesh.waku import WakuTransport

_SEQ = struct.Struct(">Qd")


def _urls_from_env() -> list[str]:
    return [u for u in services_env("PQCNET_WAKU_REST_URLS").split(",") if u]


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


TARGET_THROUGHPUT_RATIO = 0.8
TARGET_P50_OVER_RAW_MS = 3.0


async def _one_run(mode: str, pub: Transport, sub_t: Transport, count: int, size: int,
                   inflight: int, progress: tqdm, rate: float | None = None,
                   sign_threads: int = 0) -> dict[str, Any]:
    sender = NodeKeys.generate("bench-sender")
    receiver = NodeKeys.generate("bench-receiver")
    ring = Keyring()
    ring.add(sender.node_id, sender.signing_key.public_key, 1)
    verifier = EnvelopeVerifier(ring, [receiver.recipient_key])
    pool = CryptoPool(sign_threads) if sign_threads and mode != "raw" else None
    publisher = Publisher(pub, EnvelopeSigner(sender), namespace=f"bench{uuid.uuid4().hex[:8]}",
                          crypto=pool)
    topic = publisher.inbox(receiver.node_id)
    sub = await sub_t.subscribe([topic])
    await asyncio.sleep(1.0)  # let the relay mesh graft the topic's shard
    sent_at: dict[int, float] = {}
    latencies: list[float] = []
    done = asyncio.Event()
    dropped = 0

    async def receive() -> None:
        nonlocal dropped
        while len(latencies) < count:
            m = await sub.get()
            if mode == "raw":
                body = m.payload
            else:
                msg = verifier.accept(m.payload, int(time.time() * 1000))
                if msg is None:
                    dropped += 1
                    continue
                body = msg.body
            seq, _ = _SEQ.unpack_from(body)
            if seq in sent_at:
                latencies.append(time.perf_counter() - sent_at.pop(seq))
                progress.update()
        done.set()

    rx = asyncio.create_task(receive())
    sem = asyncio.Semaphore(inflight)
    pad = b"\x00" * max(0, size - _SEQ.size)

    async def send(i: int) -> None:
        if rate is not None:
            await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
        async with sem:
            body = _SEQ.pack(i, time.time()) + pad
            sent_at[i] = time.perf_counter()
            if mode == "raw":
                await pub.publish(topic, body)
            else:
                await publisher.send_sealed(receiver.node_id, receiver.recipient_key.public,
                                            MessageType.RELAY_REPORT, body)

    t0 = time.perf_counter()
    cpu0 = time.process_time()
    await asyncio.gather(*(send(i) for i in range(count)))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), timeout=max(30.0, count * 0.05))
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    rx.cancel()
    sub.close()
    if pool is not None:
        pool.close()
    delivered = len(latencies)
    return {
        "delivered": delivered, "lost": count - delivered, "dropped": dropped,
        # lost here (our subscription queue overflowed) rather than in go-waku
        "overflowed_locally": sub.overflowed,
        "msgs_per_s": round(delivered / elapsed, 1),
        "p50_ms": round(_pct(latencies, 0.50) * 1000, 2),
        "p99_ms": round(_pct(latencies, 0.99) * 1000, 2),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 2) if latencies else None,
        "cpu_ms_per_msg": round(cpu / count * 1000, 3),
        **({"offered_per_s": rate} if rate is not None else {"inflight": inflight}),
    }


async def run_async(urls: list[str], count: int, size: int, inflight: int,
                    paced_count: int = 100, paced_rate: float = 20.0,
                    sign_threads: int = 2) -> dict[str, Any]:
    """Both modes, saturated and paced; returns the JSON-ready result."""
    before = machine()
    def transports() -> tuple[Transport, Transport]:
        if len(urls) >= 2:
            return (WakuTransport.connect(urls[0], poll_interval_s=0.01),
                    WakuTransport.connect(urls[1], poll_interval_s=0.01))
        hub = InProcessHub()
        return InProcessTransport(hub), InProcessTransport(hub)

    results: dict[str, Any] = {}
    with tqdm(total=2 * (count + paced_count), desc="mesh bench", unit="msg",
              disable=None) as progress:
        for mode in ("raw", "pqcnet"):
            for label, n, rate in (("", count, None), ("_paced", paced_count, paced_rate)):
                pub, sub = transports()
                try:
                    results[mode + label] = await _one_run(mode, pub, sub, n, size,
                                                           inflight if rate is None else n,
                                                           progress, rate, sign_threads)
                finally:
                    await pub.close()
                    await sub.close()
    raw, pq = results["raw"], results["pqcnet"]
    raw_p, pq_p = results["raw_paced"], results["pqcnet_paced"]
    throughput = round(pq["msgs_per_s"] / raw["msgs_per_s"], 3) if raw["msgs_per_s"] else None
    return {
        "benchmark": "mesh",
        "transport": "go-waku REST" if len(urls) >= 2 else "in-process (no Waku URLs)",
        "nodes": urls[:2],
        "messages": count, "payload_bytes": size, "inflight": inflight,
        "sign_threads": sign_threads,
        "http_client": "pqcnet.mesh.http1 (keep-alive, llhttp) for both modes",
        "baseline_raw_rest": raw,
        "pqcnet_signed_sealed": pq,
        "baseline_raw_rest_paced": raw_p,
        "pqcnet_signed_sealed_paced": pq_p,
        "throughput_ratio_pqcnet_over_raw": throughput,
        "p50_latency_ratio": round(pq["p50_ms"] / raw["p50_ms"], 3) if raw["p50_ms"] else None,
        "paced_p50_over_raw_ms": round(pq_p["p50_ms"] - raw_p["p50_ms"], 2),
        "targets": {
            "throughput_ratio_min": TARGET_THROUGHPUT_RATIO,
            "paced_p50_over_raw_ms_max": TARGET_P50_OVER_RAW_MS,
            "met_throughput": None if throughput is None
            else throughput >= TARGET_THROUGHPUT_RATIO,
            "met_paced_p50": pq_p["p50_ms"] - raw_p["p50_ms"] <= TARGET_P50_OVER_RAW_MS,
        },
        "machine": {"before": before, "after": machine()},
    }


@click.command()
@click.option("--waku", "waku_urls", default="", help="Comma-separated REST URLs (>= 2 nodes); "
              "default: PQCNET_WAKU_REST_URLS or .services/env.")
@click.option("--count", default=300, show_default=True, help="Messages per run.")
@click.option("--size", default=512, show_default=True, help="Application payload bytes.")
@click.option("--inflight", default=8, show_default=True, help="Concurrent publishes.")
@click.option("--paced-count", default=100, show_default=True, type=click.IntRange(1),
              help="Messages per paced (latency) run.")
@click.option("--paced-rate", default=20.0, show_default=True, type=click.FloatRange(0.1),
              help="Offered messages/s of the paced runs.")
@click.option("--sign-threads", default=2, show_default=True, type=click.IntRange(0, 16),
              help="Threads that sign and seal (0: on the event loop).")
def cli(waku_urls: str, count: int, size: int, inflight: int, paced_count: int,
        paced_rate: float, sign_threads: int) -> None:
    """Control messages/s and latency through go-waku: pqcnet vs raw REST publish."""
    urls = [u for u in waku_urls.split(",") if u] or _urls_from_env()
    click.echo(json.dumps(asyncio.run(run_async(urls, count, size, inflight, paced_count,
                                                paced_rate, sign_threads)), indent=2))
