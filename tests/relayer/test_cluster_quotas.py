"""``quota_scope: cluster``: a customer's quota bounds the whole relayer cluster, not
each relayer. The attacker here is a customer whose publishers spread over the
relayers to get its plan once per relayer; the faults are Redis going away and a
relayer started without a Redis to share."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from pqcnet.relayer.authz import Quotas, QuotasSpec
from pqcnet.relayer.client import PublisherClient
from pqcnet.relayer.cluster_quotas import CHUNK_S, FALLBACK_S, ClusterQuotas, chunk
from pqcnet.relayer.config import RelayerConfig
from pqcnet.relayer.errors import ConfigError, QuotaExceeded
from pqcnet.relayer.frame import Frame
from tests.relayer.e2e import TD, identities
from tests.relayer.helpers import offer_over_quota, redis_cli, scrape_metrics
from tests.relayer.proc import RelayerProcess, write_config

RATE, BURST = 50.0, 20.0
SPEC = QuotasSpec.model_validate({"customers": {"acme": {
    "frames_per_s": RATE, "frames_burst": BURST}}})


def _cluster(redis_url: str, prefix: str, n: int) -> list[ClusterQuotas]:
    return [ClusterQuotas(SPEC, aioredis.from_url(redis_url), prefix, timeout=2.0)
            for _ in range(n)]


async def _offer(q: Quotas, until: float, frames: int = 5) -> int:
    """One relayer's ingress under a publisher offering far more than the quota:
    requests of ``frames`` frames every 10 ms; returns the frames admitted."""
    ok = 0
    while time.monotonic() < until:
        await q.prepare({"acme": [frames, frames]})
        for _ in range(frames):
            try:
                q.take("acme", 1, 1, time.monotonic())
                ok += 1
            except QuotaExceeded as exc:  # retry when one more frame may be there
                assert exc.retriable and 0 < exc.retry_after <= max(CHUNK_S, 1 / RATE)
        await asyncio.sleep(0.01)
    return ok


async def test_two_relayers_admit_the_plan_once(redis_url: str) -> None:
    """Each of two relayers' ingress offers ~500 frames/s for 3 s: with cluster scope
    they admit the plan once between them (rate x time + burst, and at most two chunks
    and a request each on top); with host scope, measured in the same test, twice."""
    prefix = f"cq:{uuid.uuid4().hex[:8]}"
    cluster = _cluster(redis_url, prefix, 2)
    try:
        t0 = time.monotonic()
        got = await asyncio.gather(*(_offer(q, t0 + 3.0) for q in cluster))
        elapsed = time.monotonic() - t0
        host = [Quotas(SPEC), Quotas(SPEC)]
        t1 = time.monotonic()
        host_got = await asyncio.gather(*(_offer(q, t1 + 3.0) for q in host))
        host_elapsed = time.monotonic() - t1
    finally:
        for q in cluster:
            await q.aclose()
    allowed = RATE * elapsed + BURST
    slack = 2 * (2 * chunk(RATE, BURST) + 5)  # each may hold two chunks and a request
    assert 0.85 * allowed <= sum(got) <= allowed + slack, (got, allowed)
    assert all(g > 0 for g in got), got  # both relayers admitted some
    assert sum(host_got) >= 1.7 * (RATE * host_elapsed + BURST), host_got  # the old way
    assert sum(q.refused for q in cluster) > 0
    assert all(q.calls["error"] == 0 and q.calls["ok"] > 0 for q in cluster)
    # the shared bucket, read with redis-cli
    fields = redis_cli(redis_url, "HGETALL", f"{prefix}:quota:frames:acme")
    assert '"tokens"' in fields and '"at"' in fields, fields
    ttl = int(redis_cli(redis_url, "PTTL", f"{prefix}:quota:frames:acme").split()[-1])
    assert 0 < ttl <= (BURST / RATE + 60) * 1000


async def test_a_request_its_local_tokens_cover_does_not_wait_for_redis(
        redis_url: str) -> None:
    """Running low starts a draw in the background; a request the local tokens still
    cover goes on meanwhile (the draw is not in its path). Redis is made to hold every
    write for 5 s (CLIENT PAUSE): the draw waits that long, the request does not."""
    (q,) = _cluster(redis_url, f"cq:{uuid.uuid4().hex[:8]}", 1)
    c = chunk(RATE, BURST)
    try:
        await q.prepare({"acme": [1, 1]})  # nothing local: this one waits for its draw
        drawn = q._pools["acme"].tokens[0]
        assert drawn == 1 + 2 * c and q.calls["ok"] == 1
        while q._pools["acme"].tokens[0] - 1 >= c:  # spend down to where a draw starts
            q.take("acme", 1, 1, time.monotonic())
        redis_cli(redis_url, "CLIENT", "PAUSE", "5000", "WRITE")
        try:
            await asyncio.wait_for(q.prepare({"acme": [1, 1]}), 2.0)
            assert q._drawing is not None  # still in flight, held by Redis
            q.take("acme", 1, 1, time.monotonic())  # served from the local tokens
        finally:
            redis_cli(redis_url, "CLIENT", "UNPAUSE")
        await asyncio.wait_for(asyncio.shield(q._drawing), 10.0)
        assert q.calls["ok"] == 2 and q._pools["acme"].tokens[0] > c
    finally:
        await q.aclose()


async def test_a_customer_without_a_quota_never_reaches_redis(redis_url: str) -> None:
    prefix = f"cq:{uuid.uuid4().hex[:8]}"
    (q,) = _cluster(redis_url, prefix, 1)
    try:
        await q.prepare({"other": [1000, 10**6]})
        for _ in range(1000):
            q.take("other", 1, 1000, time.monotonic())
        assert q.calls == {"ok": 0, "error": 0}
    finally:
        await q.aclose()
    assert redis_cli(redis_url, "KEYS", f"{prefix}:*").strip() in ("", "(empty array)")


async def test_bytes_quota_is_shared_too(redis_url: str) -> None:
    spec = QuotasSpec.model_validate({"customers": {"acme": {
        "bytes_per_s": 1000, "bytes_burst": 1000}}})
    prefix = f"cq:{uuid.uuid4().hex[:8]}"
    a, b = (ClusterQuotas(spec, aioredis.from_url(redis_url), prefix, timeout=2.0)
            for _ in range(2))
    try:
        admitted = 0
        for q in (a, b, a, b):
            await q.prepare({"acme": [1, 400]})
            try:
                q.take("acme", 1, 400, time.monotonic())
                admitted += 400
            except QuotaExceeded as exc:
                assert "bytes/s" in str(exc)
        assert admitted <= 1000 + 2 * 1  # the burst, once (a few ms of refill at most)
        assert admitted >= 800
    finally:
        await a.aclose()
        await b.aclose()


async def test_a_governance_rate_limit_reaches_the_shared_bucket(redis_url: str) -> None:
    """A rate-limit directive (acme: 2 frames/s) applied on both relayers: the frames
    they admit together after it are what 2/s allows plus what each held unspent."""
    a, b = _cluster(redis_url, f"cq:{uuid.uuid4().hex[:8]}", 2)
    try:
        for q in (a, b):  # both have drawn at the old rate
            await q.prepare({"acme": [1, 1]})
            q.take("acme", 1, 1, time.monotonic())
        held = sum(q._pools["acme"].tokens[0] for q in (a, b))
        for q in (a, b):
            q.apply_rate_limit("acme", 2.0, 2.0, time.monotonic())
        t0, admitted, refusals = time.monotonic(), 0, []
        while time.monotonic() - t0 < 1.5:
            for q in (a, b):
                await q.prepare({"acme": [1, 1]})
                try:
                    q.take("acme", 1, 1, time.monotonic())
                    admitted += 1
                except QuotaExceeded as exc:
                    refusals.append(str(exc))
            await asyncio.sleep(0.01)
        # the shared bucket had up to the old burst; it is clamped to 2 at its next draw
        assert admitted <= held + 2 + 2 * (time.monotonic() - t0) + 1, (admitted, held)
        assert refusals and all("cluster quota of 2 frames/s" in r for r in refusals)
    finally:
        await a.aclose()
        await b.aclose()


async def test_redis_gone_falls_back_to_host_buckets_then_tries_again() -> None:
    """Redis unreachable: ingress goes on with host buckets at the full plan (never
    stopped by the outage), counted and flagged, and Redis is tried again after
    FALLBACK_S — here with a clock of the test's own."""
    now = [1000.0]
    q = ClusterQuotas(SPEC, aioredis.from_url("redis://127.0.0.1:1/0",
                                              socket_connect_timeout=0.5),
                      "cq:gone", timeout=1.0, clock=lambda: now[0])
    try:
        await q.prepare({"acme": [5, 5]})
        assert q.calls == {"ok": 0, "error": 1} and q.in_fallback
        admitted = 0
        for _ in range(int(BURST) + 5):
            try:
                q.take("acme", 1, 1, now[0])
                admitted += 1
            except QuotaExceeded:
                pass
        assert admitted == BURST  # the host bucket: its burst at once, no more
        assert q.refused == 5
        await q.prepare({"acme": [5, 5]})  # still in fallback: Redis not asked again
        assert q.calls["error"] == 1
        now[0] += FALLBACK_S + 0.1
        assert not q.in_fallback
        await q.prepare({"acme": [5, 5]})
        assert q.calls["error"] == 2 and q.in_fallback
    finally:
        await q.aclose()


def test_cluster_scope_needs_a_redis_to_share(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="quota_scope: cluster keeps the quotas in the "
                                          "cluster's Redis; set redis_url"):
        RelayerConfig.from_mapping({
            "node_id": "r", "data_dir": str(tmp_path), "quota_scope": "cluster"})


@pytest.mark.parametrize("backend", ["redis", "kafka"])
async def test_a_customer_spread_over_two_relayer_processes_gets_its_plan_once(
        tmp_path: Path, redis_url: str, request: pytest.FixtureRequest,
        backend: str) -> None:
    """Two ``pqcnet relayer run`` processes of one cluster — on Redis Streams, or on
    Kafka with the cluster's Redis for marks and quotas — cluster scope; acme's
    publishers, one on each, offer far more than 50 frames/s for 3 s. What the
    publishers saw accepted is the plan once; each relayer's /metrics counts the
    refusals its publisher saw, and its draws from Redis."""
    tag = uuid.uuid4().hex[:8]
    prefix = f"cqp:{tag}"
    bus: dict[str, object] = {"backend": "redis", "redis_lease": 1.5}
    if backend == "kafka":
        bus = {"backend": "kafka",
               "kafka_bootstrap": request.getfixturevalue("kafka_bootstrap"),
               "kafka_topic": f"pqcnet-quota-{tag}", "kafka_static_membership": True}
    procs = []
    for k in range(2):
        d = tmp_path / f"r{k}"
        d.mkdir()
        config = write_config(d, redis_url=redis_url, redis_prefix=prefix, **bus,
                              node_id=f"cq{k}", group=f"cq-{tag}", metrics_port=0,
                              quota_scope="cluster",
                              quotas={"customers": {"acme": {"frames_per_s": RATE,
                                                             "frames_burst": BURST}}})
        procs.append(RelayerProcess(config))
    try:
        for p in procs:
            await p.start()
            assert p.ready["backend"] == backend
        counts = [{"ok": 0, "quota": 0}, {"ok": 0, "quota": 0}]

        async def offer(k: int, until: float) -> None:
            pub = await PublisherClient.connect("127.0.0.1", procs[k].port, identities()[1])
            try:
                await offer_over_quota(pub, f"c{k}", until, counts[k])
            finally:
                await pub.close()

        t0 = time.monotonic()
        await asyncio.gather(offer(0, t0 + 3.0), offer(1, t0 + 3.0))
        allowed = RATE * (time.monotonic() - t0) + BURST
        total = counts[0]["ok"] + counts[1]["ok"]
        assert 0.85 * allowed <= total <= allowed + 2 * (2 * chunk(RATE, BURST) + 10), (
            total, allowed, counts)
        assert all(c["ok"] and c["quota"] for c in counts), counts
        for k, p in enumerate(procs):
            seen = await asyncio.to_thread(scrape_metrics, p.ready["metrics_port"])
            assert seen["pqcnet_relayer_quota_refused_frames_total"] == counts[k]["quota"]
            assert seen['pqcnet_relayer_quota_cluster_calls_total{outcome="ok"}'] > 0
            assert seen['pqcnet_relayer_quota_cluster_calls_total{outcome="error"}'] == 0
            assert seen["pqcnet_relayer_quota_cluster_fallback"] == 0
    finally:
        for p in procs:
            await p.stop()


async def test_a_publisher_without_the_grant_cannot_drain_a_customers_cluster_quota(
        tmp_path: Path, redis_url: str) -> None:
    """The attacker: a publisher not granted customer acme floods frames as acme. Each
    is refused NotAuthorized (16) — and none of them draws from acme's shared bucket
    (before, every frame of a request counted in the draw: such a flood pulled acme's
    tokens into this relayer, starving acme's publishers on the others). Read from
    outside: redis-cli finds no bucket, the relayer's /metrics no draw. Then acme's own
    publisher gets its burst, drawn from the untouched bucket."""
    prefix = f"cqa:{uuid.uuid4().hex[:8]}"
    acme_only = {"own_tenant": [], "customers": {"acme": [{
        "from": [f"spiffe://{TD}/acme/subscriber/*"], "methods": ["publish"]}]}}
    config = write_config(tmp_path, backend="redis", redis_url=redis_url, redis_prefix=prefix,
                          node_id="cqa", group="cqa", metrics_port=0, quota_scope="cluster",
                          authz=acme_only,
                          quotas={"customers": {"acme": {"frames_per_s": RATE,
                                                         "frames_burst": BURST}}})
    relayer = await RelayerProcess(config).start()
    try:
        # acme/publisher/p1: a tenant's publisher, but only acme/subscriber/* may publish
        mallory = await PublisherClient.connect("127.0.0.1", relayer.port, identities()[1])
        try:
            for k in range(20):
                results = await mallory.publish(
                    [Frame("acme", "orders", 50 * k + i + 1, b"m") for i in range(50)])
                assert {r.code for r in results} == {16}, results[:2]
        finally:
            await mallory.close()
        key = f"{prefix}:quota:frames:acme"
        assert redis_cli(redis_url, "EXISTS", key).split()[-1] == "0"
        seen = await asyncio.to_thread(scrape_metrics, relayer.ready["metrics_port"])
        assert seen.get('pqcnet_relayer_quota_cluster_calls_total{outcome="ok"}', 0) == 0
        assert seen['pqcnet_relayer_authz_refusals_total{op="publish"}'] == 1000
        owner = await PublisherClient.connect("127.0.0.1", relayer.port, identities()[2])
        try:
            results = await owner.publish(
                [Frame("acme", "orders", i + 1, b"a") for i in range(int(BURST) + 10)])
        finally:
            await owner.close()
        assert sum(r.accepted for r in results) == BURST, [r.code for r in results]
        assert {r.code for r in results if not r.accepted} == {33}
        assert redis_cli(redis_url, "EXISTS", key).split()[-1] == "1"
    finally:
        await relayer.stop()


async def test_a_relayer_killed_holding_drawn_tokens_leaves_the_plan_to_the_others(
        tmp_path: Path, redis_url: str) -> None:
    """Two relayers of one cluster, a publisher on each far over acme's plan; relayer 0
    is SIGKILLed mid-stream, holding tokens it drew and never spent. Seen from the
    publishers: the cluster never admitted more than the plan (the dead relayer's
    tokens are lost, not re-granted), and after the kill the surviving relayer gets
    the plan's rate by itself — its /metrics counting what its publisher saw."""
    prefix = f"cqk:{uuid.uuid4().hex[:8]}"
    procs = []
    for k in range(2):
        d = tmp_path / f"r{k}"
        d.mkdir()
        procs.append(RelayerProcess(write_config(
            d, backend="redis", redis_url=redis_url, redis_prefix=prefix, node_id=f"cqk{k}",
            group="cqk", redis_lease=1.5, metrics_port=0, quota_scope="cluster",
            quotas={"customers": {"acme": {"frames_per_s": RATE, "frames_burst": BURST}}})))
    try:
        for p in procs:
            await p.start()
        counts = [{"ok": 0, "quota": 0}, {"ok": 0, "quota": 0}]
        pubs = [await PublisherClient.connect("127.0.0.1", p.port, identities()[1])
                for p in procs]

        async def doomed(until: float) -> None:
            with contextlib.suppress(Exception):  # its relayer dies under it
                await offer_over_quota(pubs[0], "c0", until, counts[0])

        t0 = time.monotonic()
        first = asyncio.gather(doomed(t0 + 4.0), offer_over_quota(pubs[1], "c1", t0 + 4.0,
                                                                   counts[1]))
        await asyncio.sleep(1.5)
        procs[0].kill()
        killed_at, survivor_before = time.monotonic(), counts[1]["ok"]
        await first
        end = time.monotonic()
        total = counts[0]["ok"] + counts[1]["ok"]
        allowed = RATE * (end - t0) + BURST
        assert total <= allowed + 2 * (2 * chunk(RATE, BURST) + 10), (total, allowed, counts)
        after = counts[1]["ok"] - survivor_before
        assert after >= 0.7 * RATE * (end - killed_at), (after, end - killed_at, counts)
        seen = await asyncio.to_thread(scrape_metrics, procs[1].ready["metrics_port"])
        assert seen["pqcnet_relayer_quota_refused_frames_total"] == counts[1]["quota"]
        assert seen['pqcnet_relayer_quota_cluster_calls_total{outcome="error"}'] == 0
        await pubs[1].close()
    finally:
        for p in procs:
            await p.stop()


def _bucket(redis_url: str, key: str) -> float:
    """A shared bucket's tokens as Redis holds them (``redis-cli``, not pqcnet)."""
    return float(redis_cli(redis_url, "HGET", key, "tokens").split('"')[1])


async def test_a_stopping_relayer_gives_its_unspent_tokens_back_up_to_the_burst(
        redis_url: str) -> None:
    """Before, tokens a relayer drew and did not spend were lost when it stopped (a
    drained or scaled-in relayer took up to two chunks of the plan with it). Now a
    stop gives the whole ones back — never past the burst, whatever it holds. The
    refill is made negligible (0.001 frames/s) so the bucket reads exactly."""
    spec = QuotasSpec.model_validate({"customers": {"acme": {
        "frames_per_s": 0.001, "frames_burst": 100}}})
    prefix = f"cqr:{uuid.uuid4().hex[:8]}"
    key = f"{prefix}:quota:frames:acme"
    a, b = (ClusterQuotas(spec, aioredis.from_url(redis_url), prefix, timeout=2.0)
            for _ in range(2))
    await a.prepare({"acme": [10, 10]})  # draws 10 + 2 chunks of 1
    for _ in range(10):
        a.take("acme", 1, 1, time.monotonic())
    assert int(_bucket(redis_url, key)) == 88
    await a.aclose()
    assert int(_bucket(redis_url, key)) == 90 and a.returned == pytest.approx(2, abs=0.01)
    assert a.calls == {"ok": 2, "error": 0}
    # b holds 12 while the bucket refills to 95 (made so here): giving all 12 back
    # would make 107 > the burst
    await b.prepare({"acme": [10, 10]})
    assert int(_bucket(redis_url, key)) == 78
    redis_cli(redis_url, "HSET", key, "tokens", "95")
    await b.aclose()
    assert int(_bucket(redis_url, key)) == 100 and b.returned == pytest.approx(5, abs=0.01)


async def test_a_relayer_stopped_by_sigterm_gives_back_what_it_drew_one_killed_does_not(
        tmp_path: Path, redis_url: str) -> None:
    """Seen from outside: acme's bucket as ``redis-cli`` reads it while a relayer
    process holds two drawn, unspent tokens, and after that process ends — SIGTERM
    (its stop gives them back) or SIGKILL (nothing runs: they are lost, never
    re-granted)."""
    prefix = f"cqs:{uuid.uuid4().hex[:8]}"
    key = f"{prefix}:quota:frames:acme"
    ends = []
    for how in ("SIGTERM", "SIGKILL"):
        d = tmp_path / how
        d.mkdir()
        relayer = await RelayerProcess(write_config(
            d, backend="redis", redis_url=redis_url, redis_prefix=prefix,
            node_id=f"cqs-{how.lower()}", group=f"cqs-{how.lower()}", metrics_port=0,
            quota_scope="cluster",
            quotas={"customers": {"acme": {"frames_per_s": 0.001,
                                           "frames_burst": 100}}})).start()
        try:
            pub = await PublisherClient.connect("127.0.0.1", relayer.port, identities()[1])
            try:
                results = await pub.publish([Frame("acme", how, i + 1, b"x")
                                             for i in range(10)])
                assert all(r.accepted for r in results), results
            finally:
                await pub.close()
            held = int(_bucket(redis_url, key))
            if how == "SIGKILL":
                relayer.kill()
        finally:
            await relayer.stop()
        ends.append((held, int(_bucket(redis_url, key))))
    assert ends == [(88, 90), (78, 78)]
