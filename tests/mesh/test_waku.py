"""The control plane over real go-waku nodes (``scripts/services start``).

Each test uses its own content-topic namespace so runs sharing the nodes cannot
steal each other's messages.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import uuid
from pathlib import Path

import pytest

from pqcnet.mesh.directives import Directive, RateLimitUpdate, sign_directive
from pqcnet.mesh.envelope import MessageType
from pqcnet.mesh.errors import WakuError, WakuUnavailable
from pqcnet.mesh.messages import GossipItem
from pqcnet.mesh.transport import content_topic
from pqcnet.mesh.waku import WakuClientConfig, WakuRestClient, WakuTransport

from .dag_scenarios import converge_and_slash
from .dtn_scenarios import offline_peer_gets_bundles_on_return
from .harness import (
    FAST,
    GOV,
    Recorder,
    attach_ledgers,
    bootstrap_ledgers,
    make_agents,
    stop_all,
    until,
)

pytestmark = [pytest.mark.services, pytest.mark.timeout(120)]


def _ns() -> str:
    return "t" + uuid.uuid4().hex[:10]


def _transport(urls: list[str], i: int) -> WakuTransport:
    return WakuTransport.connect(urls[i % len(urls)], timeout_s=3.0, retries=2,
                                 poll_interval_s=0.03)


def _transports(urls: list[str], n: int) -> list[WakuTransport]:
    return [_transport(urls, i) for i in range(n)]


async def test_publish_on_one_node_arrives_on_another(waku_rest_urls: list[str]) -> None:
    a, b = WakuRestClient(waku_rest_urls[0]), WakuRestClient(waku_rest_urls[-1])
    topic = content_topic(_ns() + ".raw")
    try:
        assert await a.health()
        info = await b.info()
        assert info["listenAddresses"]
        await a.subscribe([topic])
        await b.subscribe([topic])
        await asyncio.sleep(0.5)  # let the relay mesh graft the shard
        await a.publish(topic, b"\x00\x01binary payload\xff")
        got: list[bytes] = []

        async def drain() -> bool:
            got.extend(m.payload for m in await b.messages(topic))
            return bool(got)

        for _ in range(100):
            if await drain():
                break
            await asyncio.sleep(0.05)
        assert got == [b"\x00\x01binary payload\xff"]
        with pytest.raises(WakuError) as err:
            await b.messages(content_topic(_ns() + ".never-subscribed"))
        assert err.value.status == 404 and not err.value.retriable
        await a.unsubscribe([topic])
        await b.unsubscribe([topic])
    finally:
        await a.aclose()
        await b.aclose()


async def test_unreachable_node_is_a_typed_retriable_error() -> None:
    client = WakuRestClient(WakuClientConfig("http://127.0.0.1:9", timeout_s=0.5, retries=1,
                                             backoff_s=0.01))
    try:
        with pytest.raises(WakuUnavailable) as err:
            await client.publish(content_topic("x"), b"y")
        assert err.value.retriable
    finally:
        await client.aclose()


async def test_directive_reaches_sentry_and_relayer_and_forgeries_drop(
        waku_rest_urls: list[str], tmp_path: Path) -> None:
    cfg = dataclasses.replace(FAST, namespace=_ns(), announce_interval_ms=300,
                              peer_expiry_ms=3000)
    names = ["gov", "sentry-1", "relayer-1"]
    gov, sentry, relayer = agents = make_agents(
        names, _transports(waku_rest_urls, 3), tmp_path, config=cfg)
    attach_ledgers(agents, bootstrap_ledgers(names, tmp_path))
    rec_s, rec_r = Recorder(), Recorder()
    sentry.handlers.append(rec_s)
    relayer.handlers.append(rec_r)
    try:
        for x in agents:
            await x.start()
        await until(lambda: all(len(x.peers.live(x.clock())) == 2 for x in agents), 30,
                    "mesh over waku")
        d = sign_directive(Directive.create(RateLimitUpdate("*", 5.0, 5), now_ms=gov.clock()),
                           GOV)
        await gov.issue_directive(d)
        await until(lambda: bool(rec_s.limits and rec_r.limits), 30, "directive over waku")
        # forged (not governance-signed), replayed and unsigned messages are dropped and counted
        forged = sign_directive(Directive.create(RateLimitUpdate("*", 1e9, 10**6),
                                                 now_ms=gov.clock()), gov.keys.signing_key)
        await gov.publisher.publish(gov.topics["governance"], MessageType.GOVERNANCE_DIRECTIVE,
                                     forged.encode())
        wire = gov.signer.wire(MessageType.GOSSIP, GossipItem("anomaly", b"x", 1).encode(),
                               now_ms=gov.clock())
        for _ in range(2):
            await gov.transport.publish(gov.topics["gossip"], wire)
        await gov.transport.publish(gov.topics["governance"], b"\x1a\x00not signed")
        # an expired (but governance-signed) directive, and an envelope from 10 minutes
        # ago (beyond the clock-skew bound) are refused too
        expired = sign_directive(Directive(b"\x07" * 16, gov.clock() - 120_000,
                                           gov.clock() - 60_000,
                                           RateLimitUpdate("*", 1e9, 10**6)), GOV)
        await gov.publisher.publish(gov.topics["governance"], MessageType.GOVERNANCE_DIRECTIVE,
                                     expired.encode())
        stale = gov.signer.wire(MessageType.GOVERNANCE_DIRECTIVE, d.encode(),
                                now_ms=gov.clock() - 600_000)
        await gov.transport.publish(gov.topics["governance"], stale)
        # a revoked sender is ignored
        relayer.keyring.revoke("gov", "test")
        before = len(rec_r.limits)
        await gov.issue_directive(sign_directive(
            Directive.create(RateLimitUpdate("*", 7.0, 7), now_ms=gov.clock()), GOV))
        await until(lambda: sentry.events["directive_rejected"] >= 2
                    and sentry.drops["duplicate"] >= 1 and sentry.drops["stale"] >= 1
                    and sentry.drops["malformed"] + sentry.drops["bad_signature"] >= 1
                    and len(rec_s.limits) == 2 and relayer.drops["revoked"] >= 1,
                    30, "drops counted")
        assert rec_s.limits == [RateLimitUpdate("*", 5.0, 5), RateLimitUpdate("*", 7.0, 7)]
        assert len(rec_r.limits) == before
    finally:
        await stop_all(agents)


@pytest.mark.parametrize("n", [2, 3])
async def test_qsdag_converges_over_waku(waku_rest_urls: list[str], tmp_path: Path,
                                         n: int) -> None:
    names = ["gov", "relayer-1", "sentry-1"][:n]
    cfg = dataclasses.replace(FAST, namespace=_ns(), peer_expiry_ms=3000)
    await converge_and_slash(names, list(_transports(waku_rest_urls, n)), tmp_path,
                             limit_s=60, config=cfg)


async def test_offline_peer_gets_bundles_on_return_over_go_waku(
        waku_rest_urls: list[str], tmp_path: Path) -> None:
    cfg = dataclasses.replace(FAST, namespace=_ns(), announce_interval_ms=200,
                              peer_expiry_ms=1000)
    await offline_peer_gets_bundles_on_return(
        lambda i: _transport(waku_rest_urls, i), tmp_path, config=cfg, limit_s=30)


@pytest.mark.skipif(not os.path.exists(Path(__file__).parents[1] / "services_ctl.py"),
                    reason="tests/services_ctl.py not available")
async def test_rest_client_survives_waku_restart(waku_rest_urls: list[str]) -> None:
    """Restart the go-waku nodes while a publisher streams messages; the polling
    subscriber backs off, re-subscribes and receives again, nothing crashes, and the
    nodes are left running (``services_ctl.restart`` returns once they are ready)."""
    from tests import services_ctl  # type: ignore[attr-defined]

    t = _transports(waku_rest_urls, 1)[0]
    topic = content_topic(_ns() + ".restart")
    pub = WakuRestClient(WakuClientConfig(waku_rest_urls[0], timeout_s=1.0, retries=0))
    sent: list[int] = []
    publish_errors = 0
    got: list[bytes] = []
    restarted = asyncio.Event()
    after_restart: list[int] = []

    async def stream() -> None:
        nonlocal publish_errors
        i = 0
        while True:
            i += 1
            try:
                await pub.publish(topic, b"m%d" % i)
                sent.append(i)
                if restarted.is_set():
                    after_restart.append(i)
            except WakuError:
                publish_errors += 1
            await asyncio.sleep(0.05)

    async def collect() -> None:
        while True:
            got.append((await sub.get()).payload)

    try:
        sub = await t.subscribe([topic])
        tasks = [asyncio.create_task(stream()), asyncio.create_task(collect())]
        await until(lambda: len(got) >= 3, 30, "messages before the restart")
        await asyncio.to_thread(services_ctl.restart, "waku")
        restarted.set()
        await until(lambda: t.poll_errors > 0, 30, "poller noticed the outage")
        await until(lambda: any(b"m%d" % i in got for i in after_restart), 60,
                    "messages after the restart")
        assert t.resubscribes >= 1 and publish_errors >= 1
        assert not any(task.done() for task in tasks) and t.legs() == {waku_rest_urls[0]: 1}
        for task in tasks:
            task.cancel()
    finally:
        await t.close()
        await pub.aclose()
    check = WakuRestClient(waku_rest_urls[0])
    try:
        assert await check.health()  # left running for the next user
    finally:
        await check.aclose()
