"""Readiness probes for ``scripts/services`` — stdlib only, so they run before the venv.

Why a Python helper at all: the bash script must decide "is Kafka serving?" and "do
the go-waku nodes relay to each other?" with a real protocol round trip, not by
grepping logs. A Kafka Metadata request and a few REST calls are awkward in bash and
short here. Every probe is bounded by ``--timeout`` and exits 0 (ready) or 1 (not
ready, with one line on stderr saying why).

    python3 tools/probe.py free-port
    python3 tools/probe.py kafka-id
    python3 tools/probe.py kafka 127.0.0.1:9092 --timeout 30
    python3 tools/probe.py waku-multiaddr http://127.0.0.1:8645
    python3 tools/probe.py waku-peers http://127.0.0.1:8645 --min 2 --timeout 60
    python3 tools/probe.py waku-relay http://127.0.0.1:8645 http://127.0.0.1:8646
    python3 tools/probe.py http-ok 'http://127.0.0.1:8222/healthz?js-enabled-only=true'
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import socket
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable

#: Delay between probe attempts; short because start-up waits are already bounded.
RETRY_INTERVAL_S = 0.5
#: Bound on a single Kafka response we are willing to read (metadata of a small cluster).
MAX_KAFKA_RESPONSE_BYTES = 16 * 1024 * 1024
#: Lowest port handed to a service (above the usual well-known/registered daemons).
FIXED_PORT_MIN = 20000
#: Assumed start of the ephemeral range when /proc does not say.
EPHEMERAL_FALLBACK_LOW = 32768
#: Random candidates tried before falling back to a kernel-chosen port.
FREE_PORT_TRIES = 200
#: Content topic used by the relay round-trip probe (pqcnet naming, never used by code).
PROBE_CONTENT_TOPIC = "/pqcnet/1/probe/proto"


class NotReady(Exception):
    """One probe attempt failed; the message says why (shown if the wait times out)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, chosen below the ephemeral range.

    Services keep their port across restarts. A port from the ephemeral range could be
    taken by some client's outgoing connection while the service is stopped, and the
    restart would then fail to bind; ports below the range are never handed out that way.
    """
    low = EPHEMERAL_FALLBACK_LOW
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    candidates = list(range(FIXED_PORT_MIN, low))
    random.shuffle(candidates)
    for port in candidates[:FREE_PORT_TRIES]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kafka_cluster_id(draw: Callable[[], bytes] = lambda: uuid.uuid4().bytes) -> str:
    """A KRaft cluster id: 16 random bytes, URL-safe base64 without padding (22 chars).

    Never one starting with ``-`` (1 in 64 of them would): Kafka's argument parser takes
    ``-t -xyz…`` for an option and refuses the format with "expected one argument", so
    a fresh services start failed that often. Kafka's own ``random-uuid`` redraws too."""
    while True:
        cid = base64.urlsafe_b64encode(draw()).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise NotReady("connection closed by broker")
        buf += chunk
    return bytes(buf)


def kafka_metadata(bootstrap: str, timeout: float) -> tuple[int, int]:
    """Send a Metadata v4 request (the oldest Kafka 4 accepts); return (brokers, controller).

    Request v4 header: api_key=3, api_version=4, correlation_id, client_id; body:
    topics=null (int32 -1), allow_auto_topic_creation=false.
    Response v4: correlation_id, throttle_time_ms, brokers[node_id, host, port, rack],
    cluster_id, controller_id, topics[...] (not parsed).
    """
    host, _, port = bootstrap.rpartition(":")
    client_id = b"pqcnet-probe"
    body = struct.pack(">hhih", 3, 4, 7, len(client_id)) + client_id
    body += struct.pack(">ib", -1, 0)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            sock.sendall(struct.pack(">i", len(body)) + body)
            (size,) = struct.unpack(">i", _recv_exact(sock, 4))
            if not 0 < size <= MAX_KAFKA_RESPONSE_BYTES:
                raise NotReady(f"implausible response size {size}")
            resp = _recv_exact(sock, size)
    except OSError as exc:
        raise NotReady(f"{bootstrap}: {exc}") from exc
    corr, _throttle, n_brokers = struct.unpack_from(">iii", resp, 0)
    if corr != 7:
        raise NotReady(f"correlation id mismatch ({corr})")
    off = 12
    for _ in range(n_brokers):
        off += 4
        (hlen,) = struct.unpack_from(">h", resp, off)
        off += 2 + hlen + 4
        (rlen,) = struct.unpack_from(">h", resp, off)
        off += 2 + max(rlen, 0)
    (clen,) = struct.unpack_from(">h", resp, off)
    off += 2 + max(clen, 0)
    (controller,) = struct.unpack_from(">i", resp, off)
    if n_brokers < 1 or controller < 0:
        raise NotReady(f"metadata has {n_brokers} brokers, controller {controller}")
    return n_brokers, controller


def _http(method: str, url: str, body: object | None = None, timeout: float = 5.0) -> object:
    if not url.startswith("http://127.0.0.1:"):
        raise NotReady(f"refusing non-loopback url {url!r}")
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)  # noqa: S310 (loopback http only)
    req.add_header("Content-Type", "application/json")
    req.add_header("Accept", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
            raw = resp.read()
    except (urllib.error.URLError, OSError) as exc:
        raise NotReady(f"{method} {url}: {exc}") from exc
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def waku_multiaddr(url: str) -> str:
    """The node's loopback TCP multiaddr with its peer id, from ``/debug/v1/info``."""
    info = _http("GET", f"{url}/debug/v1/info")
    addrs = info.get("listenAddresses", []) if isinstance(info, dict) else []
    for addr in addrs:
        if (
            isinstance(addr, str)
            and addr.startswith("/ip4/127.0.0.1/tcp/")
            and "/p2p/" in addr
            and "/ws" not in addr
        ):
            return addr
    raise NotReady(f"{url}/debug/v1/info has no loopback tcp address: {addrs!r}")


def waku_peers(url: str, minimum: int) -> int:
    """Number of connected relay peers the node at ``url`` reports via the admin API."""
    _http("GET", f"{url}/debug/v1/info")
    peers = _http("GET", f"{url}/admin/v1/peers")
    if not isinstance(peers, list):
        raise NotReady(f"{url}/admin/v1/peers returned {peers!r}")
    connected = [p for p in peers if isinstance(p, dict) and p.get("connected", True)]
    if len(connected) < minimum:
        raise NotReady(f"{url} sees {len(connected)} connected peers, want {minimum}")
    return len(connected)


def waku_relay(src: str, dst: str) -> None:
    """Publish through ``src`` on the autosharding API and see it arrive at ``dst``."""
    for url in (src, dst):
        _http("POST", f"{url}/relay/v1/auto/subscriptions", [PROBE_CONTENT_TOPIC])
    marker = f"probe-{uuid.uuid4().hex}".encode()
    msg = {
        "payload": base64.b64encode(marker).decode(),
        "contentTopic": PROBE_CONTENT_TOPIC,
        "timestamp": time.time_ns(),
    }
    topic = urllib.parse.quote(PROBE_CONTENT_TOPIC, safe="")
    deadline = time.monotonic() + 5.0
    _http("POST", f"{src}/relay/v1/auto/messages", msg)
    while time.monotonic() < deadline:
        got = _http("GET", f"{dst}/relay/v1/auto/messages/{topic}")
        if isinstance(got, list):
            for m in got:
                if isinstance(m, dict) and base64.b64decode(m.get("payload", "")) == marker:
                    return
        time.sleep(0.2)
    raise NotReady(f"message published via {src} not seen at {dst}")


def http_ok(url: str) -> None:
    """A health endpoint answering ``{"status": "ok"}`` (NATS ``/healthz``)."""
    got = _http("GET", url)
    if not (isinstance(got, dict) and got.get("status") == "ok"):
        raise NotReady(f"{url} answered {got!r}")


def wait(check: Callable[[], object], timeout: float) -> None:
    """Retry ``check`` until it passes or ``timeout`` elapses; exit 1 with the last reason."""
    deadline = time.monotonic() + timeout
    last = "not tried"
    while True:
        try:
            check()
            return
        except (NotReady, struct.error) as exc:
            last = str(exc) or type(exc).__name__
        if time.monotonic() >= deadline:
            print(f"not ready after {timeout:.0f}s: {last}", file=sys.stderr)
            sys.exit(1)
        time.sleep(RETRY_INTERVAL_S)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="probe.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("free-port")
    sub.add_parser("kafka-id")
    k = sub.add_parser("kafka")
    k.add_argument("bootstrap")
    wm = sub.add_parser("waku-multiaddr")
    wm.add_argument("url")
    wp = sub.add_parser("waku-peers")
    wp.add_argument("url")
    wp.add_argument("--min", type=int, default=1)
    wr = sub.add_parser("waku-relay")
    wr.add_argument("src")
    wr.add_argument("dst")
    ho = sub.add_parser("http-ok")
    ho.add_argument("url")
    for sp in (k, wp, wr, ho):
        sp.add_argument("--timeout", type=float, default=float(os.environ.get("PROBE_TIMEOUT", 30)))
    a = p.parse_args(argv)
    if a.cmd == "free-port":
        print(free_port())
    elif a.cmd == "kafka-id":
        print(kafka_cluster_id())
    elif a.cmd == "kafka":
        wait(lambda: kafka_metadata(a.bootstrap, timeout=5.0), a.timeout)
    elif a.cmd == "waku-multiaddr":
        try:
            print(waku_multiaddr(a.url))
        except NotReady as exc:
            print(exc, file=sys.stderr)
            sys.exit(1)
    elif a.cmd == "waku-peers":
        wait(lambda: waku_peers(a.url, a.min), a.timeout)
    elif a.cmd == "waku-relay":
        wait(lambda: waku_relay(a.src, a.dst), a.timeout)
    elif a.cmd == "http-ok":
        wait(lambda: http_ok(a.url), a.timeout)


if __name__ == "__main__":
    main()
