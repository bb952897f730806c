"""The compose network (compose.yaml) end to end, on our dockerd with docker-compose v1:
every service healthy; client → sidecar → sentry → backend; publisher → relayer (Kafka)
→ subscriber; faults — a relayer crashed mid-stream comes back (restart policy) with
nothing acknowledged lost or duplicated, counted by the history checker
(:mod:`pqcnet.chaos`) on the publisher's history and the subscriber's journal, and by an
independent Kafka consumer reading the topic, and billed once (both relayers' metered
volume = the distinct frames taken); the governance pull (post-quantum, the
governance identity only) equals what Prometheus scraped; a rate-limit directive
published on the Waku control plane is applied by both sentries (429 through each);
a crashed sentry comes back and the sidecar's requests succeed again on their own;
Prometheus has scraped every node (all targets up); the runbook's ``compose`` blocks
run; and every Grafana panel's query runs against this Prometheus, with data where
traffic ran (dashboards/build.py; its QUIET panels may be empty).

The tests run in file order and share one network per module (a project of its own,
removed with its volumes after); the order matters: the directive test lowers the
``acme`` rate (sentries and relayer quotas) and restores it before the next test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pqcnet.chaos.checker import check
from pqcnet.chaos.history import HistoryWriter
from pqcnet.errors import PqcnetError
from pqcnet.identity import NodeIdentity
from pqcnet.relayer.client import PublisherClient, SubscriberClient
from pqcnet.relayer.cursor import JournalCursor, payload_digest
from pqcnet.relayer.frame import Frame, Topic
from tests.conftest import ROOT
from tests.docs.markdown import blocks
from tests.ports import free_port
from tests.procs import PQCNET

from .conftest import load_dashboards, require_tool

sys.path.insert(0, str(ROOT / "tools"))

import compose as compose_tool

dashboards = load_dashboards()

pytestmark = pytest.mark.timeout(1800)
TAG = "compose"
TD = "pqcnet.compose"


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[compose_tool.Compose]:
    require_tool("PQCNET_DOCKER_HOST", "dockerd")
    require_tool("PQCNET_COMPOSE", "docker-compose")
    require_tool("PQCNET_BASE_IMAGE", "local base image")
    reuse = os.environ.get("PQCNET_COMPOSE_TEST_PROJECT")
    if reuse:  # development only: a network already up (tools/compose.py up --project
        yield compose_tool.Compose(reuse, TAG)  # P --tag compose), left running after
        return
    # identities and CA state of this run only (not the checkout's build/: another
    # checkout or run must not share them); down() removes the directory
    c = compose_tool.Compose(f"pqcnet-test-{secrets.token_hex(3)}", TAG,
                             tmp_path_factory.mktemp("compose") / "secrets")
    try:
        # images built from other inputs than this checkout's (an older tree, a branch:
        # their ``pqcnet.inputs`` label differs) are rebuilt, current ones reused
        c.up(timeout=600)
    except BaseException:
        print(c.logs(), file=sys.stderr)
        c.down()
        raise
    try:
        yield c
    finally:
        c.down()


def _identity(net: compose_tool.Compose, name: str) -> NodeIdentity:
    return NodeIdentity.load(net.secrets_dir / name, None)


def test_secrets_are_this_runs_own(net: compose_tool.Compose) -> None:
    """The containers mount this run's secrets directory (the fixture's, outside the
    checkout), not a directory shared by runs: two runs or checkouts cannot swap
    identities or CA state."""
    if not os.environ.get("PQCNET_COMPOSE_TEST_PROJECT"):  # a reused network: P's own
        assert not net.secrets_dir.is_relative_to(ROOT), net.secrets_dir
    mounts = json.loads(net.docker("inspect", "--format", "{{json .Mounts}}",
                                   net.container("relayer-1")).stdout)
    sources = {m["Destination"]: m["Source"] for m in mounts}
    assert sources["/run/secrets/identity"] == str(net.secrets_dir / "relayer-1"), sources
    assert sources["/run/secrets/peers"] == str(net.secrets_dir / "peers"), sources


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
    services = {"redis", "kafka", "waku-1", "waku-2", "waku-3", "ca", "relayer-1",
                "relayer-2", "backend", "sentry-1", "sentry-2", "sidecar", "client",
                "prometheus"}
    assert {n.split("_", 1)[1].rsplit("_", 1)[0] for n in states} == services, states
    assert all(s == "healthy" or s == "running" for s in states.values()), states


NODES = ("relayer-1:9100", "relayer-2:9100", "sentry-1:9100", "sentry-2:9100")


def _live_peers_everywhere(port: int, limit: float) -> dict[str, float]:
    """Wait until Prometheus shows every node counting ≥ 1 live mesh peer."""
    seen: dict[str, float] = {}

    def every_node() -> bool:
        seen.clear()
        seen.update({r["metric"]["instance"]: float(r["value"][1])  # type: ignore[index]
                     for r in _prom(port, "pqcnet_mesh_live_peers")})
        return all(seen.get(n, 0) >= 1 for n in NODES)

    with contextlib.suppress(AssertionError):
        _eventually(every_node, limit, "every node has a live mesh peer")
    assert all(seen.get(n, 0) >= 1 for n in NODES), seen
    return dict(seen)


def test_every_node_counts_live_mesh_peers(net: compose_tool.Compose) -> None:
    """Each node hears the others' signed announcements on go-waku and counts them
    (pqcnet_mesh_live_peers, scraped by Prometheus): the nodes trust each other's mesh
    keys (control_plane.trust); without them every announcement is dropped as
    unknown_sender and the gauge stays 0 while governance directives still arrive."""
    port = net.port("prometheus", 9090)
    live = _live_peers_everywhere(port, 180)
    drops = {r["metric"]["instance"]: r["value"][1] for r in _prom(  # type: ignore[index]
        port, 'pqcnet_mesh_dropped_messages_total{reason="unknown_sender"}')}
    print(f"live mesh peers: {live}; unknown_sender drops: {drops}")
    # now that they hear each other, their DAG tips reach each other too: anchor-only
    # nodes (control_plane.dag_pull_from: []; each has its own genesis) pull nothing, so
    # no node refuses a foreign vertex and PqcnetLedgerVerifyErrors stays quiet
    time.sleep(12)  # several tips rounds (2 s) and scrapes (5 s)
    refused = _prom(port, "sum by (instance) (pqcnet_mesh_dag_refused_vertices_total)")
    assert all(float(r["value"][1]) == 0 for r in refused), refused  # type: ignore[index]
    firing = _prom(port, 'ALERTS{alertname="PqcnetLedgerVerifyErrors"}')
    assert firing == [], firing


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
                           lambda: net.port("relayer-2", 7400)], "acme",
                          _identity(net, "subscriber"))
        await asyncio.sleep(3)  # subscribed on both before the first frame
        pub = await PublisherClient.connect("127.0.0.1", net.port("relayer-1", 7400),
                                            _identity(net, "publisher"))
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


class _Publisher:
    """Resends unacknowledged frames after reconnecting; records every attempt
    (``publish``) and every acknowledgement (``ack``) in a chaos history file."""

    def __init__(self, port: Callable[[], int], topic: Topic, n: int,
                 history: HistoryWriter, identity: NodeIdentity) -> None:
        self.port, self.topic, self.n, self.history = port, topic, n, history
        self.identity = identity
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
                                                           self.identity)
                except (PqcnetError, OSError):
                    await asyncio.sleep(0.5)
                    continue
            frames = [Frame(*self.topic, s, bytes([s % 251]) * 32)
                      for s in range(self.acked + 1, min(self.acked + 10, self.n) + 1)]
            self.history.record("publish", frames)
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
                self.history.record("ack", [f])
                self.acked = max(self.acked, f.seq)
            await asyncio.sleep(0.1)  # a steady stream (≥ 8 s for 800 frames), not a burst
        if client is not None:
            await client.close()


class _Subscriber:
    """One application subscribed on every relayer (they split the shards), with one
    dedup state and one durable journal (:class:`JournalCursor`: what the application
    took, the chaos checker's subscriber history)."""

    def __init__(self, ports: list[Callable[[], int]], customer: str,
                 identity: NodeIdentity, journal: Path | None = None) -> None:
        self.customer, self.identity = customer, identity
        self.cursor = JournalCursor(journal) if journal is not None else None
        self.last: dict[Topic, int] = {}
        self.seen: dict[Topic, list[int]] = defaultdict(list)
        self.wire_duplicates = 0
        self.tasks = [asyncio.create_task(self._run(p)) for p in ports]

    async def _run(self, port: Callable[[], int]) -> None:
        while True:
            try:
                client = await SubscriberClient.connect("127.0.0.1", port(),
                                                        self.identity,
                                                        cursor=self.cursor)
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
        if self.cursor is not None:
            self.cursor.close()


def _kafka_log(net: compose_tool.Compose, topic: Topic) -> dict[int, list[str]]:
    """seq -> payload digests of ``topic`` as the Kafka log holds them, read by an
    independent consumer (tests/deploy/data/kafka_dump.py) in the relayer-2 container."""
    script = (ROOT / "tests" / "deploy" / "data" / "kafka_dump.py").read_text()
    out = net.compose("exec", "-T", "relayer-2", "python3", "-c", script, *topic, timeout=180)
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    return {int(k): v for k, v in doc["seen"].items()}


def test_relayer_crash_mid_stream_loses_and_duplicates_nothing(
        net: compose_tool.Compose, tmp_path: Path) -> None:
    n = 800
    topic = ("acme", f"fault-{secrets.token_hex(2)}")
    pub_history, journal = tmp_path / "publisher.jsonl", tmp_path / "subscriber.jsonl"

    async def go() -> tuple[_Publisher, _Subscriber]:
        sub = _Subscriber([lambda: net.port("relayer-1", 7400),
                           lambda: net.port("relayer-2", 7400)], "acme",
                          _identity(net, "subscriber"), journal)
        history = HistoryWriter(pub_history)
        pub = _Publisher(lambda: net.port("relayer-1", 7400), topic, n, history,
                         _identity(net, "publisher"))
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
        history.close()
        return pub, sub

    pub, sub = asyncio.run(go())
    assert pub.reconnects >= 1, "the publisher never saw the crash"
    got = sub.seen[topic]
    missing = sorted(set(range(1, n + 1)) - set(got))
    assert sorted(got) == list(range(1, n + 1)), (len(got), missing[:20])

    # the history checker: acked by the relayer vs taken by the application
    report = check([pub_history, journal]).topics[topic]
    assert (report.acked, report.taken) == (n, n), report
    assert (report.lost_acked, report.duplicated, report.out_of_order,
            report.phantom) == (0, 0, 0, 0), report

    # an independent consumer of the Kafka topic: every acked frame is in the durable
    # log with the payload the publisher sent; a frame is there at most as often as the
    # publisher sent it (a resend after the crash), never more
    log = _kafka_log(net, topic)
    sent: dict[int, int] = defaultdict(int)
    for line in pub_history.read_text().splitlines():
        row = json.loads(line)
        if row["op"] == "publish":
            sent[row["seq"]] += 1
    assert sorted(log) == list(range(1, n + 1)), sorted(set(range(1, n + 1)) - set(log))[:20]
    for seq, digests in log.items():
        assert set(digests) == {payload_digest(bytes([seq % 251]) * 32)}, seq
        assert len(digests) <= sent[seq], (seq, len(digests), sent[seq])
    # billing: what both relayers metered for the topic (their governance services)
    # against the distinct frames the application took
    metered = [0, 0]
    for relayer in ("relayer-1", "relayer-2"):
        res = _pull(net, relayer, "governance", "--customer", topic[0], "--channel", topic[1])
        assert res.returncode == 0, res.stderr
        doc = json.loads(res.stdout)
        metered[0] += doc["total_frames"]
        metered[1] += doc["total_bytes"]
    billed = check([pub_history, journal], {topic: (metered[0], metered[1])}).topics[topic]
    assert billed.misbilled == 0, (metered, billed)
    in_log_twice = sum(len(d) - 1 for d in log.values())
    print(f"relayer crash: {pub.reconnects} publisher reconnects, "
          f"{sub.wire_duplicates} wire duplicates dropped by the subscriber, "
          f"{in_log_twice} resent frames in the Kafka log twice; metered {metered}; "
          f"checker: {billed}")
    restarts = int(net.docker("inspect", "--format", "{{.RestartCount}}",
                              net.container("relayer-1")).stdout)
    assert restarts >= 1


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PQCNET, *args], capture_output=True, text=True, timeout=timeout)


def _pull(net: compose_tool.Compose, relayer: str, identity: str,
          *query: str) -> subprocess.CompletedProcess[str]:
    return _cli("governance", "pull", "--target", f"127.0.0.1:{net.port(relayer, 7402)}",
                "--identity", str(net.secrets_dir / identity),
                "--expect-peer", f"spiffe://{TD}/ops/relayer/{relayer}", *query)


def test_governance_pull_equals_prometheus(net: compose_tool.Compose) -> None:
    """Each relayer's volume as its governance service answers (QSTP, the governance
    identity) equals what Prometheus scraped from it — its metered settlement gauge
    and its delivered-volume counter. Nobody publishes now, so both are still."""
    port = net.port("prometheus", 9090)
    total = 0
    for relayer in ("relayer-1", "relayer-2"):
        inst = f'instance="{relayer}:9100"'

        def agree(relayer: str = relayer, inst: str = inst) -> bool:
            res = _pull(net, relayer, "governance")
            assert res.returncode == 0, res.stderr
            pulled = json.loads(res.stdout)["total_frames"]
            time.sleep(6)  # one more scrape (every 5 s) after the pull
            # a relayer that owned no traffic's shard has no series: 0
            metered = _prom(port, "sum(pqcnet_relayer_settlement_frames"
                                  f'{{{inst},state="metered"}}) or vector(0)')
            counted = _prom(port, f"sum(pqcnet_relayer_volume_frames_total{{{inst}}}) "
                                  "or vector(0)")
            values = {float(metered[0]["value"][1]), float(counted[0]["value"][1])}  # type: ignore[index]
            print(f"{relayer}: governance pull {pulled} frames, Prometheus {values}")
            agree.pulled = pulled  # type: ignore[attr-defined]
            return values == {float(pulled)}

        _eventually(agree, 90, f"{relayer}: governance pull == Prometheus")
        total += agree.pulled  # type: ignore[attr-defined]
    assert total > 0, "no volume metered: the traffic tests did not run first"


def test_governance_pull_refuses_other_identities(net: compose_tool.Compose) -> None:
    """governance_allowed_peers: a customer's publisher may not read the volume."""
    res = _pull(net, "relayer-1", "publisher")
    assert res.returncode != 0
    assert "refused" in res.stderr, res.stderr


#: what the client container runs: N JSON-RPC calls to its sidecar; prints the statuses
STATUSES = """
import json, sys, urllib.error, urllib.request
out = []
for _ in range(int(sys.argv[2])):
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": sys.argv[1], "params": [1]}).encode()
    req = urllib.request.Request(sys.argv[3] + "/rpc", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            out.append(r.status)
    except urllib.error.HTTPError as e:
        out.append(e.code)
print(json.dumps(out))
"""


def _statuses_via_sentry_1(net: compose_tool.Compose, n: int) -> list[int]:
    out = net.compose("exec", "-T", "client", "python3", "-c", STATUSES, "limit", str(n),
                      "http://127.0.0.1:8080", timeout=120)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def _statuses_via(url: str, n: int) -> list[int]:
    out = subprocess.run([sys.executable, "-c", STATUSES, "limit", str(n), url],
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def _directive(net: compose_tool.Compose, rate: float, burst: int) -> None:
    res = _cli("mesh", "directive", "--waku", f"http://127.0.0.1:{net.port('waku-3', 8645)}",
               "--namespace", "compose", "--key", str(net.secrets_dir / "gov" / "gov.pem"),
               "--rate", str(rate), "--burst", str(burst), "--scope", "acme")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["action"] == "rate_limit"


def _govern(net: compose_tool.Compose, rate: float, burst: int, took: Callable[[], bool],
            what: str) -> None:
    """Publish the directive until ``took()`` (Waku relay is best effort: a message
    published before every node's mesh grafted, or dropped, is simply sent again — each
    one is a new directive, anchored and applied once)."""
    for _attempt in range(5):
        _directive(net, rate, burst)
        with contextlib.suppress(AssertionError):
            _eventually(took, 30, what)
            return
    raise AssertionError(f"not after 5 directives: {what}")


@contextlib.contextmanager
def _host_sidecar(net: compose_tool.Compose, sentry: str) -> Iterator[str]:
    """A sidecar on the host in front of one sentry (its 7443 published on loopback)."""
    listen = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [PQCNET, "sidecar", "--sentry", f"127.0.0.1:{net.port(sentry, 7443)}",
         "--identity-dir", str(net.secrets_dir / "sidecar"),
         "--issuer-key", str(net.secrets_dir / "issuer" / "acme-issuer.key"),
         "--tenant", "acme", "--subject", "alice", "--listen", listen, "--no-passphrase",
         "--expect-peer", f"spiffe://{TD}/ops/sentry/{sentry}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _eventually(lambda: bool(socket.create_connection(tuple(listen.split(":")), 1)),  # type: ignore[arg-type]
                    60, "host sidecar listening")
        yield f"http://{listen}"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_rate_limit_directive_applied_by_both_sentries(net: compose_tool.Compose) -> None:
    """Governance publishes a rate limit for tenant acme on the Waku control plane; each
    sentry anchors it in its QS-DAG and applies it: 429 through sentry-1 (the compose
    sidecar) and through sentry-2 (a sidecar on the host). Restored afterwards."""
    port = net.port("prometheus", 9090)
    with _host_sidecar(net, "sentry-2") as via_2:
        _eventually(lambda: _statuses_via(via_2, 1) == [200], 90, "sentry-2 answers 200")
        assert _statuses_via_sentry_1(net, 1) == [200]
        limited: dict[str, list[int]] = {}

        def both_limited() -> bool:
            limited["sentry-1"] = _statuses_via_sentry_1(net, 6)
            limited["sentry-2"] = _statuses_via(via_2, 6)
            return all(s.count(429) >= 3 for s in limited.values())

        def both_lifted() -> bool:
            return (_statuses_via_sentry_1(net, 3) == [200] * 3
                    and _statuses_via(via_2, 3) == [200] * 3)

        try:
            _govern(net, 0.2, 2, both_limited, "429 via both sentries")
            # Prometheus scrapes every 5 s: the 429s can be seen before the counter is.
            applied: list[dict[str, object]] = []

            def counted_on_both() -> bool:
                applied[:] = _prom(port, 'sum by (instance) (pqcnet_mesh_directives_applied_'
                                         'total{action="rate_limit"})')
                return {r["metric"]["instance"] for r in applied} >= {  # type: ignore[index]
                    "sentry-1:9100", "sentry-2:9100"}

            with contextlib.suppress(AssertionError):
                _eventually(counted_on_both, 30, "directive counted on both sentries")
            assert counted_on_both(), applied
        finally:
            _govern(net, 10000, 10000, both_lifted, "limit lifted on both sentries")
    print(f"rate-limit directive: {limited}")


def test_sentry_crash_sidecar_recovers(net: compose_tool.Compose) -> None:
    assert _rpc(net, "before")["result"]["method"] == "before"  # type: ignore[index]
    _crash(net, "sentry-1")
    t0 = time.monotonic()
    _eventually(lambda: _rpc(net, "after")["result"]["method"] == "after",  # type: ignore[index]
                180, "sidecar requests succeed again after the sentry crash")
    recovered = time.monotonic() - t0
    assert recovered < 180
    print(f"sentry crash: requests succeed again after {recovered:.1f}s")


def test_prometheus_scraped_every_node(net: compose_tool.Compose) -> None:
    """Every target of every job is up (the crashed nodes came back)."""
    port = net.port("prometheus", 9090)
    targets = {"relayer-1:9100", "relayer-2:9100", "sentry-1:9100", "sentry-2:9100",
               "sidecar:9100", "ca:9100", "waku-1:8008", "waku-2:8008", "waku-3:8008"}

    def all_up() -> bool:
        url = f"http://127.0.0.1:{port}/api/v1/targets"
        with urllib.request.urlopen(url, timeout=5) as r:
            active = json.loads(r.read())["data"]["activeTargets"]
        health = {t["labels"]["instance"]: t["health"] for t in active}
        return set(health) == targets and set(health.values()) == {"up"}

    _eventually(all_up, 120, "every target up")
    _live_peers_everywhere(port, 120)  # the crashed nodes rejoined the mesh
    up = {r["metric"]["instance"]: r["value"][1] for r in _prom(port, "up")}  # type: ignore[index]
    assert up == dict.fromkeys(targets, "1"), up
    assert _prom(port, "pqcnet_relayer_subscribers"), "relayer metrics not scraped"
    assert _prom(port, 'pqcnet_sentry_requests_total{outcome="ok"}'), "sentry metrics"
    assert _prom(port, "pqcnet_ca_enrolled_nodes"), "CA metrics"
    # the sidecar's pool: its one sentry back in rotation (the crash test above took it
    # out; the next scrape after its return says so), and it answered requests
    _eventually(lambda: [r["value"][1] for r in  # type: ignore[index]
                         _prom(port, "pqcnet_sidecar_sentry_up")] == ["1"],
                60, "the sidecar's sentry up in Prometheus")
    assert _prom(port, "pqcnet_sidecar_sentry_responses_total > 0"), "sidecar metrics"


#: prints a directory's regular files as JSON {name: text} (no shell in the images)
DUMP_DIR = """
import json, os, sys
d = sys.argv[1]
print(json.dumps({n: open(os.path.join(d, n)).read() for n in sorted(os.listdir(d))
                  if os.path.isfile(os.path.join(d, n))}))
"""


def _token_in_client(net: compose_tool.Compose, path: str) -> None:
    """An operator's one-time token (publisher/*, made inside the `ca` container), copied
    to ``path`` in the client container."""
    net.compose("exec", "-T", "ca", "pqcnet", "ca", "token", "create", "--dir",
                "/var/lib/pqcnet/ca", "--pattern", f"spiffe://{TD}/acme/publisher/*",
                "--role", "publisher", "--ca-url", "https://ca:8443", "--out", path)
    token = net.compose("exec", "-T", "ca", "python3", "-c",
                        f"print(open({path!r}).read())").stdout
    net.compose("exec", "-T", "client", "python3", "-c",
                "import sys; open(sys.argv[1], 'w').write(sys.argv[2])", path, token)


def _enroll_in_client(net: compose_tool.Compose, token: str,
                      name: str) -> subprocess.CompletedProcess[str]:
    """`pqcnet node enroll` in the client container (key and identity in its tmpfs)."""
    return net.compose("exec", "-T", "client", "pqcnet", "node", "enroll",
                       "--token-file", token, "--spiffe-id",
                       f"spiffe://{TD}/acme/publisher/{name}", "--out", f"/tmp/{name}",
                       "--no-passphrase", check=False, timeout=120)


def _copy_from_client(net: compose_tool.Compose, name: str, dest: Path) -> NodeIdentity:
    files = json.loads(net.compose("exec", "-T", "client", "python3", "-c", DUMP_DIR,
                                   f"/tmp/{name}").stdout)
    dest.mkdir()
    for file, text in files.items():
        (dest / file).write_text(text)
    return NodeIdentity.load(dest, None)


async def _publish_as(net: compose_tool.Compose, relayer: str, identity: NodeIdentity,
                      n: int = 5) -> list[bool]:
    pub = await PublisherClient.connect("127.0.0.1", net.port(relayer, 7400), identity)
    try:
        topic = ("acme", f"enrolled-{secrets.token_hex(2)}")
        return [r.accepted for r in await pub.publish(
            [Frame(*topic, s, b"e" * 16) for s in range(1, n + 1)])]
    finally:
        await pub.close()


def test_ca_service_enrolls_a_node_once(net: compose_tool.Compose, tmp_path: Path) -> None:
    """The CA service of the network: an operator makes a one-time token inside the
    `ca` container; a new node (in the client container) enrolls with it over PQ TLS
    (https://ca:8443), and its fresh identity publishes through a relayer; the same
    token used again is refused (token_used) — and Prometheus counts both."""
    _token_in_client(net, "/tmp/token.json")
    first = _enroll_in_client(net, "/tmp/token.json", "enrolled-1")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["enrolled"] == f"spiffe://{TD}/acme/publisher/enrolled-1"
    # the enrolled identity (key written in the client's tmpfs) publishes via relayer-1
    ident = _copy_from_client(net, "enrolled-1", tmp_path / "enrolled-1")
    assert asyncio.run(_publish_as(net, "relayer-1", ident)) == [True] * 5
    again = _enroll_in_client(net, "/tmp/token.json", "enrolled-2")
    assert again.returncode != 0 and "token_used" in again.stdout + again.stderr, again
    port = net.port("prometheus", 9090)
    _eventually(lambda: float(_prom(port, "sum(pqcnet_ca_certificates_issued_total)")[0]
                              ["value"][1]) >= 1  # type: ignore[index]
                and float(_prom(port, "sum(pqcnet_ca_token_replays_total)")[0]
                          ["value"][1]) >= 1, 30, "CA metrics count the enrollment")  # type: ignore[index]


#: what a node in the client container runs: fetch the CRL from URL (argv 1) as the
#: rotation loop does, check its signature against the node's bundle (argv 2's), print
#: its number and revoked serials
FETCH_CRL = """
import asyncio, json, sys
from pqcnet.identity import NodeIdentity
from pqcnet.identity.crl import load_crl
from pqcnet.runtime.enroll import fetch_crl
node = NodeIdentity.load(sys.argv[2], None)
pem, _ = asyncio.run(fetch_crl(sys.argv[1], node.trust_bundle_pem,
                               node.spiffe_id.trust_domain))
crl = load_crl(pem, node.trust_bundle_pem)
print(json.dumps({"number": crl.number, "revoked": sorted(format(s, "x") for s in crl.revoked)}))
"""


def test_enrolled_node_fetches_the_advertised_crl_and_revocation_applies(
        net: compose_tool.Compose, tmp_path: Path) -> None:
    """The CRL URL the CA service hands an enrolling node (the enroll answer's
    config.crl_url) names the service (`ca`, its --advertise-host), not its bind
    address 0.0.0.0: the node, in another container, fetches and verifies the CRL
    from it. An operator revokes the node through the CA service (`pqcnet ca revoke
    --ca`, the admin identity, the CA's 8443 published on loopback);
    the node's next fetch lists its serial, and the relayers — which refresh the CRL
    from the same URL every 5 s into their read-only identity mounts — refuse its
    handshake, while an unrevoked publisher still gets through."""
    _token_in_client(net, "/tmp/token-crl.json")
    res = _enroll_in_client(net, "/tmp/token-crl.json", "enrolled-crl")
    assert res.returncode == 0, res.stderr
    url = json.loads(res.stdout)["config"]["crl_url"]
    assert url == "http://ca:8081/v1/crl", url
    ident = _copy_from_client(net, "enrolled-crl", tmp_path / "enrolled-crl")
    serial = format(ident.serial, "x")

    def fetched() -> dict[str, object]:
        out = net.compose("exec", "-T", "client", "python3", "-c", FETCH_CRL, url,
                          "/tmp/enrolled-crl", timeout=60)
        return json.loads(out.stdout)  # type: ignore[no-any-return]

    before = fetched()
    assert serial not in before["revoked"], before  # type: ignore[operator]
    assert asyncio.run(_publish_as(net, "relayer-1", ident)) == [True] * 5

    res = _cli("ca", "revoke", "--ca", f"https://127.0.0.1:{net.port('ca', 8443)}",
               "--identity", str(net.secrets_dir / "admin"), "--serial", serial,
               "--reason", "key_compromise")
    assert res.returncode == 0, res.stderr
    after = fetched()
    assert serial in after["revoked"], after  # type: ignore[operator]

    def refused(relayer: str) -> bool:
        try:
            asyncio.run(asyncio.wait_for(_publish_as(net, relayer, ident, 1), 30))
        except TimeoutError:
            return False  # no answer is not a refusal
        except (PqcnetError, OSError) as exc:
            print(f"{relayer}: {type(exc).__name__}: {exc}")
            return True
        return False

    for relayer in ("relayer-1", "relayer-2"):
        _eventually(lambda r=relayer: refused(r), 90, f"{relayer} refuses the revoked node")
    assert asyncio.run(_publish_as(net, "relayer-1", _identity(net, "publisher"), 1)) == [True]
    reloads = _prom(net.port("prometheus", 9090),
                    'sum by (instance) (pqcnet_identity_reloads_total{source="crl"})')
    print(f"revoked {serial}: CRL #{before['number']} -> #{after['number']}; "
          f"CRL reloads {[(r['metric'], r['value'][1]) for r in reloads]}")  # type: ignore[index]


def _runbook_pages() -> list[Path]:
    return [p for p in sorted((ROOT / "runbook").glob("*.md"))
            if any("compose" in b.flags for b in blocks(p))]


def test_the_runbook_has_compose_blocks() -> None:
    """The parametrised test below must not pass by having nothing to run."""
    pages = {p.name for p in _runbook_pages()}
    assert {"incident-response.md", "rolling-upgrade.md"} <= pages, pages


@pytest.mark.parametrize("page", _runbook_pages(), ids=lambda p: p.name)
def test_runbook_blocks(net: compose_tool.Compose, page: Path) -> None:
    """The page's ``compose`` blocks (runbook/README.md#runnable-blocks) in one bash
    session against this network; ``<!-- expect: -->`` lines must appear."""
    page_blocks = [b for b in blocks(page) if "compose" in b.flags]
    script = "set -eo pipefail\n" + "\n".join(b.text for b in page_blocks) + "\n"
    env = dict(net.env, COMPOSE_FILE=str(ROOT / "compose.yaml"),
               COMPOSE_PROJECT_NAME=net.project,
               PATH=os.pathsep.join([str(Path(PQCNET).parent),
                                     str(Path(net.compose_cli).parent),
                                     str(Path(net.docker_cli).parent),
                                     os.environ.get("PATH", "")]))
    res = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, (f"{page.name}: exit {res.returncode}\n"
                                 f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    for b in page_blocks:
        for text in b.expect:
            assert text in res.stdout, f"{b.where}: expected {text!r} in\n{res.stdout[-3000:]}"


def test_every_dashboard_query_runs(net: compose_tool.Compose) -> None:
    """Every panel query of every committed dashboard, as Grafana would send it (an
    instant query), returns without error; with data unless the panel is QUIET (it
    counts faults this run does not cause). Runs last: the traffic, the crash, the
    directive and the rate-limited requests above are what the panels show."""
    port = net.port("prometheus", 9090)
    time.sleep(6)  # the last scrape after the tests above
    empty, errors = [], []
    for uid in dashboards.DASHBOARDS:
        doc = json.loads((dashboards.OUT / f"{uid}.json").read_text())
        for title, expr in dashboards.queries(doc):
            try:
                result = _prom(port, expr)
            except (AssertionError, urllib.error.HTTPError) as exc:
                errors.append((uid, title, expr, str(exc)))
                continue
            if not result and title not in dashboards.QUIET:
                empty.append((uid, title, expr))
    assert not errors, errors
    assert not empty, f"panels without data after the traffic: {empty}"


def test_docker_kill_is_a_manual_stop(net: compose_tool.Compose) -> None:
    """Why the crash tests SIGKILL the main process from the host (``_crash``) instead
    of ``docker kill``: under ``restart: unless-stopped`` the daemon takes `docker kill`
    as a manual stop and leaves the container down (docs/operations/deployment.md);
    `docker-compose start` brings it back. Runs last: it stops the backend."""
    cid = net.container("backend")

    def state() -> tuple[str, int]:
        out = net.docker("inspect", "--format", "{{.State.Status}} {{.RestartCount}}",
                         cid).stdout.split()
        return out[0], int(out[1])

    _, restarts = state()
    net.docker("kill", cid)
    time.sleep(10)  # the policy restarts a crashed container within a second
    assert state() == ("exited", restarts), state()
    net.compose("start", "backend")
    _eventually(lambda: net.health()[f"{net.project}_backend_1"] == "healthy", 120,
                "backend healthy after docker-compose start")


def test_down_removes_what_compose_left(tmp_path: Path) -> None:
    """``Compose.down`` removes every container, network and volume labelled with its
    project even when ``docker-compose down`` does not (here it has nothing of its own
    to remove: the three were made with ``docker`` directly, as a compose run would
    have labelled them). Once the full compose test left its whole network running."""
    require_tool("PQCNET_DOCKER_HOST", "dockerd")
    require_tool("PQCNET_COMPOSE", "docker-compose")
    base = require_tool("PQCNET_BASE_IMAGE", "local base image")
    c = compose_tool.Compose(f"pqcnet-down-{secrets.token_hex(3)}", TAG, tmp_path / "s")
    label = f"com.docker.compose.project={c.project}"
    try:
        c.docker("network", "create", "--label", label, f"{c.project}_default")
        c.docker("volume", "create", "--label", label, f"{c.project}_data")
        c.docker("run", "-d", "--label", label, "--network", f"{c.project}_default",
                 "-v", f"{c.project}_data:/data", base, "sleep", "600")
        c.down()
        for kind in (("ps", "-aq"), ("network", "ls", "-q"), ("volume", "ls", "-q")):
            assert c.docker(*kind, "--filter", f"label={label}").stdout.split() == [], kind
    finally:
        c.down()
