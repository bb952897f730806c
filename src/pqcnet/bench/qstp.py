"""``pqcnet bench qstp``: QSTP handshakes and throughput against a stdlib-``ssl`` baseline.

Everything runs over loopback TCP with the servers in a second process (so each side
gets a core) and the clients in this one. Measured in the same run:

* handshake latency p50/p99: QSTP full (X25519MLKEM768, ML-DSA-65 mutual auth),
  QSTP resumed (TLS 1.3 ticket), and classical TLS 1.3 mutual auth from the stdlib
  ``ssl`` module (ECDSA P-256 certificates, OpenSSL's default X25519 group);
* bulk throughput with 64 KiB writes, and the rate of 256-byte writes, through a
  QSTP stream vs stdlib ``ssl`` asyncio streams, plus the CPU seconds both processes
  spent per GiB (wall-clock rates swing with other load on a small machine; CPU per
  byte much less so). Ratios > 1 mean QSTP is better. Both sides of the bulk
  comparison write the same sizes and must have negotiated the same cipher suite
  (checked: the run aborts otherwise; both pick TLS_AES_256_GCM_SHA384); their OpenSSL
  builds differ (pyOpenSSL's bundled one vs the system's, both in ``setup``).

A QSTP ``connect()`` returns only after the server's first frame arrived (proof
that the server accepted our certificate), half a round trip more than the stdlib
client, which returns as soon as *it* finished. The numbers include that.

The crypto floor, measured in the same run: the same full (and resumed) handshake
driven entirely in memory in this process (two sans-IO ``Connection`` objects over
memory BIOs, no sockets, no event loop): both sides' work back to back, which is
what the over-socket handshake cannot beat without running the sides in parallel.
The over-socket p50 is reported as a ratio to it (target: <= 1.2x), and so is the CPU
both processes spent per over-socket handshake (connect and close included; read from
the server process over a plain TCP port) against the in-memory CPU per handshake:
wall times on a busy machine include waiting for the cores, CPU much less so.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import ssl
import statistics
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from pqcnet.bench._spawn import save_identities, spawned
from pqcnet.bench._stats import loadavg, percentiles

TARGETS = {
    "bulk_gbit_s_min": 1.0,
    "bulk_ratio_vs_stdlib_min": 1.5,
    "resumed_vs_classical_full_max": 1.5,
    "pq_full_handshake_p50_ms_max": 10.0,
    "socket_vs_in_memory_full_max": 1.2,
}
_LEN = struct.Struct(">Q")
#: sink reply: bytes counted, server CPU seconds spent on the transfer
_REPLY = struct.Struct(">Qd")
#: the server process's CPU seconds, from its plain-TCP CPU port
_CPU = struct.Struct(">d")
PASSPHRASE = b"bench"
#: Flights exchanged before an in-memory handshake must have finished.
_MAX_PUMP_ROUNDS = 20


# --------------------------------------------------------------------------- identities


def _classical_pki(root: Path) -> None:
    """A P-256 CA, server and client certificates for the stdlib baseline."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("bench-ca")).issuer_name(name("bench-ca"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    (root / "c-ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for who in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(who)).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        (root / f"c-{who}.pem").write_bytes(
            cert.public_bytes(serialization.Encoding.PEM)
            + key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()))


def _stdlib_context(root: Path, server: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(root / ("c-server.pem" if server else "c-client.pem"))
    ctx.load_verify_locations(root / "c-ca.pem")
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = False
    return ctx


# --------------------------------------------------------------------------- server process


async def _serve_all(root: str, ports: Any) -> None:
    from pqcnet import qstp
    from pqcnet.identity import NodeIdentity
    from pqcnet.qstp.aio import Stream, Tunnel

    ident = NodeIdentity.load(Path(root) / "server", PASSPHRASE)

    async def sink(stream: Stream) -> None:
        cpu = time.process_time()
        total = 0
        async for chunk in stream:
            total += len(chunk)
        await stream.send(_REPLY.pack(total, time.process_time() - cpu), end=True)

    async def handler(tunnel: Tunnel) -> None:
        tasks = [asyncio.create_task(sink(s)) async for s in tunnel]
        await asyncio.gather(*tasks, return_exceptions=True)

    async def stdlib_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            header = await reader.readexactly(_LEN.size)
            cpu = time.process_time()
            want = _LEN.unpack(header)[0]
            got = 0
            while got < want:
                chunk = await reader.read(1 << 20)
                if not chunk:
                    break
                got += len(chunk)
            writer.write(_REPLY.pack(got, time.process_time() - cpu))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def cpu_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(_CPU.pack(time.process_time()))  # this process's CPU seconds so far
        await writer.drain()
        writer.close()

    server = await qstp.serve(handler, "127.0.0.1", 0, ident)
    base = await asyncio.start_server(stdlib_handler, "127.0.0.1", 0,
                                      ssl=_stdlib_context(Path(root), server=True))
    cpu = await asyncio.start_server(cpu_handler, "127.0.0.1", 0)
    ports.put((server.port, base.sockets[0].getsockname()[1], cpu.sockets[0].getsockname()[1]))
    await asyncio.Event().wait()


def _server_main(root: str, ports: Any) -> None:
    asyncio.run(_serve_all(root, ports))


# --------------------------------------------------------------------------- measurements


def _pyopenssl_version() -> str:
    from OpenSSL import SSL

    return SSL.SSLeay_version(SSL.SSLEAY_VERSION).decode()


def _pcts(samples: list[float]) -> dict[str, Any]:
    return percentiles(samples)


def _in_memory_handshakes(root: Path, n: int, resumed: bool) -> dict[str, Any]:
    """Full (or resumed) mutual handshakes with both sides in this process, no I/O:
    the crypto floor of a handshake. Time per handshake = both sides' work."""
    from functools import partial

    from pqcnet.identity import NodeIdentity
    from pqcnet.qstp import events as ev
    from pqcnet.qstp.connection import Connection
    from pqcnet.qstp.tls import TlsPolicy, build_context, new_connection, verify_peer

    policy = TlsPolicy()
    cid = NodeIdentity.load(root / "client", PASSPHRASE)
    sid = NodeIdentity.load(root / "server", PASSPHRASE)
    cctx = build_context(cid, policy, server=False)
    sctx = build_context(sid, policy, server=True)

    def one(session: Any) -> Connection:
        c = Connection(new_connection(cctx, server=False, session=session), client=True,
                       verify=partial(verify_peer, identity=cid, policy=policy))
        s = Connection(new_connection(sctx, server=True), client=False,
                       verify=partial(verify_peer, identity=sid, policy=policy))
        c.start(0.0)
        s.start(0.0)
        done = {c: False, s: False}
        for _ in range(_MAX_PUMP_ROUNDS):
            moved = False
            for a, b in ((c, s), (s, c)):
                out = a.data_to_send()
                if out:
                    b.receive_data(out, 0.0)
                    moved = True
            for conn in (c, s):
                while (e := conn.next_event()) is not None:
                    if isinstance(e, ev.HandshakeCompleted):
                        done[conn] = True
            if not moved:
                break
        if not all(done.values()):
            raise RuntimeError("in-memory handshake did not complete")
        if session is not None and not (c.peer and c.peer.resumed):
            raise RuntimeError("expected a resumed in-memory handshake")
        return c

    last = one(None)  # kept alive while its ticket is offered
    session = last.session if resumed else None
    samples = []
    cpu = time.process_time()
    for _ in range(n):
        t0 = time.perf_counter()
        c = one(session)
        samples.append(time.perf_counter() - t0)
        if resumed:
            last, session = c, c.session
    return _pcts(samples) | {"cpu_ms": round((time.process_time() - cpu) / n * 1e3, 3)}


async def _server_cpu(cpu_port: int) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", cpu_port)
    value: float = _CPU.unpack(await reader.readexactly(_CPU.size))[0]
    writer.close()
    await writer.wait_closed()
    return value


async def _qstp_handshakes(port: int, ident: Any, n: int, resumed: bool,
                           bar: tqdm, cpu_port: int | None = None) -> dict[str, Any]:
    """Over-socket handshakes (connect + close each). With ``cpu_port`` also the CPU
    both processes spent per handshake, connect and close included: the figure the
    other processes on a busy machine do not move."""
    from pqcnet import qstp

    samples: list[float] = []
    session = None
    if resumed:
        first = await qstp.connect("127.0.0.1", port, ident)
        session = first.session
        await first.close()
    server_cpu = await _server_cpu(cpu_port) if cpu_port else 0.0
    client_cpu = time.process_time()
    for _ in range(n):
        t0 = time.perf_counter()
        tunnel = await qstp.connect("127.0.0.1", port, ident, session=session)
        samples.append(time.perf_counter() - t0)
        if resumed:
            if not tunnel.resumed:
                raise RuntimeError("expected a resumed handshake")
            session = tunnel.session  # each connection brings a fresh ticket
        await tunnel.close()
        bar.update()
    out: dict[str, Any] = _pcts(samples)
    if cpu_port:
        client_cpu = time.process_time() - client_cpu
        await asyncio.sleep(0.05)  # the server finishes closing the last tunnel
        server_cpu = await _server_cpu(cpu_port) - server_cpu
        out["client_cpu_ms"] = round(client_cpu / n * 1e3, 3)
        out["server_cpu_ms"] = round(server_cpu / n * 1e3, 3)
        out["cpu_ms"] = round((client_cpu + server_cpu) / n * 1e3, 3)
    return out


async def _stdlib_handshakes(port: int, ctx: ssl.SSLContext, n: int,
                             bar: tqdm) -> dict[str, float]:
    samples: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        _reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        samples.append(time.perf_counter() - t0)
        writer.close()
        await writer.wait_closed()
        bar.update()
    return _pcts(samples)


async def _qstp_transfer(port: int, ident: Any, total: int, size: int,
                         bar: tqdm) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (client + server) for pushing ``total`` bytes, and the
    negotiated cipher suite."""
    from pqcnet import qstp

    tunnel = await qstp.connect("127.0.0.1", port, ident)
    cipher = tunnel.peer.cipher
    stream = tunnel.open_stream()
    chunk = os.urandom(size)
    cpu = time.process_time()
    t0 = time.perf_counter()
    sent = 0
    while sent < total:
        await stream.send(chunk)
        sent += size
        if sent % (1 << 22) < size:
            bar.update(1 << 22)
    await stream.close()
    reply = await stream.read_all(64)
    elapsed = time.perf_counter() - t0
    client_cpu = time.process_time() - cpu
    counted, server_cpu = _REPLY.unpack(reply)
    if counted != sent:
        raise RuntimeError("QSTP sink counted a different number of bytes")
    await tunnel.close()
    return elapsed, client_cpu + server_cpu, cipher


async def _stdlib_transfer(port: int, ctx: ssl.SSLContext, total: int, size: int,
                           bar: tqdm) -> tuple[float, float, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    cipher = writer.get_extra_info("cipher")[0]
    chunk = os.urandom(size)
    cpu = time.process_time()
    t0 = time.perf_counter()
    writer.write(_LEN.pack(total))
    sent = 0
    while sent < total:
        writer.write(chunk)
        await writer.drain()
        sent += size
        if sent % (1 << 22) < size:
            bar.update(1 << 22)
    reply = await reader.readexactly(_REPLY.size)
    elapsed = time.perf_counter() - t0
    client_cpu = time.process_time() - cpu
    counted, server_cpu = _REPLY.unpack(reply)
    if counted != total:
        raise RuntimeError("stdlib sink counted a different number of bytes")
    writer.close()
    await writer.wait_closed()
    return elapsed, client_cpu + server_cpu, cipher


async def _measure(root: Path, ports: tuple[int, int, int], handshakes: int, bulk_mib: int,
                   small_mib: int, rounds: int) -> dict[str, Any]:
    from pqcnet.identity import NodeIdentity

    qport, sport, cpu_port = ports
    ident = NodeIdentity.load(root / "client", PASSPHRASE)
    cctx = _stdlib_context(root, server=False)
    out: dict[str, Any] = {}
    with tqdm(total=handshakes * 3, desc="handshakes", unit="hs", leave=False) as bar:
        # warm-up: contexts, caches, code paths
        await _qstp_handshakes(qport, ident, 3, False, tqdm(disable=True))
        await _stdlib_handshakes(sport, cctx, 3, tqdm(disable=True))
        _in_memory_handshakes(root, 3, False)
        # in-memory floor right before each over-socket set: same machine load
        out["handshake_in_memory_full"] = _in_memory_handshakes(root, handshakes, False)
        out["handshake_qstp_full"] = await _qstp_handshakes(qport, ident, handshakes, False, bar,
                                                            cpu_port)
        out["handshake_in_memory_resumed"] = _in_memory_handshakes(root, handshakes, True)
        out["handshake_qstp_resumed"] = await _qstp_handshakes(qport, ident, handshakes,
                                                               True, bar, cpu_port)
        out["handshake_stdlib_classical_full"] = await _stdlib_handshakes(
            sport, cctx, handshakes, bar)
    for label, size, mib in (("bulk_64k", 64 * 1024, bulk_mib), ("small_256b", 256, small_mib)):
        total = mib * 1024 * 1024
        qs: list[tuple[float, float, str]] = []
        bs: list[tuple[float, float, str]] = []
        with tqdm(total=2 * total * rounds, desc=label, unit="B", unit_scale=True,
                  leave=False) as bar:
            for _ in range(rounds):  # interleaved, so background load hits both alike
                qs.append(await _qstp_transfer(qport, ident, total, size, bar))
                bs.append(await _stdlib_transfer(sport, cctx, total, size, bar))
        q, b = statistics.median(x[0] for x in qs), statistics.median(x[0] for x in bs)
        qcpu = statistics.median(x[1] for x in qs)
        bcpu = statistics.median(x[1] for x in bs)
        ciphers = {x[2] for x in qs + bs}
        if len(ciphers) != 1:  # a different AEAD would make the ratio meaningless
            raise RuntimeError(f"QSTP and stdlib ssl negotiated different ciphers: {ciphers}")
        out[label] = {
            "bytes": total,
            "rounds": rounds,
            "frame_bytes": size,
            "cipher": ciphers.pop(),
            "qstp_gbit_s": round(total * 8 / q / 1e9, 3),
            "stdlib_gbit_s": round(total * 8 / b / 1e9, 3),
            "qstp_frames_per_s": round(total / size / q),
            "stdlib_frames_per_s": round(total / size / b),
            "ratio": round(b / q, 3),
            # CPU seconds (client + server) per GiB: less sensitive to other load
            "qstp_cpu_s_per_gib": round(qcpu / (total / 2**30), 3),
            "stdlib_cpu_s_per_gib": round(bcpu / (total / 2**30), 3),
            "cpu_ratio": round(bcpu / qcpu, 3),
        }
    return out


def run(handshakes: int = 200, bulk_mib: int = 256, small_mib: int = 16,
        rounds: int = 3) -> dict[str, Any]:
    """Run the whole benchmark; returns the JSON-able result."""
    load_before = loadavg()
    with tempfile.TemporaryDirectory(prefix="pqcnet-bench-qstp-") as tmp:
        root = Path(tmp)
        save_identities(root, PASSPHRASE, "server", "client")
        _classical_pki(root)
        with spawned(_server_main, root) as ports:
            res = asyncio.run(_measure(root, ports, handshakes, bulk_mib, small_mib, rounds))
    full = res["handshake_qstp_full"]["p50_ms"]
    resumed = res["handshake_qstp_resumed"]["p50_ms"]
    classical = res["handshake_stdlib_classical_full"]["p50_ms"]
    bulk = res["bulk_64k"]
    floor = res["handshake_in_memory_full"]["p50_ms"]
    res["ratios"] = {
        "qstp_full_socket_vs_in_memory_p50": round(full / floor, 3),
        # CPU (both processes, connect + close) per handshake vs the in-memory CPU:
        # what the wall ratio tends to when no other process competes for the cores
        "qstp_full_socket_vs_in_memory_cpu": round(
            res["handshake_qstp_full"]["cpu_ms"] / res["handshake_in_memory_full"]["cpu_ms"], 3),
        "qstp_resumed_socket_vs_in_memory_p50": round(
            resumed / res["handshake_in_memory_resumed"]["p50_ms"], 3),
        "qstp_full_vs_classical_full_p50": round(full / classical, 3),
        "qstp_resumed_vs_classical_full_p50": round(resumed / classical, 3),
        "bulk_qstp_vs_stdlib": bulk["ratio"],
        "small_qstp_vs_stdlib": res["small_256b"]["ratio"],
        "bulk_cpu_efficiency_qstp_vs_stdlib": bulk["cpu_ratio"],
        "small_cpu_efficiency_qstp_vs_stdlib": res["small_256b"]["cpu_ratio"],
    }
    res["targets"] = TARGETS
    res["targets_met"] = {
        "bulk_gbit_s": bulk["qstp_gbit_s"] >= TARGETS["bulk_gbit_s_min"],
        "bulk_ratio": bulk["ratio"] >= TARGETS["bulk_ratio_vs_stdlib_min"],
        "resumed_vs_classical": resumed / classical <= TARGETS["resumed_vs_classical_full_max"],
        "pq_full_p50": full < TARGETS["pq_full_handshake_p50_ms_max"],
        "socket_vs_in_memory_full": full / floor <= TARGETS["socket_vs_in_memory_full_max"],
    }
    res["setup"] = {
        "transport": "loopback TCP, TCP_NODELAY; servers in a second process",
        "qstp": "TLS 1.3 X25519MLKEM768, ML-DSA-65 mTLS, AES-256-GCM, pyOpenSSL memory BIO",
        "baseline": "stdlib ssl TLS 1.3 mTLS, ECDSA P-256, default group (X25519), asyncio",
        # same cipher (checked), same write sizes; the two OpenSSL builds differ
        "qstp_openssl": _pyopenssl_version(),
        "stdlib_openssl": ssl.OPENSSL_VERSION,
        "cpus": os.cpu_count(),
        # 1/5/15-minute load averages: other work on the machine skews wall times
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
    }
    return res


@click.command()
@click.option("--handshakes", default=200, show_default=True, type=click.IntRange(5, 5000),
              help="Handshakes per variant.")
@click.option("--bulk-mib", default=256, show_default=True, type=click.IntRange(1, 8192),
              help="MiB pushed with 64 KiB writes (per side, per round).")
@click.option("--small-mib", default=16, show_default=True, type=click.IntRange(1, 1024),
              help="MiB pushed with 256-byte writes (per side, per round).")
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(1, 20),
              help="Interleaved throughput rounds; the median is reported.")
def cli(handshakes: int, bulk_mib: int, small_mib: int, rounds: int) -> None:
    """QSTP handshake latency and throughput vs stdlib ssl (same run, loopback)."""
    click.echo(json.dumps(run(handshakes, bulk_mib, small_mib, rounds), indent=2))
