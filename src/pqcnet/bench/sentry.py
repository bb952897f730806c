"""``pqcnet bench sentry``: proxied RPCs/s and added latency, sidecar → QSTP → sentry.

Three paths to the *same* backend, measured in one run by the same load generator:

* ``direct``  — client → backend (the floor);
* ``nginx``   — client → nginx (Debian, plain HTTP reverse proxy, upstream keep-alive)
  → backend; skipped with a note when no ``nginx`` binary is found;
* ``pqcnet``  — client → ``pqcnet sidecar`` (HTTP mode) → QSTP → ``pqcnet sentry run``
  → backend, with cached assertions (one per tunnel), ACL, limiter (limits set far
  above the offered load) and an identity-sanitizer policy on the path.

Every part is its own process on loopback (backend, nginx, sentry, sidecar, load
generator), as they would be deployed. The load generator is a minimal keep-alive
HTTP/1.1 client on raw asyncio streams so its own cost stays small and equal for
all paths; for throughput it runs in ``--loadgen-procs`` separate processes (the
connections split between them) so one Python client is not the bottleneck.
Latency: one connection, sequential requests (p50/p99); added latency is the
path's percentile minus the direct one. For the pqcnet path the CPU the sidecar and
sentry processes used per RPC during the throughput phase is reported too (from
``/proc``): unlike RPC/s it does not depend on what else the machine is running.
Throughput: ``--connections`` concurrent keep-alive connections for ``--seconds``.
The 1-minute load average before and after is part of the output: on the shared
2-core machine other work skews numbers. So is ``event_loop``: the sentry and sidecar
run on uvloop when it is installed (``pqcnet[fast]``); ``PQCNET_NO_UVLOOP=1`` in the
environment measures them on the stdlib loop.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import yaml
from tqdm import tqdm

TARGET_RPS = 5000
TARGET_ADDED_P99_MS = 5.0
_BODY = json.dumps({"jsonrpc": "2.0", "id": 1, "result": "0x1"}).encode()
_RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
             + str(len(_BODY)).encode() + b"\r\n\r\n" + _BODY)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------- backend


def _backend_main(port: int) -> None:
    """A tiny keep-alive HTTP/1.1 backend answering every request with the same JSON."""

    async def client(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                await _skip_body(r, await r.readuntil(b"\r\n\r\n"))
                w.write(_RESPONSE)
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    async def main() -> None:
        server = await asyncio.start_server(client, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# ---------------------------------------------------------------------------- client


async def _request(r: asyncio.StreamReader, w: asyncio.StreamWriter, req: bytes) -> int:
    w.write(req)
    head = await r.readuntil(b"\r\n\r\n")
    await _skip_body(r, head)
    return int(head[9:12])


async def _skip_body(r: asyncio.StreamReader, head: bytes) -> None:
    """Read (and drop) the Content-Length body that follows ``head`` (load generator only:
    the parser under test is the sentry's, not this one)."""
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:" and (length := int(line[15:])):
            await r.readexactly(length)


def _req(port: int) -> bytes:
    body = b'{"jsonrpc":"2.0","id":1,"method":"eth_blockNumber","params":{"user_id":"u1"}}'
    return (b"POST /rpc HTTP/1.1\r\nhost: 127.0.0.1:%d\r\ncontent-type: application/json\r\n"
            b"x-user-id: u1\r\ncontent-length: %d\r\n\r\n%s" % (port, len(body), body))


async def _latency(port: int, n: int) -> list[float]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    req = _req(port)
    for _ in range(20):
        await _request(r, w, req)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        status = await _request(r, w, req)
        out.append(time.perf_counter() - t)
        if status != 200:
            raise click.ClickException(f"port {port} answered {status}")
    w.close()
    return out


async def _throughput(port: int, conns: int, seconds: float) -> tuple[int, int]:
    req = _req(port)
    ok = bad = 0
    deadline = 0.0

    async def worker() -> None:
        nonlocal ok, bad
        r, w = await asyncio.open_connection("127.0.0.1", port)
        await _request(r, w, req)
        while time.perf_counter() < deadline:
            try:
                status = await _request(r, w, req)
            except (asyncio.IncompleteReadError, ConnectionError):
                bad += 1  # the server closed the connection: count it and reconnect
                w.close()
                r, w = await asyncio.open_connection("127.0.0.1", port)
                continue
            if status == 200:
                ok += 1
            else:
                bad += 1
        w.close()

    deadline = time.perf_counter() + seconds
    await asyncio.gather(*(worker() for _ in range(conns)))
    return ok, bad


def _pct(xs: list[float], p: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(p * len(xs)))] * 1000


def _throughput_proc(port: int, conns: int, seconds: float, out: Any) -> None:
    out.put(asyncio.run(_throughput(port, conns, seconds)))


def _throughput_multi(port: int, conns: int, seconds: float, procs: int) -> tuple[int, int]:
    """Run the throughput phase in ``procs`` processes; sum their counts."""
    procs = max(1, min(procs, conns))
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    shares = [conns // procs + (1 if i < conns % procs else 0) for i in range(procs)]
    workers = [ctx.Process(target=_throughput_proc, args=(port, n, seconds, q), daemon=True)
               for n in shares]
    for w in workers:
        w.start()
    try:
        got = [q.get(timeout=seconds + 60) for _ in workers]
    finally:
        for w in workers:
            w.join(10)
            if w.is_alive():
                w.terminate()
    return sum(g[0] for g in got), sum(g[1] for g in got)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _measure(port: int, n: int, conns: int, seconds: float, procs: int,
             watch: dict[str, int] | None = None) -> dict[str, Any]:
    lat = asyncio.run(_latency(port, n))
    before = {name: _cpu_seconds(pid) for name, pid in (watch or {}).items()}
    ok, bad = _throughput_multi(port, conns, seconds, procs)
    cpu = {f"{name}_cpu_ms_per_rpc": round((_cpu_seconds(pid) - before[name]) * 1000
                                           / max(ok, 1), 3)
           for name, pid in (watch or {}).items()}
    return {**cpu,"p50_ms": round(_pct(lat, 0.50), 3), "p99_ms": round(_pct(lat, 0.99), 3),
            "mean_ms": round(statistics.fmean(lat) * 1000, 3),
            "rps": round(ok / seconds, 1), "errors": bad}


# ---------------------------------------------------------------------------- setup


def _wait_port(port: int, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise click.ClickException(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def _nginx(d: Path, port: int, backend: int) -> subprocess.Popen[bytes] | None:
    exe = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists()
                                    else None)
    if exe is None:
        return None
    (d / "nginx" / "logs").mkdir(parents=True)
    conf = d / "nginx" / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
error_log logs/error.log warn;
pid logs/nginx.pid;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {d}/nginx/tmp;
  proxy_temp_path {d}/nginx/tmp;
  keepalive_requests 10000000;
  upstream be {{ server 127.0.0.1:{backend}; keepalive 64; keepalive_requests 10000000; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://be;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
""")
    return subprocess.Popen([exe, "-p", str(d / "nginx"), "-c", str(conf), "-g",
                             "daemon off;"], stderr=subprocess.DEVNULL)


def _pqcnet_stack(d: Path, backend: int, sentry_port: int, sidecar_port: int
                  ) -> list[subprocess.Popen[bytes]]:
    from pqcnet.crypto.pqc import SigningKey
    from pqcnet.identity import dev_identities
    from pqcnet.sentry.config import verify_key_pem

    _ca, (sentry_id, acme_id) = dev_identities(
        "pqcnet.test", "spiffe://pqcnet.test/ops/sentry/s1",
        "spiffe://pqcnet.test/acme/sidecar/a1")
    sentry_id.save(d / "sentry-id", None)
    acme_id.save(d / "acme-id", None)
    issuer = SigningKey.generate()
    (d / "issuer.pem").write_bytes(issuer.to_pem())
    (d / "issuer.pub").write_bytes(verify_key_pem(issuer.public_key))
    (d / "sentry.yaml").write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{sentry_port}", "identity_dir": "sentry-id",
        "issuers": {"acme": ["issuer.pub"]},
        "limits": {"max_in_flight": 4096, "default": {"rate": 1e6, "burst": 1e6}},
        "acl": {"allow_from": ["spiffe://pqcnet.test/*/sidecar/*"],
                "allow_methods": ["POST /rpc"]},
        "sanitizer": {"acme": {"key_hex": "11" * 32, "headers": {"x-user-id": "hash"}}},
        "backends": [{"name": "be", "kind": "http", "target": f"http://127.0.0.1:{backend}",
                      "tenants": ["acme"]}],
        "routes": [{"prefix": "/", "backend": "be"}],
    }))
    exe = str(Path(sys.executable).parent / "pqcnet")
    sentry = subprocess.Popen([exe, "sentry", "run", "--config", "sentry.yaml",
                               "--no-passphrase"], cwd=d, stderr=subprocess.DEVNULL)
    _wait_port(sentry_port)
    sidecar = subprocess.Popen([exe, "sidecar", "--sentry", f"127.0.0.1:{sentry_port}",
                                "--identity-dir", "acme-id", "--issuer-key", "issuer.pem",
                                "--tenant", "acme", "--subject", "bench", "--listen",
                                f"127.0.0.1:{sidecar_port}", "--no-passphrase"],
                               cwd=d, stderr=subprocess.DEVNULL)
    _wait_port(sidecar_port)
    return [sidecar, sentry]


def run(requests: int = 2000, connections: int = 32, seconds: float = 5.0,
        loadgen_procs: int = 2) -> dict[str, Any]:
    """Measure all three paths; returns the JSON-able result."""
    from pqcnet._util.loop import loop_name

    load_before = round(os.getloadavg()[0], 2)
    ports = {k: _free_port() for k in ("backend", "nginx", "sentry", "sidecar")}
    ctx = multiprocessing.get_context("spawn")
    backend = ctx.Process(target=_backend_main, args=(ports["backend"],), daemon=True)
    backend.start()
    procs: list[subprocess.Popen[bytes]] = []
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="pqcnet-bench-sentry-") as tmp:
        d = Path(tmp)
        try:
            _wait_port(ports["backend"])
            nginx = _nginx(d, ports["nginx"], ports["backend"])
            if nginx is not None:
                procs.append(nginx)
                _wait_port(ports["nginx"])
            procs += _pqcnet_stack(d, ports["backend"], ports["sentry"], ports["sidecar"])
            paths = [("direct", ports["backend"]), ("pqcnet", ports["sidecar"])]
            if nginx is not None:
                paths.insert(1, ("nginx", ports["nginx"]))
            watch = {"sidecar": procs[-2].pid, "sentry": procs[-1].pid}
            for name, port in tqdm(paths, desc="sentry bench", unit="path"):
                results[name] = _measure(port, requests, connections, seconds, loadgen_procs,
                                         watch if name == "pqcnet" else None)
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
            backend.terminate()
            backend.join(5)
    direct, pq = results["direct"], results["pqcnet"]
    out: dict[str, Any] = {
        "benchmark": "sentry",
        "cpus": os.cpu_count(),
        # what `pqcnet sentry run` / `pqcnet sidecar` ran on (same environment as here;
        # PQCNET_NO_UVLOOP=1 forces the stdlib loop for an A/B run)
        "event_loop": loop_name(),
        "settings": {"latency_requests": requests, "connections": connections,
                     "seconds": seconds, "loadgen_processes": loadgen_procs},
        "loadavg_1m": {"before": load_before, "after": round(os.getloadavg()[0], 2)},
        "paths": results,
        "pqcnet_added_latency_ms": {
            "p50": round(pq["p50_ms"] - direct["p50_ms"], 3),
            "p99": round(pq["p99_ms"] - direct["p99_ms"], 3)},
        "ratio_rps_pqcnet_to_direct": round(pq["rps"] / direct["rps"], 3),
        "targets": {"rps": TARGET_RPS, "added_p99_ms": TARGET_ADDED_P99_MS,
                    "rps_met": pq["rps"] >= TARGET_RPS,
                    "added_p99_met": pq["p99_ms"] - direct["p99_ms"] <= TARGET_ADDED_P99_MS},
    }
    if "nginx" in results:
        ng = results["nginx"]
        out["nginx_added_latency_ms"] = {"p50": round(ng["p50_ms"] - direct["p50_ms"], 3),
                                         "p99": round(ng["p99_ms"] - direct["p99_ms"], 3)}
        out["ratio_rps_pqcnet_to_nginx"] = round(pq["rps"] / ng["rps"], 3)
    else:
        out["nginx"] = "not found (install with `scripts/services install`); baseline skipped"
    return out


@click.command("sentry")
@click.option("--requests", default=2000, show_default=True,
              help="Sequential requests per path for the latency percentiles.")
@click.option("--connections", default=32, show_default=True,
              help="Concurrent keep-alive connections for the throughput phase.")
@click.option("--seconds", default=5.0, show_default=True, help="Throughput phase length.")
@click.option("--loadgen-procs", default=2, show_default=True,
              help="Load-generator processes for the throughput phase.")
def cli(requests: int, connections: int, seconds: float, loadgen_procs: int) -> None:
    """Sidecar → QSTP → sentry → backend vs direct and vs nginx; prints JSON."""
    click.echo(json.dumps(run(requests, connections, seconds, loadgen_procs), indent=2))
