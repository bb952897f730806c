"""``pqcnet bench websocket``: WebSocket echoes through sidecar → QSTP → sentry.

An app's subscription (``eth_subscribe`` over ``ws://``) is one long-lived WebSocket;
what it pays is the handshake once and a round trip per message. Three paths to the
*same* backend — a ``websockets`` echo server in its own process, compression off on
both ends — measured in one run by one client:

* ``direct`` — app → backend (the floor);
* ``nginx``  — app → nginx proxying WebSockets (``proxy_http_version 1.1``, the
  ``Upgrade`` / ``Connection`` headers passed on) → backend; skipped with a note when
  no ``nginx`` binary is found;
* ``pqcnet`` — app → ``pqcnet sidecar`` (HTTP face) → QSTP → ``pqcnet sentry run`` →
  backend, the handshake admitted under the ACL key ``WS /ws`` with the identity
  sanitizer on the path (the bench sentry of :mod:`pqcnet.bench.sentry`).

Per path: ``connect`` — sequential opens and closes, p50/p99 of the time to an open
WebSocket (for pqcnet: assertion, ACL, limiter, the backend's upgrade on a connection
of its own); ``round trip`` — sequential 64-byte echoes on one connection, p50/p99;
``throughput`` — ``--connections`` WebSockets, each keeping ``--window`` messages in
flight for ``--seconds``: echoes received per second; for pqcnet also the CPU the
sidecar and sentry used per message (``/proc``). Ratios are pqcnet's to direct and to
nginx. Everything shares the machine: the 1-minute load average is part of the output.

``pipe_rate`` — the accuracy of a plan's ``pipe_rate`` (bytes/s over all a tenant's
pipes and WebSockets): the running sentry's config is rewritten with ``--pipe-share``
of the bytes/s the pqcnet path just moved as the tenant's limit (a hot reload), the
bucket's burst is spent in a warm-up, and the same throughput phase runs again. The
bytes are counted at the client from the WebSocket framing (each 64-byte echo is a
70-byte masked frame up and a 66-byte frame down), not read from the sentry; the
ratio achieved / limit is the accuracy (issue 15: within ±10 %).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from pqcnet._util.orphans import die_with_parent, ending_with_us
from pqcnet.bench._stats import machine
from pqcnet.bench.sentry import (
    _CpuWatch,
    _exe,
    _pct,
    _sidecar,
    _wait_port,
    free_port,
    nginx_exe,
    stop,
    write_identities,
    write_sentry_config,
)

#: the WebSocket path the bench sentry's ACL allows (``WS /ws``)
PATH = "/ws"
#: bytes per message (a small JSON-RPC notification)
MESSAGE = b"x" * 64
#: bytes one echo moves through a pipe: the client's masked frame (2-byte header, 4-byte
#: mask) up, the server's unmasked frame (2-byte header) down; no compression
WIRE_BYTES_PER_ECHO = (2 + 4 + len(MESSAGE)) + (2 + len(MESSAGE))
#: seconds the sentry gets to hot-reload a rewritten config (it looks every second)
RELOAD_WAIT_S = 3.0
#: seconds of echoes that spend the limited tenant's burst before the timed phase
BURST_WARMUP_S = 2.0


def backend_main(port: int) -> None:
    """The echo backend: every message straight back, no compression."""
    die_with_parent()
    from websockets.asyncio.server import ServerConnection, serve

    async def echo(ws: ServerConnection) -> None:
        async for msg in ws:
            await ws.send(msg)

    async def main() -> None:
        async with serve(echo, "127.0.0.1", port, compression=None, max_size=None,
                         ping_interval=None) as server:
            await server.serve_forever()

    asyncio.run(main())


def _connect(url: str) -> Any:
    from websockets.asyncio.client import connect

    return connect(url, compression=None, max_size=None, ping_interval=None,
                   open_timeout=30)


async def _connects(url: str, n: int) -> list[float]:
    took = []
    for _ in range(n):
        t0 = time.perf_counter()
        async with _connect(url):
            took.append(time.perf_counter() - t0)
    return took


async def _round_trips(url: str, n: int) -> list[float]:
    took = []
    async with _connect(url) as ws:
        for i in range(n + 20):  # 20 warm-up echoes
            t0 = time.perf_counter()
            await ws.send(MESSAGE)
            await ws.recv()
            if i >= 20:
                took.append(time.perf_counter() - t0)
    return took


async def _throughput(url: str, conns: int, window: int, seconds: float) -> int:
    async def one() -> int:
        got = 0
        async with _connect(url) as ws:
            for _ in range(window):
                await ws.send(MESSAGE)
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                await ws.recv()
                got += 1
                await ws.send(MESSAGE)
            for _ in range(window):  # every message sent comes back before the close
                await ws.recv()
        return got

    return sum(await asyncio.gather(*(one() for _ in range(conns))))


def _ms(xs: list[float]) -> dict[str, float]:
    return {"p50_ms": round(_pct(xs, 0.50), 3), "p99_ms": round(_pct(xs, 0.99), 3),
            "mean_ms": round(statistics.fmean(xs) * 1000, 3), "n": len(xs)}


def _measure(url: str, connects: int, messages: int, conns: int, window: int,
             seconds: float, watch: dict[str, int] | None) -> dict[str, Any]:
    cpu = _CpuWatch(watch)
    out: dict[str, Any] = {"connect": _ms(asyncio.run(_connects(url, connects)))}
    out["round_trip"] = _ms(asyncio.run(_round_trips(url, messages)))
    cpu.start()
    got = asyncio.run(_throughput(url, conns, window, seconds))
    out["throughput"] = {"messages": got, "messages_per_s": round(got / seconds, 1),
                         **cpu.per_rpc(got, busy=True, per="message", micro=True)}
    return out


def _nginx_ws(d: Path, port: int, backend: int) -> subprocess.Popen[bytes] | None:
    """nginx as a WebSocket reverse proxy (its documented configuration)."""
    exe = nginx_exe()
    if exe is None:
        return None
    home = d / "nginx-ws"
    (home / "logs").mkdir(parents=True)
    conf = home / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
error_log logs/error.log warn;
pid logs/nginx.pid;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {home}/tmp;
  proxy_temp_path {home}/tmp;
  map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://127.0.0.1:{backend};
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_read_timeout 600s;
    }}
  }}
}}
""")
    return subprocess.Popen(ending_with_us([exe, "-p", str(home), "-c", str(conf), "-g",
                                            "daemon off;"]), stderr=subprocess.DEVNULL)


def _pipe_rate(d: Path, ports: dict[str, int], url: str, moved: float, share: float,
               conns: int, window: int, seconds: float) -> dict[str, Any]:
    """The tenant limited to ``share`` of ``moved`` bytes/s (hot reload), its burst
    spent, the throughput phase again: achieved bytes/s against the limit."""
    limit = max(1.0, share * moved)
    write_sentry_config(d, ports["backend"], ports["sentry"], 1, acme_pipe_rate=limit)
    time.sleep(RELOAD_WAIT_S)
    asyncio.run(_throughput(url, conns, window, BURST_WARMUP_S))
    got = asyncio.run(_throughput(url, conns, window, seconds))
    achieved = got * WIRE_BYTES_PER_ECHO / seconds
    return {"share": share, "limit_bytes_per_s": round(limit),
            "unlimited_bytes_per_s": round(moved), "achieved_bytes_per_s": round(achieved),
            "messages": got, "accuracy": round(achieved / limit, 3),
            "within_10_percent": abs(achieved / limit - 1) <= 0.10}


def run(connects: int = 200, messages: int = 2000, connections: int = 8, window: int = 16,
        seconds: float = 5.0, pipe_share: float = 0.5) -> dict[str, Any]:
    """Measure the three paths (and the pipe-rate accuracy); the JSON-able result."""
    before = machine()
    ports = {k: free_port() for k in ("backend", "nginx", "sentry", "sidecar")}
    backend = multiprocessing.get_context("spawn").Process(
        target=backend_main, args=(ports["backend"],), daemon=True)
    backend.start()
    procs: list[subprocess.Popen[bytes]] = []
    results: dict[str, Any] = {}
    limited: dict[str, Any] = {"skipped": "--pipe-share 0"}
    with tempfile.TemporaryDirectory(prefix="pqcnet-bench-ws-") as tmp:
        d = Path(tmp)
        try:
            _wait_port(ports["backend"])
            paths = [("direct", ports["backend"])]
            nginx = _nginx_ws(d, ports["nginx"], ports["backend"])
            if nginx is not None:
                procs.append(nginx)
                _wait_port(ports["nginx"])
                paths.append(("nginx", ports["nginx"]))
            write_identities(d)
            name = write_sentry_config(d, ports["backend"], ports["sentry"], 1)
            procs.append(subprocess.Popen(
                ending_with_us([_exe(), "sentry", "run", "--config", name,
                                "--no-passphrase"]), cwd=d, stderr=subprocess.DEVNULL))
            _wait_port(ports["sentry"])
            procs.append(_sidecar(d, ports["sentry"], ports["sidecar"]))
            paths.append(("pqcnet", ports["sidecar"]))
            watch = {"sidecar": procs[-1].pid, "sentry": procs[-2].pid}
            for path, port in tqdm(paths, desc="websocket bench", unit="path"):
                results[path] = _measure(f"ws://127.0.0.1:{port}{PATH}", connects, messages,
                                         connections, window, seconds,
                                         watch if path == "pqcnet" else None)
            if pipe_share:
                moved = (results["pqcnet"]["throughput"]["messages_per_s"]
                         * WIRE_BYTES_PER_ECHO)
                limited = _pipe_rate(d, ports, f"ws://127.0.0.1:{ports['sidecar']}{PATH}",
                                     moved, pipe_share, connections, window, seconds)
        finally:
            stop(procs)
            backend.terminate()
            backend.join(5)
    direct, pq = results["direct"], results["pqcnet"]
    out: dict[str, Any] = {
        "benchmark": "websocket",
        "settings": {"connects": connects, "messages": messages, "connections": connections,
                     "window": window, "seconds": seconds, "message_bytes": len(MESSAGE)},
        "paths": results,
        "pqcnet_added_ms": {
            "connect_p50": round(pq["connect"]["p50_ms"] - direct["connect"]["p50_ms"], 3),
            "round_trip_p50": round(pq["round_trip"]["p50_ms"]
                                    - direct["round_trip"]["p50_ms"], 3),
            "round_trip_p99": round(pq["round_trip"]["p99_ms"]
                                    - direct["round_trip"]["p99_ms"], 3)},
        "ratio_messages_per_s_pqcnet_to_direct": round(
            pq["throughput"]["messages_per_s"] / direct["throughput"]["messages_per_s"], 3),
        "pipe_rate": limited,
        "machine": {"before": before, "after": machine()},
        "cpus": os.cpu_count(),
    }
    if "nginx" in results:
        out["ratio_messages_per_s_pqcnet_to_nginx"] = round(
            pq["throughput"]["messages_per_s"]
            / results["nginx"]["throughput"]["messages_per_s"], 3)
    else:
        out["nginx"] = "not found (install with `scripts/services install`); baseline skipped"
    return out


@click.command("websocket")
@click.option("--connects", default=200, show_default=True, type=click.IntRange(1, 100_000),
              help="Sequential WebSocket opens per path (connect p50/p99).")
@click.option("--messages", default=2000, show_default=True, type=click.IntRange(1, 10**7),
              help="Sequential echoes on one connection per path (round-trip p50/p99).")
@click.option("--connections", default=8, show_default=True, type=click.IntRange(1, 1024),
              help="WebSockets open at once in the throughput phase.")
@click.option("--window", default=16, show_default=True, type=click.IntRange(1, 4096),
              help="Messages each of them keeps in flight.")
@click.option("--seconds", default=5.0, show_default=True,
              type=click.FloatRange(0.1, 3600), help="Throughput phase length per path.")
@click.option("--pipe-share", default=0.5, show_default=True, type=click.FloatRange(0, 1),
              help="Then limit the tenant's pipe_rate to this share of the bytes/s the "
                   "pqcnet path moved and measure again (0: skip).")
def cli(connects: int, messages: int, connections: int, window: int, seconds: float,
        pipe_share: float) -> None:
    """WebSocket echoes: sidecar → QSTP → sentry vs direct and vs nginx; prints JSON."""
    import json

    try:
        import websockets  # noqa: F401  (the app and the backend of this bench)
    except ImportError:
        raise click.UsageError("bench websocket needs the websockets package: "
                               "pip install websockets (in the dev extras)") from None
    click.echo(json.dumps(run(connects, messages, connections, window, seconds,
                               pipe_share), indent=2))
