"""The operations HTTP endpoint every long-running role serves next to its work port.

* ``GET /metrics`` — Prometheus text exposition of the role's registry followed by the
  process-wide default registry (``process_*``, ``python_gc_*``, and the module-level
  ``pqcnet_identity_*``, ``pqcnet_qstp_*``, ``pqcnet_mesh_*`` families), so the one port
  Prometheus scrapes carries the role, its identity and the process internals.
* ``GET /healthz`` — liveness: 200 while the process answers at all (the orchestrator
  restarts the container when it stops answering).
* ``GET /readyz`` — readiness: 200 when the role's own check passes (identity valid,
  bus/ledger/listener up), 503 otherwise; the body is JSON ``{"ready": bool,
  "checks": {name: true | "reason"}}`` so an operator sees which check failed.

A small thread server (the same model as ``prometheus_client.start_http_server``), so
a busy or wedged event loop does not hide ``/metrics``; the readiness callback only
reads state the role keeps current and must not block.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

#: a readiness check's result per name: True (passes) or a short reason it does not
Checks = Mapping[str, "bool | str"]
ReadyFn = Callable[[], Checks]

#: seconds a client gets to send its request (a stuck scraper cannot pin a thread)
REQUEST_TIMEOUT = 5.0


def readiness(checks: Checks) -> tuple[bool, dict[str, object]]:
    """``(ready, body)`` for a set of check results."""
    ok = all(v is True for v in checks.values())
    return ok, {"ready": ok, "checks": dict(checks)}


def not_expired(not_after: dt.datetime, now: dt.datetime | None = None) -> bool | str:
    """A readiness check on a certificate's ``not_after`` (aware UTC datetime)."""
    now = now or dt.datetime.now(dt.UTC)
    return True if now < not_after else f"certificate expired at {not_after.isoformat()}"


class OpsServer(ThreadingHTTPServer):
    """``/metrics``, ``/healthz``, ``/readyz`` on one port."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: str, port: int, registry: CollectorRegistry | None,
                 ready: ReadyFn | None) -> None:
        self.registry = registry
        self.ready = ready
        super().__init__((addr, port), _Handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _Handler(BaseHTTPRequestHandler):
    server: OpsServer
    timeout = REQUEST_TIMEOUT
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: probes every few seconds would flood the role's log."""

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            role = self.server.registry
            body = generate_latest(REGISTRY)
            if role is not None and role is not REGISTRY:
                body = generate_latest(role) + body
            self._send(200, body, CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._send(200, b"ok\n", "text/plain; charset=utf-8")
        elif path == "/readyz":
            try:
                checks = self.server.ready() if self.server.ready is not None else {}
            except Exception as exc:  # a failing check is "not ready", never a crash
                checks = {"check": f"{type(exc).__name__}: {exc}"}
            ok, doc = readiness(checks)
            self._send(200 if ok else 503, json.dumps(doc).encode() + b"\n", "application/json")
        else:
            self._send(404, b"not found\n", "text/plain; charset=utf-8")

    do_HEAD = do_GET


def start_ops_server(port: int, addr: str = "127.0.0.1", *,
                     registry: CollectorRegistry | None = None,
                     ready: ReadyFn | None = None) -> OpsServer:
    """Serve in a daemon thread; ``port`` 0 picks a free one (see ``.port``).
    Stop with ``shutdown()`` then ``server_close()``."""
    httpd = OpsServer(addr, port, registry, ready)
    threading.Thread(target=httpd.serve_forever, name="ops-http", daemon=True).start()
    return httpd


__all__ = ["REQUEST_TIMEOUT", "Checks", "OpsServer", "ReadyFn",
           "not_expired", "readiness", "start_ops_server"]
