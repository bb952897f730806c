"""An embedded relayer under tunnel churn for many minutes ("let time pass").

Every cycle opens a fresh publisher tunnel and a fresh subscriber tunnel, publishes a
few frames, waits until the long-lived subscribers (one per customer, kept for the
whole run) have every frame and the fresh subscriber its customer's (it reads and acks
them, as an application does), and closes both fresh tunnels: two QSTP handshakes and
two closes per cycle, a hub subscription added and removed. Per window: cycles, frames,
the relayer's RSS, its CPU per cycle and what its ``/metrics`` says about tunnels and
in-flight state. A closed tunnel kept alive (the cycle fixed in 55d53f9), a subscription
left in the hub or any state growing with the number of connections shows as a trend
across windows. At the end the long-lived subscribers' history is checked: every frame
of every topic exactly once, in order. Usage::

    python churn.py WINDOW_S WINDOWS > out.json
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from pqcnet.bench._cpu import cpu_seconds
from pqcnet.bench.relayer import relayer_process
from pqcnet.identity import dev_identities
from pqcnet.relayer.client import PublisherClient, SubscriberClient
from pqcnet.relayer.frame import Frame

CUSTOMERS = [f"cust{i}" for i in range(4)]
TOPICS = [(CUSTOMERS[t % 4], f"t{t}") for t in range(16)]
PER_CYCLE = 32  # frames per cycle, two per topic
WATCHED = ("pqcnet_relayer_tunnels_active", "pqcnet_relayer_subscribers",
           "pqcnet_relayer_handshake_failures_total",
           "pqcnet_relayer_gap_fence_inflight_frames", "process_open_fds")


#: frames of one customer per cycle
customer_frames = PER_CYCLE // len(CUSTOMERS)
#: seconds a fresh subscriber may take to get its customer's frames of the cycle
FRESH_WAIT = 5.0


async def drain(sub: SubscriberClient, want: int, done: asyncio.Event) -> None:
    """Read (and so acknowledge) ``sub``'s batches; ``done`` once ``want`` frames came."""
    n = 0
    async for batch in sub.batches():
        n += len(batch)
        if n >= want:
            done.set()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return -1.0


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    out: dict[str, float] = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            if name.split("{")[0] in WATCHED:
                out[name] = float(value)
    return out


async def main(window: float, windows: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pqcnet-churn-") as d:
        tmp = Path(d)
        _, ids = dev_identities("pqcnet.bench", "spiffe://pqcnet.bench/b/relayer/r",
                                "spiffe://pqcnet.bench/b/publisher/p",
                                "spiffe://pqcnet.bench/b/subscriber/s")
        ids[0].save(tmp / "ident", None)
        cfg = {"node_id": "churn", "listen_port": 0, "identity_dir": str(tmp / "ident"),
               "data_dir": str(tmp / "data"), "shards": 32, "backend": "embedded",
               "metrics_port": 0,
               "authz": {"customers": {"*": [{"from": ["spiffe://pqcnet.bench/b/*/*"],
                                              "methods": ["publish", "subscribe"]}]}}}
        path = tmp / "relayer.yaml"
        path.write_text(yaml.safe_dump({"relayer": cfg}))
        proc, ready = await relayer_process(path)
        pid, port, mport = ready["pids"][0], ready["port"], ready["metrics_port"]
        seen: dict[tuple[str, str], list[int]] = {t: [] for t in TOPICS}
        got = sent = 0
        caught_up = asyncio.Event()

        async def keep(s: SubscriberClient) -> None:
            nonlocal got
            async for batch in s.batches():
                for f in batch:
                    seen[f.topic].append(f.seq)
                got += len(batch)
                if got >= sent:
                    caught_up.set()

        out: dict[str, Any] = {"window_s": window, "per_cycle_frames": PER_CYCLE,
                               "load_before": os.getloadavg(), "windows": []}
        longs = []
        for c in CUSTOMERS:
            s = await SubscriberClient.connect("127.0.0.1", port, ids[2])
            await s.subscribe(c)
            longs.append(s)
        drains = [asyncio.create_task(keep(s)) for s in longs]
        await asyncio.sleep(0.5)  # the subscriptions are in place
        seq = dict.fromkeys(TOPICS, 0)
        fresh_with_frames = 0
        try:
            for w in range(windows):
                cpu0, t0 = cpu_seconds(pid), time.monotonic()
                cycles, lat = 0, []
                while time.monotonic() - t0 < window:
                    c0 = time.perf_counter()
                    sub = await SubscriberClient.connect("127.0.0.1", port, ids[2])
                    customer = CUSTOMERS[cycles % 4]
                    await sub.subscribe(customer)
                    fresh_got = asyncio.Event()
                    fresh = asyncio.create_task(drain(sub, customer_frames, fresh_got))
                    pub = await PublisherClient.connect("127.0.0.1", port, ids[1])
                    frames = []
                    for t in TOPICS * (PER_CYCLE // len(TOPICS)):
                        seq[t] += 1
                        frames.append(Frame(*t, seq[t], b"x" * 64))
                    caught_up.clear()
                    sent += len(frames)
                    res = await pub.publish(frames)
                    assert all(r.accepted for r in res), res
                    await pub.close()
                    async with asyncio.timeout(30):
                        await caught_up.wait()
                    # the fresh subscriber reads (and acks) its customer's frames of the
                    # cycle, unless its subscription landed after they went out
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(FRESH_WAIT):
                            await fresh_got.wait()
                    fresh_with_frames += fresh_got.is_set()
                    fresh.cancel()
                    await asyncio.gather(fresh, return_exceptions=True)
                    await sub.close()
                    cycles += 1
                    lat.append(time.perf_counter() - c0)
                cpu = cpu_seconds(pid) - cpu0
                row = {"window": w, "cycles": cycles, "tunnels_opened": 2 * cycles,
                       "frames": cycles * PER_CYCLE,
                       "cycle_ms_p50": round(statistics.median(lat) * 1e3, 2),
                       "relayer_cpu_ms_per_cycle": round(cpu / cycles * 1e3, 3),
                       "relayer_rss_mib": rss_mib(pid), "metrics": scrape(mport),
                       "load": os.getloadavg()[0]}
                out["windows"].append(row)
                print(json.dumps(row), file=sys.stderr)
        finally:
            for t in drains:
                t.cancel()
            for s in longs:
                with contextlib.suppress(Exception):
                    await s.close()
            proc.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 30)
        bad = {f"{c}/{ch}": len(v) for (c, ch), v in seen.items()
               if v != list(range(1, seq[(c, ch)] + 1))}
        out["history"] = {"sent": sent, "received": got, "topics_not_exactly_once_in_order": bad,
                          "fresh_subscribers_that_got_frames": fresh_with_frames,
                          "duplicates_dropped": sum(s.duplicates_dropped for s in longs)}
        return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(float(sys.argv[1]), int(sys.argv[2]))), indent=1))
