"""The money gauges (pqcnet_relayer_settlement_*): metered = proved + pending on a real
relayer's /metrics before and after its epoch is proven and anchored, "anchored" read
from the ledger, bounded customer labels — and a frame metered after its epoch was
proven shows up as money lost (the identity breaks)."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from pathlib import Path

import pytest

from pqcnet.relayer.frame import Frame
from pqcnet.relayer.metering import OTHER_LABEL
from pqcnet.relayer.settlement import bounded
from tests.relayer.e2e import publisher, start_node, subscriber

pytestmark = pytest.mark.timeout(120)


def _text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()  # type: ignore[no-any-return]


def _scrape(port: int) -> dict[tuple[str, str], float]:
    text = _text(port)
    return {(c, s): float(v) for c, s, v in re.findall(
        r'^pqcnet_relayer_settlement_frames\{customer="([^"]*)",state="([^"]*)"\} (\S+)$',
        text, re.M)}


async def _scrape_once_metered(port: int, want: dict[str, int]) -> dict[tuple[str, str], float]:
    """Scrape until ``want`` (customer -> frames) is metered. A subscriber holding its
    frames does not mean they are metered yet: the relayer meters a batch once the
    subscriber's ack reached it, and the delivery may overtake the publisher's reply."""
    async with asyncio.timeout(10):
        while True:
            got = _scrape(port)
            if all(got.get((c, "metered")) == n for c, n in want.items()):
                return got
            await asyncio.sleep(0.02)  # the scrape above blocks this (the node's) loop


async def test_metered_equals_proved_plus_pending_through_the_anchor(tmp_path: Path) -> None:
    node = await start_node(tmp_path, metrics_port=0, epoch_seconds=3600)
    subs = [await subscriber(node.port, c) for c in ("acme", "zeta")]
    pub = await publisher(node.port)
    try:
        frames = [Frame(c, "ch", s, b"p" * 10) for c, n in (("acme", 30), ("zeta", 12))
                  for s in range(1, n + 1)]
        assert all(r.accepted for r in await pub.publish(frames))
        await subs[0].wait_for(30)
        await subs[1].wait_for(12)
        assert node.metrics_port is not None
        before = await _scrape_once_metered(node.metrics_port, {"acme": 30, "zeta": 12})
        assert before[("acme", "pending")] == 30 and before[("acme", "proved")] == 0
        assert before[("acme", "anchored")] == 0

        proofs = node.prove_closed_epochs(now=time.time() + 2 * node.cfg.epoch_seconds)
        assert proofs
        after = _scrape(node.metrics_port)
        for c, n in (("acme", 30), ("zeta", 12)):
            assert after[(c, "metered")] == after[(c, "proved")] + after[(c, "pending")] == n
            assert after[(c, "anchored")] == after[(c, "proved")] == n
            assert after[(c, "pending")] == 0
        text = _text(node.metrics_port)
        assert re.search(r"^pqcnet_relayer_proven_epochs 1\.0$", text, re.M), text[-3000:]
        own = re.search(r"^pqcnet_relayer_ledger_own_vertices (\S+)$", text, re.M)
        assert own and float(own.group(1)) >= 1  # the proof's vertex at least

        # a frame metered into an epoch after its proof was signed: the operator delivered
        # it and will never be paid for it — the identity no longer holds
        epoch = proofs[0].epoch
        node.meter.apply({(epoch, "acme", "ch", 0): [10, 1]})
        late = _scrape(node.metrics_port)
        assert late[("acme", "metered")] == 31
        assert late[("acme", "proved")] + late[("acme", "pending")] == 30
    finally:
        await pub.close()
        for s in subs:
            await s.close()
        await node.stop()


def test_customer_labels_are_bounded_and_totals_exact() -> None:
    s = {("a", "metered"): [5, 50], ("b", "metered"): [3, 30], ("c", "metered"): [1, 10],
         ("c", "pending"): [1, 10]}
    out = bounded(s, 1)
    assert {c for c, _ in out} == {"a", OTHER_LABEL}
    assert out[(OTHER_LABEL, "metered")] == [4, 40]
    assert out[(OTHER_LABEL, "pending")] == [1, 10]
