"""``pqcnet bench memory``: resident memory of a real relayer and a real sentry under load.

Issue 15's memory targets, measured on real processes (``/proc/<pid>/status``: ``VmRSS``
now, ``VmHWM`` the peak):

* **relayer** — ``pqcnet relayer run`` (embedded backend, 32 shards) after frames on
  ``--topics`` distinct topics (1M: every topic seen once), then ``--rounds`` more
  frames on each of ``--active`` of them (100k active); subscribers receive every
  frame, so egress runs too. Target: under 1 GiB.
* **sentry** — ``pqcnet sentry run`` (one worker, ``bounds.max_tunnels`` raised) with
  ``--tunnels`` QSTP tunnels open at once (10k), each from its own sidecar session:
  full handshake, a session assertion minted for it and one proxied RPC (so the
  assertion cache, the per-client buckets and the tunnel's stream state are all
  populated), opened ``--concurrency`` at a time on loopback. Target: under 1 GiB.

The same-run baseline is the process's own RSS when idle (listening, before any load);
the result gives the growth per topic / per tunnel as well, which is what predicts a
bigger load. Both processes run with ``RLIMIT_NOFILE`` raised to the hard limit (the
sentry needs one descriptor per tunnel, and so does this load generator); a hard limit
too low for ``--tunnels`` is refused up front.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import click
import yaml
from tqdm import tqdm

from pqcnet._util.orphans import ending_with_us
from pqcnet.bench._stats import machine

#: issue 15: a relayer (1M topics seen, 100k active) and a sentry (10k tunnels) < 1 GiB
TARGET_BYTES = 1 << 30
#: descriptors this process and the sentry need beyond one per tunnel
FD_MARGIN = 512


def _status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of ``pid`` in bytes (Linux /proc)."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _mib(n: float) -> float:
    return round(n / (1 << 20), 1)


def raise_nofile(need: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE (children inherit it) to at least ``need``;
    returns the new soft limit, or raises when the hard limit is below ``need``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        raise click.ClickException(
            f"{need} file descriptors needed, the hard limit is {hard} (ulimit -Hn)")
    if soft == resource.RLIM_INFINITY or soft >= need:
        return int(soft)
    new = hard if hard != resource.RLIM_INFINITY else need
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return int(new)


def _phase(pid: int, idle: int, what: str, n: int) -> dict[str, Any]:
    st = _status(pid)
    grown = st["VmRSS"] - idle
    return {"load": what, "rss_mib": _mib(st["VmRSS"]), "peak_rss_mib": _mib(st["VmHWM"]),
            "growth_mib": _mib(grown), f"bytes_per_{what}": round(grown / n) if n else None}


# ---------------------------------------------------------------------------- relayer


async def _relayer(topics: int, active: int, rounds: int, publishers: int, batch: int,
                   size: int, epoch_seconds: float = 60.0) -> dict[str, Any]:
    from pqcnet.bench._nats import stamp
    from pqcnet.bench.relayer import CUSTOMERS, relayer_process
    from pqcnet.bench.relayer import _Clients as Clients
    from pqcnet.identity import dev_identities
    from pqcnet.relayer.client import PublisherClient
    from pqcnet.relayer.frame import Frame

    with tempfile.TemporaryDirectory(prefix="pqcnet-bench-memory-") as d:
        tmp = Path(d)
        _, ids = dev_identities("pqcnet.bench", "spiffe://pqcnet.bench/b/relayer/r",
                                "spiffe://pqcnet.bench/b/publisher/p",
                                "spiffe://pqcnet.bench/b/subscriber/s")
        ids[0].save(tmp / "ident", None)
        cfg = {"node_id": "bench-relayer", "listen_port": 0,
               "identity_dir": str(tmp / "ident"), "data_dir": str(tmp / "data"),
               "shards": 32, "backend": "embedded", "epoch_seconds": epoch_seconds,
               "authz": {"customers": {"*": [{"from": ["spiffe://pqcnet.bench/b/*/*"],
                                              "methods": ["publish", "subscribe"]}]}}}
        path = tmp / "relayer.yaml"
        path.write_text(yaml.safe_dump({"relayer": cfg}))
        proc, ready = await relayer_process(path)
        port = int(ready["port"])
        try:
            clients = await Clients.connect(port, ids, publishers)
            try:
                await asyncio.sleep(1.0)
                idle = _status(proc.pid)["VmRSS"]
                out: dict[str, Any] = {"idle_rss_mib": _mib(idle),
                                       "epoch_seconds": epoch_seconds}
                bar = tqdm(total=topics + active * rounds, unit="frame", desc="relayer memory",
                           disable=None)

                async def send(frames: list[tuple[int, int]]) -> float:
                    """Publish (topic, seq) pairs, split over the publishers; returns s."""
                    clients.expect(len(frames))
                    t0 = time.perf_counter()

                    async def pub(k: int, client: PublisherClient) -> None:
                        mine = frames[k::publishers]
                        inflight: set[asyncio.Task[Any]] = set()
                        for start in range(0, len(mine), batch):
                            fr = [Frame(CUSTOMERS[t % 4], f"m{t}", seq, stamp(size))
                                  for t, seq in mine[start:start + batch]]
                            task = asyncio.create_task(client.publish(fr))
                            inflight.add(task)
                            task.add_done_callback(inflight.discard)
                            bar.update(len(fr))
                            if len(inflight) >= 8:
                                await asyncio.wait(inflight,
                                                   return_when=asyncio.FIRST_COMPLETED)
                        for res in await asyncio.gather(*inflight):
                            if not all(r.accepted for r in res):
                                raise click.ClickException("relayer refused a frame")

                    await asyncio.gather(*(pub(k, c) for k, c in enumerate(clients.pubs)))
                    await asyncio.wait_for(clients.done.wait(), 600)
                    return time.perf_counter() - t0

                seen_s = await send([(t, 1) for t in range(topics)])
                out["seen"] = {**_phase(proc.pid, idle, "topic", topics),
                               "topics": topics, "frames_per_s": round(topics / seen_s)}
                step = max(1, topics // active)
                hot = [t * step for t in range(active)]
                active_s = 0.0
                for r in range(rounds):
                    active_s += await send([(t, r + 2) for t in hot])
                bar.close()
                out["active"] = {**_phase(proc.pid, idle, "topic", topics),
                                 "active_topics": active, "rounds": rounds,
                                 "frames_per_s": round(active * rounds / active_s)
                                 if active_s else None}
                out["received"] = clients.got
            finally:
                await clients.close()
            final = _status(proc.pid)
            out["rss_mib"] = _mib(final["VmRSS"])
            out["peak_rss_mib"] = _mib(final["VmHWM"])
            out["under_target"] = final["VmHWM"] < TARGET_BYTES
        finally:
            await _stop(proc)
    return out


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 30)
        if proc.returncode is None:
            proc.kill()


# ---------------------------------------------------------------------------- sentry


async def _sentry(tunnels: int, concurrency: int) -> dict[str, Any]:
    from pqcnet.bench.sentry import (
        backend_main,
        free_port,
        write_identities,
        write_sentry_config,
    )
    from pqcnet.crypto.pqc import SigningKey
    from pqcnet.identity import NodeIdentity
    from pqcnet.qstp import aio
    from pqcnet.sentry.sidecar import Sidecar
    from pqcnet.sentry.wire import RequestHead

    ctx = multiprocessing.get_context("spawn")
    ports = {"backend": free_port(), "sentry": free_port()}
    backend = ctx.Process(target=backend_main, args=(ports["backend"],), daemon=True)
    backend.start()
    opened: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="pqcnet-bench-memory-") as d:
        tmp = Path(d)
        write_identities(tmp)
        name = write_sentry_config(tmp, ports["backend"], ports["sentry"], 1,
                                   bounds={"max_tunnels": tunnels + 16})
        log = (tmp / "sentry.log").open("ab")
        proc = await asyncio.create_subprocess_exec(
            *ending_with_us([str(Path(sys.executable).parent / "pqcnet"), "sentry", "run",
                             "--config", name, "--no-passphrase"]), cwd=tmp, stderr=log)
        log.close()
        out: dict[str, Any] = {}
        try:
            await _listening(ports["sentry"])
            await asyncio.sleep(1.0)
            idle = _status(proc.pid)["VmRSS"]
            out["idle_rss_mib"] = _mib(idle)
            identity = NodeIdentity.load(tmp / "acme-id", None)
            issuer = SigningKey.from_pem((tmp / "acme-issuer.pem").read_bytes())
            body = b'{"jsonrpc":"2.0","id":1,"method":"eth_blockNumber","params":{}}'
            head = RequestHead("http", "POST", "/rpc", (("content-type", "application/json"),
                                                        ("x-user-id", "u1")))
            gate = asyncio.Semaphore(concurrency)
            bar = tqdm(total=tunnels, unit="tunnel", desc="sentry memory", disable=None)
            curve: list[dict[str, Any]] = []
            failures: Counter[str] = Counter()  # by error type: a handful of keys

            async def one(i: int) -> None:
                async with gate:
                    async def dial() -> Any:
                        return await aio.connect("127.0.0.1", ports["sentry"], identity)

                    sc = Sidecar(dial, issuer, subject=f"user-{i}", tenant="acme")
                    try:
                        resp, stream, _first = await sc.call(head, body)
                        while await stream.recv():
                            pass
                        if resp.status != 200:
                            failures[f"status {resp.status}"] += 1
                    except Exception as exc:
                        failures[type(exc).__name__] += 1
                        await sc.aclose()
                        return
                    opened.append(sc)
                    bar.update(1)

            t0 = time.perf_counter()
            step = max(1, tunnels // 10)
            for start in range(0, tunnels, step):
                await asyncio.gather(*(one(i) for i in range(start, min(start + step,
                                                                        tunnels))))
                curve.append({"tunnels": len(opened),
                              "rss_mib": _mib(_status(proc.pid)["VmRSS"])})
            elapsed = time.perf_counter() - t0
            bar.close()
            await asyncio.sleep(2.0)  # let the sentry settle (freed handshake buffers)
            n = len(opened)
            out["tunnels"] = {**_phase(proc.pid, idle, "tunnel", n), "open": n,
                              "failed": sum(failures.values()),
                              "failures": dict(failures), "asked": tunnels,
                              "opened_per_s": round(n / elapsed, 1)}
            out["curve"] = curve
            final = _status(proc.pid)
            out["rss_mib"] = _mib(final["VmRSS"])
            out["peak_rss_mib"] = _mib(final["VmHWM"])
            out["under_target"] = final["VmHWM"] < TARGET_BYTES and n == tunnels
        finally:
            for sc in opened:
                with contextlib.suppress(Exception):
                    await sc.aclose()
            await _stop(proc)
            backend.terminate()
            backend.join(5)
    return out


async def _listening(port: int) -> None:
    timeout = 60.0
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(OSError):
            _r, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        await asyncio.sleep(0.1)
    raise click.ClickException(f"nothing listening on 127.0.0.1:{port} after {timeout:g}s")


# ---------------------------------------------------------------------------- run


def run(which: str = "both", topics: int = 1_000_000, active: int = 100_000, rounds: int = 2,
        tunnels: int = 10_000, concurrency: int = 64, publishers: int = 4, batch: int = 512,
        size: int = 16, epoch_seconds: float = 60.0) -> dict[str, Any]:
    """Run the chosen parts; returns the JSON-able result."""
    if active > topics:
        raise click.ClickException("--active cannot exceed --topics")
    nofile = raise_nofile(tunnels + FD_MARGIN if which != "relayer" else FD_MARGIN)
    out: dict[str, Any] = {"benchmark": "memory", "target_mib": _mib(TARGET_BYTES),
                           "rlimit_nofile": nofile, "machine": {"before": machine()}}
    if which in ("relayer", "both"):
        out["relayer"] = asyncio.run(_relayer(topics, active, rounds, publishers, batch,
                                              size, epoch_seconds))
    if which in ("sentry", "both"):
        out["sentry"] = asyncio.run(_sentry(tunnels, concurrency))
    out["machine"]["after"] = machine()
    out["targets"] = {f"{k}_under_1gib": out[k]["under_target"]
                      for k in ("relayer", "sentry") if k in out}
    return out


@click.command("memory")
@click.option("--which", type=click.Choice(["relayer", "sentry", "both"]), default="both",
              show_default=True)
@click.option("--topics", default=1_000_000, show_default=True, type=click.IntRange(1),
              help="Distinct topics the relayer sees (one frame each).")
@click.option("--active", default=100_000, show_default=True, type=click.IntRange(1),
              help="Of those, topics that keep getting frames.")
@click.option("--rounds", default=2, show_default=True, type=click.IntRange(0),
              help="Frames per active topic after the first.")
@click.option("--tunnels", default=10_000, show_default=True, type=click.IntRange(1),
              help="QSTP tunnels held open to the sentry at once.")
@click.option("--concurrency", default=64, show_default=True, type=click.IntRange(1, 4096),
              help="Tunnels being opened at the same time.")
@click.option("--epoch-seconds", default=60.0, show_default=True,
              type=click.FloatRange(1, min_open=False),
              help="The relayer's metering epoch: shorter ones make it prove (and hold "
                   "proven) epochs during the run, as a relayer running for hours does.")
def cli(which: str, topics: int, active: int, rounds: int, tunnels: int,
        concurrency: int, epoch_seconds: float) -> None:
    """RSS of a real relayer (1M topics seen, 100k active) and a real sentry (10k
    tunnels) against 1 GiB, with the idle process as baseline; prints JSON."""
    click.echo(json.dumps(run(which, topics, active, rounds, tunnels, concurrency,
                              epoch_seconds=epoch_seconds), indent=2))
