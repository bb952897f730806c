"""``pqcnet bench enroll``: how fast ``pqcnet ca serve`` lets nodes join.

N joining nodes, C at a time (the client in this process, the service in a second
one), each: a full PQ TLS 1.3 handshake (X25519MLKEM768, the
CA's ML-DSA server certificate), ``POST /v1/enroll`` with a one-time token and a CSR,
and the answer checked into a :class:`~pqcnet.identity.NodeIdentity`. Keys and CSRs
are made before the clock starts (a joining node makes its key on its own CPU). The
client is the benchmark's own ~60 lines of h11 over :mod:`pqcnet.qstp.tls` (the layer
contract keeps ``bench`` from importing ``runtime``'s client).

The service runs in a second process (as in a deployment), with its real work per
enrollment: token check and spend (locked file, fsync), CSR proof of possession,
certificate signature, CA state saved (fsync), a QS-DAG vertex signed and stored
(fsync), a fresh CRL when due. The floor is the raw ML-DSA-65 sign rate measured in
the same run: every certificate needs at least one signature, so enrollments/s can
never beat it; the target is at least half of it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from pqcnet._util.orphans import ending_with_us
from pqcnet.bench._stats import machine, percentiles, ratio
from pqcnet.crypto.pqc import SigningKey
from pqcnet.errors import PqcnetError
from pqcnet.identity import MeshCA, SpiffeId, build_csr
from pqcnet.identity.tokens import TokenBundle, TokenStore

TD = "bench.test"
#: Seconds the service child may take to start.
START_TIMEOUT_S = 120.0


def _sign_rate(seconds: float = 1.0) -> float:
    key = SigningKey.generate("ML-DSA-65")
    msg = os.urandom(1024)
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        key.sign(msg)
        n += 1
    return n / elapsed


def _start_service(ca_dir: Path) -> tuple[subprocess.Popen[str], str]:
    exe = Path(sys.executable).parent / "pqcnet"
    cmd = [str(exe) if exe.exists() else "pqcnet", "ca", "serve", "--dir", str(ca_dir),
           "--no-passphrase", "--port", "0", "--enroll-rate", "1000000",
           "--enroll-burst", "1000000"]
    proc = subprocess.Popen(ending_with_us(cmd), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT_S
    line = ""
    while time.monotonic() < deadline and not line:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise click.ClickException(f"ca serve did not start: {err}")
    ready = json.loads(line)
    return proc, str(ready["url"])


async def _enroll_one(host: str, port: int, ctx: Any, pattern: str, bundle: TokenBundle,
                      sid: SpiffeId, csr: bytes, key: SigningKey) -> None:
    """One enrollment with the benchmark's own small client (h11 over the PQ TLS
    memory BIO); the layers keep ``bench`` from importing the runtime's client."""
    import h11
    from OpenSSL import SSL

    from pqcnet.identity import NodeIdentity
    from pqcnet.qstp.tls import new_connection, verify_server

    reader, writer = await asyncio.open_connection(host, port)
    tls = new_connection(ctx, server=False)

    async def flush() -> None:
        while True:
            try:
                writer.write(tls.bio_read(65536))
            except SSL.WantReadError:
                break
        await writer.drain()

    async def pull() -> None:
        await flush()
        data = await reader.read(65536)
        if not data:
            raise ConnectionError("CA service closed the connection")
        tls.bio_write(data)

    try:
        while True:
            try:
                tls.do_handshake()
                break
            except SSL.WantReadError:
                await pull()
        await flush()
        verify_server(tls, _policy(pattern))
        body = json.dumps({"token": bundle.token, "csr": csr.decode()}).encode()
        conn = h11.Connection(h11.CLIENT)
        out = conn.send(h11.Request(method="POST", target="/v1/enroll", headers=[
            ("host", host), ("content-length", str(len(body))), ("connection", "close")]))
        tls.sendall((out or b"") + (conn.send(h11.Data(data=body)) or b"")
                    + (conn.send(h11.EndOfMessage()) or b""))
        await flush()
        status, answer = 0, bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    conn.receive_data(tls.recv(65536))
                except SSL.WantReadError:
                    await pull()
                except SSL.ZeroReturnError:
                    conn.receive_data(b"")
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                answer += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
        if status != 200:
            raise ConnectionError(f"enroll answered {status}: {bytes(answer[:200])!r}")
        got = json.loads(answer)
        identity = NodeIdentity.from_pem(key, got["certificate"].encode(),
                                         got["ca_cert"].encode())
        if identity.spiffe_id != sid:
            raise ConnectionError(f"issued {identity.spiffe_id}, asked {sid}")
    finally:
        writer.close()


def _policy(pattern: str) -> Any:
    from pqcnet.qstp.tls import TlsPolicy

    return TlsPolicy(alpn=b"http/1.1", session_tickets=False, allowed_peers=(pattern,))


async def _enroll_all(url: str, jobs: list[tuple[TokenBundle, SpiffeId, bytes, SigningKey]],
                      concurrency: int) -> tuple[list[float], list[str], float]:
    from pqcnet.identity.tokens import ca_service_pattern
    from pqcnet.qstp.tls import build_anonymous_client_context

    host, port = url.removeprefix("https://").rsplit(":", 1)
    pattern = ca_service_pattern(TD)
    ctx = build_anonymous_client_context(jobs[0][0].ca_bundle_pem, _policy(pattern))
    latencies: list[float] = []
    failures: list[str] = []
    queue = list(reversed(jobs))

    async def worker() -> None:
        while queue:
            bundle, sid, csr, key = queue.pop()
            t0 = time.perf_counter()
            try:
                await asyncio.wait_for(
                    _enroll_one(host, int(port), ctx, pattern, bundle, sid, csr, key), 60)
            except (OSError, ValueError, KeyError, TimeoutError, PqcnetError) as exc:
                failures.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, failures, time.perf_counter() - start


def run(nodes: int = 200, concurrency: int = 16) -> dict[str, Any]:
    """Enroll ``nodes`` fresh nodes, ``concurrency`` at a time; JSON-ready results."""
    with tempfile.TemporaryDirectory(prefix="pqcnet-bench-enroll-") as tmp:
        ca_dir = Path(tmp) / "ca"
        ca = MeshCA.create(TD)
        ca.save(ca_dir, None)
        tokens = TokenStore(ca_dir)
        jobs = []
        for i in range(nodes):
            sid = SpiffeId(TD, "bench", "relayer", f"n{i}")
            secret, rec = tokens.create(str(sid), "relayer", dt.timedelta(hours=1))
            key = SigningKey.generate("ML-DSA-65")
            jobs.append((TokenBundle(secret, str(sid), "relayer", rec.expires_at,
                                     ca.trust_bundle_pem()), sid, build_csr(key, sid), key))
        floor_before = _sign_rate()
        proc, url = _start_service(ca_dir)
        try:
            latencies, failures, wall = asyncio.run(_enroll_all(url, jobs, concurrency))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        floor_after = _sign_rate()
    floor = (floor_before + floor_after) / 2
    rate = len(latencies) / wall if wall > 0 else None
    return {
        "benchmark": "enroll",
        "nodes": nodes,
        "concurrency": concurrency,
        "enrolled": len(latencies),
        "failed": len(failures),
        "failures_sample": failures[:3],
        "enrollments_per_s": round(rate, 2) if rate else None,
        "latency": percentiles(latencies),
        "baseline_mldsa65_sign_per_s": round(floor, 1),
        "baseline_mldsa65_sign_per_s_before_after": [round(floor_before, 1),
                                                     round(floor_after, 1)],
        "ratio_vs_sign": ratio(rate, floor),
        "target_ratio": 0.5,
        "machine": machine(),
    }


@click.command()
@click.option("--nodes", default=200, show_default=True, type=click.IntRange(1, 100_000),
              help="Joining nodes (one token, key and CSR each).")
@click.option("--concurrency", default=16, show_default=True, type=click.IntRange(1, 1024),
              help="Enrollments in flight at once.")
def cli(nodes: int, concurrency: int) -> None:
    """Enrollments/s and p99 against `pqcnet ca serve`, vs the raw ML-DSA-65 sign rate."""
    click.echo(json.dumps(run(nodes, concurrency), indent=1))
