"""The compose network (compose.yaml) end to end, on our dockerd with docker-compose v1:
every service healthy; client → sidecar → sentry → backend; publisher → relayer (Kafka)
→ subscriber; Prometheus has scraped every node; and faults — a relayer crashed
mid-stream comes back (restart policy) with nothing acknowledged lost or duplicated as
seen by an independent subscriber on the other relayer; a crashed sentry comes back
and the sidecar's requests succeed again on their own.

One network per module (a project name of its own, removed with its volumes after).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
import time
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator

import pytest

from pqcnet.errors import PqcnetError
from pqcnet.identity import NodeIdentity
from pqcnet.relayer.client import PublisherClient, SubscriberClient
from pqcnet.relayer.frame import Frame, Topic
from tests.conftest import ROOT

from .conftest import require_tool

sys.path.insert(0, str(ROOT / "tools"))
import compose as compose_tool

pytestmark = pytest.mark.timeout(1800)
TAG = "compose"


@pytest.fixture(scope="module")
def net() -> Iterator[compose_tool.Compose]:
    require_tool("PQCNET_DOCKER_HOST", "dockerd")
    require_tool("PQCNET_COMPOSE", "docker-compose")
    require_tool("PQCNET_BASE_IMAGE", "local base image")
    c = compose_tool.Compose(f"pqcnet-test-{secrets.token_hex(3)}", TAG)
    try:
        c.up(timeout=600)
    except BaseException:
        print(c.logs(), file=sys.stderr)
        c.down()
        raise
    try:
        yield c
    finally:
        c.down()


def _identity(name: str) -> NodeIdentity:
    return NodeIdentity.load(compose_tool.SECRETS / name, None)


#: what the client container runs: a plain HTTP JSON-RPC call to its sidecar
CLIENT = """
import json, sys, urllib.request
body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": sys.argv[1], "params": [1]}).encode()
req = urllib.request.Request("http://127.0.0.1:8080/rpc", data=body,
                             headers={"Content-Type": "application/json"})
print(urllib.request.urlopen(req, timeout=20).read().decode())
"""


def _rpc(net: compose_tool.Compose, method: str) -> dict[str, object]:
    """One request from the client container through its sidecar."""
    out = net.compose("exec", "-T", "client", "python3", "-c", CLIENT, method, timeout=60)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def _prom(port: int, query: str) -> list[dict[str, object]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=5) as r:
        doc = json.loads(r.read())
    assert doc["status"] == "success", doc
    return doc["data"]["result"]  # type: ignore[no-any-return]


def _eventually(check: Callable[[], bool], limit: float, what: str) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(1)
    raise AssertionError(f"not within {limit:.0f}s: {what}")


def _crash(net: compose_tool.Compose, service: str) -> None:
    """SIGKILL the service's main process from the host: a crash, so the restart
    policy applies (``docker kill`` counts as a manual stop for the daemon)."""
    cid = net.container(service)
    pid = int(net.docker("inspect", "--format", "{{.State.Pid}}", cid).stdout)
    os.kill(pid, signal.SIGKILL)


def test_every_service_is_healthy(net: compose_tool.Compose) -> None:
    states = net.health()
    services = {"redis", "kafka", "waku-1", "waku-2", "waku-3", "relayer-1", "relayer-2",
                "backend", "sentry-1", "sentry-2", "sidecar", "client", "prometheus"}
    assert {n.split("_", 1)[1].rsplit("_", 1)[0] for n in states} == services, states
    assert all(s == "healthy" or s == "running" for s in states.values()), states


def test_client_sidecar_sentry_backend(net: compose_tool.Compose) -> None:
    # The first request opens the sidecar's tunnel (a PQ handshake on a busy machine).
    _eventually(lambda: bool(_rpc(net, "warm-up")), 90, "a first request succeeds")
    res = _rpc(net, "eth_blockNumber")
    assert res["result"]["method"] == "eth_blockNumber", res  # type: ignore[index]
    assert res["result"]["served_by"], res  # type: ignore[index]


def test_publisher_relayer_kafka_subscriber(net: compose_tool.Compose) -> None:
    """Publish through relayer-1; the relayers split the shards among themselves over
    Kafka (kafka_rebalance), so the subscriber (one application: one dedup state)
    listens on both."""
    topic = ("acme", f"e2e-{secrets.token_hex(2)}")

    async def go() -> list[int]:
        sub = _Subscriber([lambda: net.port("relayer-1", 7400),
                           lambda: net.port("relayer-2", 7400)], "acme")
        await asyncio.sleep(3)  # subscribed on both before the first frame
        pub = await PublisherClient.connect("127.0.0.1", net.port("relayer-1", 7400),
                                            _identity("publisher"))
        results = await pub.publish([Frame(*topic, s, b"x" * 32) for s in range(1, 51)])
        await pub.close()
        assert all(r.accepted for r in results), results
        for _ in range(240):
            if len(sub.seen[topic]) >= 50:
                break
            await asyncio.sleep(0.5)
        await sub.close()
        return sub.seen[topic]

    assert asyncio.run(go()) == list(range(1, 51))


def test_prometheus_scraped_every_node(net: compose_tool.Compose) -> None:
    port = net.port("prometheus", 9090)
    targets = {"relayer-1:9100", "relayer-2:9100", "sentry-1:9100", "sentry-2:9100"}

    def all_up() -> bool:
        up = {r["metric"]["instance"]: r["value"][1]  # type: ignore[index]
              for r in _prom(port, "up")}
        return set(up) == targets and set(up.values()) == {"1"}

    _eventually(all_up, 60, "every node scraped and up")
    assert _prom(port, "pqcnet_relayer_subscribers"), "relayer metrics not scraped"
    assert _prom(port, 'pqcnet_sentry_requests_total{outcome="ok"}'), "sentry metrics"


class _Publisher:
    """Resends unacknowledged frames after reconnecting; records what was acked."""

    def __init__(self, port: Callable[[], int], topic: Topic, n: int) -> None:
        self.port, self.topic, self.n = port, topic, n
        self.acked = 0
        self.reconnects = 0
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        client: PublisherClient | None = None
        retry = False
        while self.acked < self.n:
            if client is None:
                try:
                    client = await PublisherClient.connect("127.0.0.1", self.port(),
                                                           _identity("publisher"))
                except (PqcnetError, OSError):
                    await asyncio.sleep(0.5)
                    continue
            frames = [Frame(*self.topic, s, bytes([s % 251]) * 32)
                      for s in range(self.acked + 1, min(self.acked + 10, self.n) + 1)]
            try:
                async with asyncio.timeout(30):
                    results = await client.publish(frames, retry=retry)
            except (PqcnetError, TimeoutError, OSError):
                with contextlib.suppress(PqcnetError, OSError):
                    await client.close()
                client, retry = None, True
                self.reconnects += 1
                await asyncio.sleep(0.5)
                continue
            retry = False
            for f, r in zip(frames, results):
                if not r.accepted:
                    retry = True
                    break
                self.acked = max(self.acked, f.seq)
            await asyncio.sleep(0.1)  # a steady stream (≥ 8 s for 800 frames), not a burst
        if client is not None:
            await client.close()


class _Subscriber:
    """An independent consumer: one application subscribed on every relayer (they
    split the shards), with one dedup state; keeps everything it was given."""

    def __init__(self, ports: list[Callable[[], int]], customer: str) -> None:
        self.customer = customer
        self.last: dict[Topic, int] = {}
        self.seen: dict[Topic, list[int]] = defaultdict(list)
        self.wire_duplicates = 0
        self.tasks = [asyncio.create_task(self._run(p)) for p in ports]

    async def _run(self, port: Callable[[], int]) -> None:
        while True:
            try:
                client = await SubscriberClient.connect("127.0.0.1", port(),
                                                        _identity("subscriber"))
            except (PqcnetError, OSError):
                await asyncio.sleep(0.5)
                continue
            client.last = self.last
            try:
                await client.subscribe(self.customer)
                async for batch in client.batches():
                    for f in batch:
                        self.seen[f.topic].append(f.seq)
            except (PqcnetError, OSError):
                pass
            finally:
                self.wire_duplicates += client.duplicates_dropped
                await client.close()
            await asyncio.sleep(0.5)

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def test_relayer_crash_mid_stream_loses_and_duplicates_nothing(
        net: compose_tool.Compose) -> None:
    n = 800
    topic = ("acme", f"fault-{secrets.token_hex(2)}")

    async def go() -> tuple[_Publisher, _Subscriber]:
        sub = _Subscriber([lambda: net.port("relayer-1", 7400),
                           lambda: net.port("relayer-2", 7400)], "acme")
        pub = _Publisher(lambda: net.port("relayer-1", 7400), topic, n)
        for _ in range(300):  # up to 60 s for a fifth of the stream
            if pub.acked >= n // 5:
                break
            await asyncio.sleep(0.2)
        assert 0 < pub.acked < n, pub.acked
        await asyncio.to_thread(_crash, net, "relayer-1")
        async with asyncio.timeout(240):
            await pub.task
            for _ in range(480):
                if len(sub.seen[topic]) >= n:
                    break
                await asyncio.sleep(0.5)
        await asyncio.sleep(3)  # anything late (a duplicate) would arrive now
        await sub.close()
        return pub, sub

    pub, sub = asyncio.run(go())
    assert pub.reconnects >= 1, "the publisher never saw the crash"
    got = sub.seen[topic]
    missing = sorted(set(range(1, n + 1)) - set(got))
    assert sorted(got) == list(range(1, n + 1)), (len(got), missing[:20])
    print(f"relayer crash: {pub.reconnects} publisher reconnects, "
          f"{sub.wire_duplicates} wire duplicates dropped by the subscriber")
    restarts = int(net.docker("inspect", "--format", "{{.RestartCount}}",
                              net.container("relayer-1")).stdout)
    assert restarts >= 1


def test_sentry_crash_sidecar_recovers(net: compose_tool.Compose) -> None:
    assert _rpc(net, "before")["result"]["method"] == "before"  # type: ignore[index]
    _crash(net, "sentry-1")
    t0 = time.monotonic()
    _eventually(lambda: _rpc(net, "after")["result"]["method"] == "after",  # type: ignore[index]
                180, "sidecar requests succeed again after the sentry crash")
    recovered = time.monotonic() - t0
    assert recovered < 180
    print(f"sentry crash: requests succeed again after {recovered:.1f}s")
