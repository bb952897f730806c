"""A 3-relayer cluster on one set of Redis streams (issue 15, decision 0019): two
relayers split the shards by leases, a third one is ADDED mid-stream and takes its
share, then one is SIGKILLed and its shards (and pending entries) move after the lease
expired. The failover publisher and the cluster subscriber record histories;
pqcnet.chaos's checker finds no lost acknowledged, duplicated, out-of-order, phantom
or mis-billed frame. Counted independently with ``redis-cli``: nothing pending or
unread in any shard while the cluster runs, and the metered frames (HVALS) equal the
frames taken. Last,
each relayer's signed proofs cover exactly what it metered, only for topics of shards
it owned (the ownership journal) in that epoch, and their union is the total."""

from __future__ import annotations

import asyncio
import urllib.request
import uuid
from pathlib import Path

import pytest

from pqcnet.relayer.frame import Topic
from tests.relayer.cluster import ClusterRun, metered
from tests.relayer.helpers import eventually, redis_cli

pytestmark = pytest.mark.timeout(300)

TOPICS: list[Topic] = [("acme", f"ch{i}") for i in range(6)]
COUNT = 240  # frames per topic
BATCH = 8
SHARDS = 8
EPOCH = 3.0
LEASE = 2.0


def _ints(text: str) -> list[int]:
    return [int(w.strip('"')) for line in text.splitlines()
            for w in line.split()[-1:] if w.strip('"').lstrip("-").isdigit()]


async def test_three_relayers_add_one_kill_one(tmp_path: Path, redis_url: str) -> None:
    prefix = f"rcluster:{uuid.uuid4().hex[:8]}"
    run = ClusterRun(tmp_path, TOPICS, COUNT, BATCH, backend="redis", redis_url=redis_url,
                     redis_prefix=prefix, group="cluster", shards=SHARDS, redis_lease=LEASE,
                     epoch_seconds=EPOCH, metrics_port=0)
    procs, by_relayer = run.procs, run.by_relayer
    await run.start(0)
    await run.start(1)
    consumer = asyncio.create_task(run.consume())
    added_at: int | None = None
    killed = False
    try:
        step = 0
        while not run.done():
            await run.publish_step()
            step += 1
            if added_at is None and step >= 6:
                await procs[2].start()  # ADDED mid-stream: leases give it its share
                run.pub.targets.append(run.targets[2])
                added_at = step
            # r2 must have delivered (owns shards) and r1 too before r1 is killed
            if not killed and added_at is not None and step >= added_at + 4 \
                    and by_relayer[2] > 0 and by_relayer[1] > 0 \
                    and await run.has_metered("r1"):
                procs[1].kill()  # SIGKILL mid-stream: its shards move after the lease
                killed = True
            await asyncio.sleep(0.25 if added_at is not None and not killed else 0.05)
        assert killed, by_relayer
        async with asyncio.timeout(150):
            await run.all_taken.wait()
        # the killed relayer comes back (same node_id, same data dir): it proves the
        # epochs it metered before it died, from its volume in Redis
        await procs[1].start()
        volume = await metered(redis_url, prefix, run.names)
        await eventually(lambda: run.proved(volume), 4 * EPOCH + 30, 0.5)
        # the three live relayers' owned-shards gauges: every shard, none twice, all shares
        owned_now: list[int] = []

        async def gauges() -> bool:
            owned_now[:] = [await asyncio.to_thread(_owned_gauge, p.ready["metrics_port"])
                            for p in procs]
            return sum(owned_now) == SHARDS and min(owned_now) >= SHARDS // 3

        async with asyncio.timeout(6 * LEASE + 20):
            while not await gauges():  # noqa: ASYNC110 - polling another process
                await asyncio.sleep(0.5)
        # the gap fence of every live relayer: nothing dropped after a skip, nothing
        # untracked, and nothing left in flight once the stream is delivered (before
        # in-flight was limited to owned shards, every frame accepted for another
        # relayer's shard stayed registered, ~2/3 of the stream here; before a hand-over
        # dropped its shards' registrations, a shard move stranded a few publish steps)
        for proc in procs:
            port = proc.ready["metrics_port"]
            fence = await asyncio.to_thread(_fence_counters, port)
            deadline = asyncio.get_running_loop().time() + 30
            while fence["inflight"] and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.5)  # the last steps' frames are read meanwhile
                fence = await asyncio.to_thread(_fence_counters, port)
            assert fence["late_on_bus"] == 0 and fence["untracked"] == 0, fence
            assert fence["inflight"] == 0, fence
        # r0 accepted frames for other relayers' shards throughout: each was confirmed in
        # Redis before its ack (decision 0020), and the owners' saves removed every marker
        assert (await asyncio.to_thread(_fence_counters, procs[0].ready["metrics_port"])
                )["marked"] > 0
        await eventually(lambda: not run.agreement_left(SHARDS), 30, 0.5)
        # independent counts with redis-cli, while the cluster still runs: every shard
        # read and acked by the group. Checked before the stop, not after it: a stop
        # that finds a worker mid-step cancels it after STOP_GRACE and leaves that
        # step's entries pending on purpose (redelivered, then dropped as repeats, by
        # the next owner; RelayerNode.stop). Entries re-read after the last rebalance
        # (a claimed PEL) are acked within a few steps, so this waits a bounded time.
        left = await asyncio.to_thread(_unsettled, redis_url, prefix)
        deadline = asyncio.get_running_loop().time() + 30
        while left and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.5)
            left = await asyncio.to_thread(_unsettled, redis_url, prefix)
        assert not left, left
    finally:
        await run.close(consumer)

    # ... and the metered frames, summed by redis-cli, are the frames taken
    metered_frames = sum(sum(_ints(redis_cli(redis_url, "HVALS", f"{prefix}:volf:{n}")))
                         for n in run.names)
    assert metered_frames == run.total
    # the history checker against the bill; each relayer's proofs, only for shards it
    # owned (ownership journal) in that epoch
    await run.check_histories_and_proofs(volume, redis_url, prefix, SHARDS, EPOCH)


def _unsettled(redis_url: str, prefix: str) -> list[tuple[int, str, str]]:
    """Shards with entries pending (read, not acked) or unread in the group, with
    redis-cli's own words: the pending summary and the group's info."""
    out = []
    for s in range(SHARDS):
        key = f"{prefix}:s:{s}"
        summary = redis_cli(redis_url, "XPENDING", key, "cluster")
        pending = _ints(summary)
        groups = redis_cli(redis_url, "XINFO", "GROUPS", key)
        lines = groups.splitlines()
        lag = [int(lines[i + 1].split()[-1].strip('"')) for i, line in enumerate(lines)
               if line.split()[-1].strip('"') == "lag"]
        if not pending or pending[0] != 0 or lag != [0]:
            detail = redis_cli(redis_url, "XPENDING", key, "cluster", "-", "+", "5")
            out.append((s, summary + detail, groups))
    return out


def _fence_counters(port: int) -> dict[str, float]:
    """``pqcnet_relayer_gap_fence_*`` from a relayer's /metrics (events and in flight)."""
    out: dict[str, float] = {}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("pqcnet_relayer_gap_fence_events_total{"):
                labels, value = line.rsplit(" ", 1)
                out[labels.split('"')[1]] = float(value)
            elif line.startswith("pqcnet_relayer_gap_fence_inflight_frames "):
                out["inflight"] = float(line.split()[1])
    assert {"late_on_bus", "untracked", "inflight"} <= set(out), out
    return out


def _owned_gauge(port: int) -> int:
    """``pqcnet_relayer_owned_shards`` from a relayer's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("pqcnet_relayer_owned_shards "):
                return int(float(line.split()[1]))
    raise AssertionError("no pqcnet_relayer_owned_shards series")
