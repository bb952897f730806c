"""Real parts for sentry tests: an HTTP JSON-RPC backend, a gRPC backend, a TCP echo
backend, a mesh of QSTP identities, issuer keys and a sentry config on disk.

Nothing here is a mock: the HTTP backend is the stdlib ``ThreadingHTTPServer`` on a
loopback port, the gRPC backend a ``grpc.aio`` server with the generated Echo
service, and the sentry / sidecar run over real QSTP tunnels.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import yaml

from pqcnet import qstp
from pqcnet.crypto.pqc import SigningKey
from pqcnet.identity import NodeIdentity, dev_identities
from pqcnet.proto import echo_pb2, echo_pb2_grpc
from pqcnet.sentry.config import load_config, verify_key_pem
from pqcnet.sentry.core import Sentry
from pqcnet.sentry.pool import SentryPool
from pqcnet.sentry.server import SentryServer
from pqcnet.sentry.sidecar import Sidecar
from tests.config.schemacheck import assert_schema
from tests.procs import PQCNET as PQCNET_EXE

TD = "pqcnet.test"
SENTRY_ID = f"spiffe://{TD}/ops/sentry/s1"
ACME_ID = f"spiffe://{TD}/acme/sidecar/a1"
GLOBEX_ID = f"spiffe://{TD}/globex/sidecar/g1"
INTRUDER_ID = f"spiffe://{TD}/acme/intruder/i1"
SANITIZER_KEY = "11" * 32


@dataclass
class Mesh:
    sentry: NodeIdentity
    acme: NodeIdentity
    globex: NodeIdentity
    intruder: NodeIdentity
    acme_issuer: SigningKey
    globex_issuer: SigningKey


def make_mesh() -> Mesh:
    _ca, (s, a, g, i) = dev_identities(TD, SENTRY_ID, ACME_ID, GLOBEX_ID, INTRUDER_ID)
    return Mesh(s, a, g, i, SigningKey.from_seed(b"\x01" * 32),
                SigningKey.from_seed(b"\x02" * 32))


#: the console script of this venv, for tests that run real processes
PQCNET = [PQCNET_EXE]


def pq(*args: str, cwd: Path) -> str:
    """Run a ``pqcnet`` command in ``cwd``; its stdout (it must succeed)."""
    out = subprocess.run([*PQCNET, *args], cwd=cwd, capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout


def cli_identities(d: Path) -> None:
    """What the README's walkthrough makes with the CLI in ``d``: a CA (``ca``), the
    sentry's and tenant acme's sidecar identities (``sentry-id``, ``acme-id``) and
    acme's assertion issuer key (``acme-issuer.pem`` / ``.pub``)."""
    pq("ca", "init", "--dir", "ca", "--trust-domain", "pqcnet.test", "--no-passphrase", cwd=d)
    for sid, out in (("spiffe://pqcnet.test/ops/sentry/s1", "sentry-id"),
                     ("spiffe://pqcnet.test/acme/sidecar/a1", "acme-id")):
        pq("ca", "issue", "--dir", "ca", "--no-passphrase", "--no-node-passphrase", sid,
           "--out", out, cwd=d)
    pq("assertion", "keygen", "--out", "acme-issuer.pem", "--pub", "acme-issuer.pub", cwd=d)


# ---------------------------------------------------------------------------- backends


@dataclass
class Seen:
    """What a backend received (thread-safe enough for counters under the GIL)."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class HttpBackend:
    """JSON-RPC over HTTP/1.1: echoes method/params, reports headers it saw."""

    def __init__(self, delay: float = 0.0, big: int = 0) -> None:
        self.seen = Seen()
        seen = self.seen
        self.delay = delay
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                with seen.lock:
                    seen.in_flight += 1
                    seen.max_in_flight = max(seen.max_in_flight, seen.in_flight)
                try:
                    n = int(self.headers.get("content-length", "0"))
                    body = self.rfile.read(n) if n else b""
                    seen.requests.append({"method": self.command, "path": self.path,
                                          "headers": dict(self.headers.items()),
                                          "body": body})
                    if outer.delay:
                        time.sleep(outer.delay)
                    if self.path.startswith("/big"):
                        size = int(self.path.split("/")[-1])
                        self.send_response(200)
                        self.send_header("content-type", "application/octet-stream")
                        self.send_header("content-length", str(size))
                        self.end_headers()
                        chunk = bytes(range(256)) * 256
                        sent = 0
                        while sent < size:
                            part = chunk[: size - sent]
                            self.wfile.write(part)
                            sent += len(part)
                        return
                    try:
                        req = json.loads(body) if body else {}
                    except ValueError:
                        req = {"raw": body.decode("latin-1")}
                    out = json.dumps({"jsonrpc": "2.0", "id": req.get("id") if
                                      isinstance(req, dict) else None,
                                      "result": {"path": self.path, "echo": req}}).encode()
                    self.send_response(200)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(out)))
                    self.end_headers()
                    self.wfile.write(out)
                finally:
                    with seen.lock:
                        seen.in_flight -= 1

            do_GET = _handle
            do_POST = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HttpBackend:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class EchoServicer(echo_pb2_grpc.EchoServicer):
    def __init__(self) -> None:
        self.seen: list[tuple[str, list[tuple[str, str]]]] = []
        #: Count replies the gRPC library accepted for sending (flow-control tests)
        self.produced = 0
        #: a streaming call whose client went away (cancel, deadline) ended here
        self.cancelled = asyncio.Event()
        #: streaming calls currently running
        self.streams = 0

    async def Say(self, request: echo_pb2.EchoRequest,
                  context: grpc.aio.ServicerContext[Any, Any]) -> echo_pb2.EchoReply:
        md = [(str(k), str(v)) for k, v in context.invocation_metadata() or ()]
        self.seen.append((request.text, md))
        if request.text == "not-found":
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        if request.text == "bin":
            context.set_trailing_metadata((("x-echo-bin", b"\xff\x00trailer"),
                                           ("x-echo", "plain")))
        return echo_pb2.EchoReply(text=request.text.upper(),
                                  metadata=[f"{k}={v}" for k, v in md])

    def _watch(self, context: grpc.aio.ServicerContext[Any, Any]) -> list[bool]:
        """Count the call as running until grpc says it is done; a call whose handler
        did not reach its end (``ended[0]``) was ended by the other side. (grpc's own
        ``cancelled()`` stays False when a client's cancel fails a pending write.)"""
        self.streams += 1
        ended = [False]

        def done(_ctx: Any) -> None:
            self.streams -= 1
            if not ended[0]:
                self.cancelled.set()

        context.add_done_callback(done)
        return ended

    async def Count(self, request: echo_pb2.CountRequest,
                    context: grpc.aio.ServicerContext[Any, Any]
                    ) -> AsyncIterator[echo_pb2.CountReply]:
        ended = self._watch(context)
        md = [(str(k), str(v)) for k, v in context.invocation_metadata() or ()]
        self.seen.append((f"count:{request.count}", md))
        await context.send_initial_metadata((("x-count-start", "yes"),))
        padding = b"p" * request.size
        seq = 0
        while request.count == 0 or seq < request.count:
            yield echo_pb2.CountReply(seq=seq, padding=padding)
            seq += 1
            self.produced = seq
        ended[0] = True
        if request.fail_after:
            await context.abort(grpc.StatusCode.DATA_LOSS, request.fail_after,
                                (("x-failed-at", str(seq)),))
        context.set_trailing_metadata((("x-count", str(seq)), ("x-count-bin", b"\x00\xffend")))

    async def Chat(self, request_iterator: AsyncIterator[echo_pb2.EchoRequest],
                   context: grpc.aio.ServicerContext[Any, Any]
                   ) -> AsyncIterator[echo_pb2.EchoReply]:
        ended = self._watch(context)
        n = 0
        async for req in request_iterator:
            n += 1
            if req.text == "give-up":  # the backend ends the call mid-stream
                ended[0] = True
                await context.abort(grpc.StatusCode.CANCELLED, "backend gave up")
            if req.text == "bye":  # the backend finishes before the client does
                break
            if req.text == "slow":  # busy when the client cancels
                await asyncio.sleep(30)
            yield echo_pb2.EchoReply(text=req.text.upper())
        ended[0] = True
        context.set_trailing_metadata((("x-chat-messages", str(n)),))


@contextlib.asynccontextmanager
async def grpc_backend() -> AsyncIterator[tuple[EchoServicer, int]]:
    server = grpc.aio.server()
    servicer = EchoServicer()
    echo_pb2_grpc.add_EchoServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, port
    finally:
        await server.stop(None)


class TcpEcho:
    """TCP echo backend: echoes each read reversed; after :data:`FLOOD` it writes
    :data:`FLOOD_CHUNK` until the peer goes (a backend that talks to a client that
    stopped reading). Counts connections opened and closed, seen from its side."""

    FLOOD = b"flood"
    FLOOD_CHUNK = b"f" * 65536

    def __init__(self) -> None:
        self.opened = self.closed = 0

    async def client(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.opened += 1
        try:
            while data := await r.read(65536):
                if data == self.FLOOD:
                    while True:  # drain() waits while nobody reads; fails once closed
                        w.write(self.FLOOD_CHUNK)
                        await w.drain()
                w.write(data[::-1])
                await w.drain()
        except OSError:  # the peer reset or went; nothing to echo to
            pass
        finally:
            self.closed += 1
            w.close()


@contextlib.asynccontextmanager
async def tcp_echo(backend: TcpEcho | None = None) -> AsyncIterator[int]:
    """A :class:`TcpEcho` (``backend``, to watch its counts) on a loopback port."""
    server = await asyncio.start_server((backend or TcpEcho()).client, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


# ---------------------------------------------------------------------------- config


def config_dict(http_port: int, grpc_port: int, tcp_port: int, *, rate: float = 1000,
                burst: float = 1000, max_in_flight: int = 64,
                methods: list[str] | None = None,
                tenant_share: float | None = None) -> dict[str, Any]:
    limits: dict[str, Any] = {"max_in_flight": max_in_flight,
                              "default": {"rate": rate, "burst": burst},
                              "tenants": {"acme": {"rate": rate, "burst": burst}}}
    if tenant_share is not None:
        limits["tenant_share"] = tenant_share
    return {
        "listen": "127.0.0.1:0",
        "issuers": {"acme": ["acme-issuer.pub"], "globex": ["globex-issuer.pub"]},
        "limits": limits,
        "acl": {"allow_from": [f"spiffe://{TD}/*/sidecar/*"],
                "allow_methods": methods if methods is not None else [
                    "POST /rpc", "POST /rpc/**", "GET /status", "GET /big/*",
                    "POST /globex/*", "/pqcnet.echo.Echo/*", "TCP tcp-echo"]},
        "sanitizer": {"acme": {"key_hex": SANITIZER_KEY,
                               "headers": {"x-forwarded-for": "strip", "x-user-id": "hash",
                                           "x-wallet": {"replace": "redacted"}},
                               "json_fields": {"params.ip": "strip",
                                               "params.user_id": "hash",
                                               "params.wallet": {"replace": "0x0"}}}},
        "backends": [
            {"name": "jsonrpc", "kind": "http", "target": f"http://127.0.0.1:{http_port}",
             "tenants": ["acme"], "timeout": 5},
            {"name": "globex-only", "kind": "http", "target": f"http://127.0.0.1:{http_port}",
             "tenants": ["globex"], "timeout": 5},
            {"name": "echo", "kind": "grpc", "target": f"127.0.0.1:{grpc_port}",
             "tenants": ["acme", "globex"], "timeout": 5},
            {"name": "tcp-echo", "kind": "tcp", "target": f"127.0.0.1:{tcp_port}",
             "tenants": ["acme"]},
        ],
        "routes": [{"prefix": "/globex/", "backend": "globex-only"},
                   {"prefix": "/", "backend": "jsonrpc"},
                   {"prefix": "/pqcnet.echo.Echo/", "backend": "echo"}],
        "bounds": {"max_request_body": 1024 * 1024, "request_read_timeout": 1.0},
    }


def write_config(dir_: Path, mesh: Mesh, cfg: dict[str, Any]) -> Path:
    (dir_ / "acme-issuer.pub").write_bytes(verify_key_pem(mesh.acme_issuer.public_key))
    (dir_ / "globex-issuer.pub").write_bytes(verify_key_pem(mesh.globex_issuer.public_key))
    assert_schema("sentry", cfg)
    path = dir_ / "sentry.yaml"
    tmp = dir_ / "sentry.yaml.tmp"
    tmp.write_text(yaml.safe_dump(cfg))
    tmp.replace(path)
    return path


@dataclass
class Stack:
    server: SentryServer
    sentry: Sentry
    port: int
    config_path: Path

    def sidecar(self, identity: NodeIdentity, issuer: SigningKey, tenant: str = "acme",
                *, subject: str = "alice", ttl: float = 300.0,
                clock: Callable[[], float] = time.time) -> Sidecar:
        return sidecar_to(self.port, identity, issuer, tenant, subject=subject, ttl=ttl,
                          clock=clock)


def pool_of(mesh: Mesh, ports: list[int], **kw: Any) -> SentryPool:
    """acme sidecars to the sentries on 127.0.0.1:``ports``, as one pool."""
    return SentryPool([(f"127.0.0.1:{p}", sidecar_to(p, mesh.acme, mesh.acme_issuer))
                       for p in ports], **kw)


def sidecar_to(port: int, identity: NodeIdentity, issuer: SigningKey, tenant: str = "acme",
               *, subject: str = "alice", ttl: float = 300.0,
               clock: Callable[[], float] = time.time) -> Sidecar:
    """A sidecar dialling the sentry on 127.0.0.1:``port`` as ``identity``."""

    async def dial() -> Any:
        return await qstp.connect("127.0.0.1", port, identity)

    return Sidecar(dial, issuer, subject=subject, tenant=tenant, ttl=ttl, clock=clock)


@contextlib.asynccontextmanager
async def sentry_stack(mesh: Mesh, config_path: Path) -> AsyncIterator[Stack]:
    sentry = Sentry(load_config(config_path))
    server = SentryServer(sentry, mesh.sentry)
    port = await server.start()
    try:
        yield Stack(server, sentry, port, config_path)
    finally:
        await server.aclose()
