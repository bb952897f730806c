"""One transport over all three go-waku nodes fails over when its node dies.

A feeder publishes a numbered stream through node 3 while the transport under test
both receives it and publishes its own numbered stream (watched from node 3). Node 1
— the transport's active node — is frozen with SIGSTOP mid-stream: publishes and polls
move to node 2 (the standby leg already holds what was relayed meanwhile), then node 1
is resumed and the subscription we left there is deleted so it cannot clog the node.
Every message reaches its application exactly once, and the process's Prometheus
counters of failovers, moved legs, suppressed duplicates and deleted subscriptions
agree with the transports' own. Then every node restarts
(``scripts/services restart waku``): the transport re-places its subscription and
carries on.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import uuid
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, generate_latest

from pqcnet.mesh.errors import WakuError
from pqcnet.mesh.transport import Subscription, content_topic
from pqcnet.mesh.waku import WakuClientConfig, WakuRestClient, WakuTransport

from .harness import until

pytestmark = [pytest.mark.services, pytest.mark.timeout(240)]
ROOT = Path(__file__).resolve().parents[2]


def _pid(node: int) -> int:
    return int((ROOT / ".services" / "waku" / str(node) / "pid").read_text())


class Stream:
    """Publishes b"<tag>-<n>" every ``period_s`` through ``publish``; records what was sent."""

    def __init__(self, tag: str, publish: object, period_s: float = 0.04) -> None:
        self.tag, self.publish, self.period_s = tag, publish, period_s
        self.sent: list[bytes] = []
        self.errors = 0
        self.running = True
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        i = 0
        while self.running:
            i += 1
            msg = f"{self.tag}-{i}".encode()
            try:
                await self.publish(msg)  # type: ignore[operator]
                self.sent.append(msg)
            except WakuError:
                self.errors += 1
            await asyncio.sleep(self.period_s)

    async def stop(self) -> None:
        """Let the publish in flight finish (cancelling it could leave a message
        published but not recorded as sent)."""
        self.running = False
        await asyncio.gather(self.task, return_exceptions=True)


def _collect(sub: Subscription, into: list[bytes]) -> asyncio.Task[None]:
    async def run() -> None:
        async for m in sub:
            into.append(m.payload)
    return asyncio.create_task(run())


#: the transport's counters and the Prometheus counters it feeds
WAKU_METRICS = {"failovers": "pqcnet_mesh_waku_failovers_total",
                "leg_moves": "pqcnet_mesh_waku_leg_moves_total",
                "duplicates_suppressed": "pqcnet_mesh_waku_duplicates_suppressed_total",
                "cleanups": "pqcnet_mesh_waku_stale_subscriptions_deleted_total"}


def _waku_metrics() -> dict[str, float]:
    """This process's Waku failover counters, read from its Prometheus exposition."""
    text = generate_latest(REGISTRY).decode()
    out = {}
    for attr, name in WAKU_METRICS.items():
        (value,) = re.findall(rf"^{name} (\S+)$", text, re.M)
        out[attr] = float(value)
    return out


async def test_transport_fails_over_across_all_rest_urls(waku_rest_urls: list[str]) -> None:
    urls = waku_rest_urls
    assert len(urls) == 3
    ns = "f" + uuid.uuid4().hex[:10]
    t_in, t_out = content_topic(ns + ".in"), content_topic(ns + ".out")
    t = WakuTransport.connect_many(urls, timeout_s=1.0, retries=0, poll_interval_s=0.03,
                                   health_interval_s=0.3, max_backoff_s=0.5)
    feeder = WakuRestClient(WakuClientConfig(urls[2], timeout_s=2.0, retries=2))
    watcher = WakuTransport.connect(urls[2], timeout_s=2.0, retries=2, poll_interval_s=0.03)
    got_in: list[bytes] = []
    got_out: list[bytes] = []
    before = _waku_metrics()
    tasks: list[asyncio.Task[None]] = []
    streams: list[Stream] = []
    stopped = False
    try:
        sub = await t.subscribe([t_in])
        assert t.legs() == {urls[0]: 1, urls[1]: 1, urls[2]: 0}  # active + one standby
        tasks += [_collect(sub, got_in), _collect(await watcher.subscribe([t_out]), got_out)]
        await asyncio.sleep(1.0)  # let the relay mesh graft the shards
        streams = [Stream("in", lambda m: feeder.publish(t_in, m)),
                   Stream("out", lambda m: t.publish(t_out, m))]
        await until(lambda: len(got_in) >= 10 and len(got_out) >= 10, 30, "streams flowing")
        os.kill(_pid(1), signal.SIGSTOP)
        stopped = True
        await until(lambda: t.active == 1
                    and t.legs() == {urls[0]: 0, urls[1]: 1, urls[2]: 1}, 30, "failed over")
        marks = (len(streams[0].sent), len(streams[1].sent))
        await until(lambda: len(got_in) >= marks[0] + 20 and len(got_out) >= marks[1] + 20,
                    30, "streams flowing after the failover")
        os.kill(_pid(1), signal.SIGCONT)
        stopped = False
        await until(lambda: t.cleanups >= 1, 30, "stale subscription deleted on node 1")
        assert t.failovers == 1 and streams[1].errors == 0  # no publish was lost
        # one leg moved (node 1's to node 3) and node 1's one subscription was deleted;
        # the standby leg saw what the active one saw; the process's metrics say the same
        assert t.leg_moves == 1 and t.cleanups == 1 and t.duplicates_suppressed >= 1
        assert _waku_metrics() == {
            k: before[k] + getattr(t, k) + getattr(watcher, k) for k in WAKU_METRICS}
        for s in streams:
            await s.stop()
        await until(lambda: set(got_in) >= set(streams[0].sent)
                    and set(got_out) >= set(streams[1].sent), 30, "everything delivered")
        await asyncio.sleep(0.5)
        for got, stream in ((got_in, streams[0]), (got_out, streams[1])):
            counts = Counter(got)
            assert set(counts) == set(stream.sent), "phantom or lost messages"
            assert max(counts.values()) == 1, [m for m, c in counts.items() if c > 1][:5]
        # every node restarts: the transport re-places its legs and receives again
        from tests import services_ctl  # type: ignore[attr-defined]

        await asyncio.to_thread(services_ctl.restart, "waku")
        before = len(got_in)
        streams = [Stream("again", lambda m: feeder.publish(t_in, m))]
        await until(lambda: len(got_in) > before + 5, 60, "receiving after the restart")
        assert sum(t.legs().values()) == 2
    finally:
        if stopped:
            os.kill(_pid(1), signal.SIGCONT)
        for s in streams:
            await s.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await t.close()
        await watcher.close()
        await feeder.aclose()
