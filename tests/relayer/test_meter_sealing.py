"""A proven epoch leaves the meter's memory (sealing) and nothing a reader sees changes:
records (proof + late frames), per-customer totals, pages, the named series, a watcher's
stream, and a restarted relayer's view. The memory is really freed: a relayer holding
``keep_epochs`` epochs of 100k topics each would otherwise grow ~35 MiB per epoch."""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from pathlib import Path

import grpc
import pytest

from pqcnet.proto import relayer_pb2 as pb
from pqcnet.proto import relayer_pb2_grpc as pb_grpc
from pqcnet.relayer.governance import VolumeMetricsService, serve_governance
from pqcnet.relayer.metering import VolumeDelta, VolumeMeter, VolumeRecord
from tests.relayer.e2e import start_node
from tests.relayer.test_proof_pipeline_safety import _series

pytestmark = pytest.mark.timeout(120)


def _sealable(delta: VolumeDelta, **kw: int) -> tuple[VolumeMeter, dict[int, list[VolumeRecord]]]:
    """A meter whose sealed epochs read back the records they had when sealed (what a
    proof file holds)."""
    m = VolumeMeter(60, **kw)
    proofs: dict[int, list[VolumeRecord]] = {}
    m.sealed_records = lambda e: proofs[e]
    m.apply(delta)
    return m, proofs


def _seal(m: VolumeMeter, proofs: dict[int, list[VolumeRecord]], e: int) -> None:
    proofs[e] = m.records(e)
    m.seal(e)


def test_a_sealed_epoch_reads_the_same_and_late_frames_add_up() -> None:
    m, proofs = _sealable({(e, c, f"ch{i}", 1): [10 * i + 1, i + 1]
                           for e in (1, 2) for c in ("a", "b") for i in range(30)})
    before = {e: m.records(e) for e in (1, 2)}
    totals = {e: m.customer_totals(e) for e in (1, 2)}
    _seal(m, proofs, 1)
    m.seal(1)  # idempotent
    assert m.sealed(1) and not m.sealed(2) and m.epochs() == [1, 2]
    assert {e: m.records(e) for e in (1, 2)} == before
    assert {e: m.customer_totals(e) for e in (1, 2)} == totals
    v = m.seal_version(1)
    m.apply({(1, "a", "ch3", 1): [5, 1], (1, "z", "late", 0): [7, 2]})  # after the proof
    assert m.seal_version(1) != v
    recs = {(r.customer, r.channel, r.qos): (r.bytes, r.frames) for r in m.records(1)}
    assert recs[("a", "ch3", 1)] == (31 + 5, 4 + 1) and recs[("z", "late", 0)] == (7, 2)
    assert [(r.customer, r.channel, r.qos) for r in m.records(1)] == sorted(recs)
    assert m.customer_totals(1)["a"] == [totals[1]["a"][0] + 5, totals[1]["a"][1] + 1]
    assert m.customer_totals(1)["z"] == [7, 2]
    assert m.query(customer="z") == [VolumeRecord("z", "late", 7, 2, 0, 1)]
    m.forget_before(2)
    assert m.epochs() == [2] and not m.sealed(1)


def test_sealing_at_start_keeps_what_the_proof_does_not_cover() -> None:
    """Volume loaded at start holds late frames metered after the proof; sealing with
    the proof's records keeps exactly those (and a record the volume lost shows as 0)."""
    m = VolumeMeter(60)
    proven = [VolumeRecord("a", "x", 10, 1, 0, 3), VolumeRecord("a", "y", 20, 2, 0, 3),
              VolumeRecord("b", "gone", 5, 1, 0, 3)]
    m.sealed_records = lambda e: proven
    m.apply({(3, "a", "x", 0): [10, 1], (3, "a", "y", 0): [25, 3], (3, "c", "new", 0): [4, 1]})
    m.seal(3, proven=proven)
    assert [(r.customer, r.channel, r.bytes, r.frames) for r in m.records(3)] == [
        ("a", "x", 10, 1), ("a", "y", 25, 3), ("c", "new", 4, 1)]  # b/gone netted to 0
    assert m.customer_totals(3) == {"a": [35, 4], "c": [4, 1]}


def test_sealing_frees_the_per_topic_memory() -> None:
    m, proofs = _sealable({}, max_label_series=10)  # series are not what is measured
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        m.apply({(1, f"c{i % 4}", f"m{i}", 1): [64, 1] for i in range(20_000)})
        held = tracemalloc.get_traced_memory()[0] - base
        proofs[1] = []  # the test's own copy would be the proof file; keep none here
        m.seal(1)
        left = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert held > 20_000 * 150, held
    assert left < held / 10, (held, left)
    assert sum(t[1] for t in m.customer_totals(1).values()) == 20_000


def test_named_series_and_folded_qos_live_until_the_sealed_epoch_is_pruned() -> None:
    m, proofs = _sealable({(1, f"c{i}", "ch", 1): [10, 1] for i in range(5)},
                          max_label_series=3)
    assert len(_series(m)) == 4  # 3 named + other
    _seal(m, proofs, 1)
    m.forget_before(1)  # nothing pruned: every series stays (their traffic is held)
    assert len(_series(m)) == 4
    m.apply({(2, "c0", "ch", 1): [1, 1]})
    m.forget_before(2)  # epoch 1 pruned: only c0 has traffic left
    assert _series(m) == {("c0", "ch")}


@pytest.mark.parametrize("limit", [1, 3, 50])
def test_pages_over_sealed_and_open_epochs_equal_the_query(limit: int) -> None:
    m, proofs = _sealable({(e, c, f"ch{i}", i % 2): [i + 1, 1]
                           for e in (1, 2, 3) for c in ("a", "b") for i in range(20)})
    _seal(m, proofs, 1)
    _seal(m, proofs, 2)
    m.apply({(2, "a", "ch0-late", 1): [1, 1]})
    for customer, channel in ((None, None), ("b", None), (None, "ch7"), ("a", "ch0-late")):
        out, after = [], None
        while True:
            recs, after = m.page(customer, channel, 0, None, after, limit, 1 << 30)
            out += recs
            if after is None:
                break
        assert out == m.query(customer, channel)


async def test_a_watcher_gets_each_record_once_across_sealing_and_late_frames() -> None:
    m, proofs = _sealable({(1, "a", "x", 0): [10, 1], (1, "a", "y", 0): [20, 2]})
    server, port = await serve_governance(VolumeMetricsService(m, lambda a, b: None),
                                          "127.0.0.1", 0)
    got: list[tuple[int, str, int]] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.VolumeMetricsStub(ch)  # type: ignore[no-untyped-call]
            call = stub.WatchVolume(pb.VolumeQuery())

            async def take(n: int) -> None:
                for _ in range(n):
                    r = await asyncio.wait_for(call.read(), 10)
                    got.append((r.epoch, r.channel, r.frames))

            await take(2)
            _seal(m, proofs, 1)
            m.apply({(2, "a", "x", 0): [1, 1]})  # wakes the watcher after the seal
            await take(1)
            await asyncio.sleep(1.5)  # three polls: the sealed epoch is not sent again
            m.apply({(1, "a", "x", 0): [5, 1]})  # a late frame into the sealed epoch
            await take(2)  # that epoch again, whole (its records re-read once)
            call.cancel()
    finally:
        await server.stop(None)
    assert got[:3] == [(1, "x", 1), (1, "y", 2), (2, "x", 1)]
    assert sorted(got[3:]) == [(1, "x", 2), (1, "y", 2)]


async def test_a_relayer_seals_proven_epochs_and_a_restart_keeps_late_frames(
        tmp_path: Path) -> None:
    node = await start_node(tmp_path, epoch_seconds=60.0)
    try:
        delta: VolumeDelta = {(5, "acme", f"ch{i}", 1): [100, 2] for i in range(40)}
        await node.store.save(0, {}, delta)
        node.meter.apply(delta)
        node.prove_closed_epochs(now=60.0 * 10)
        assert node.meter.sealed(5)
        late: VolumeDelta = {(5, "acme", "ch0", 1): [1, 1], (5, "zeta", "late", 0): [9, 3]}
        await node.store.save(0, {}, late)  # metered after the proof, persisted
        node.meter.apply(late)
        view = node.meter.query()
        settled = node.settlement()
        assert settled[("zeta", "metered")] == [9, 3] and ("zeta", "proved") not in settled
    finally:
        await node.stop()
    node = await start_node(tmp_path, epoch_seconds=60.0)
    try:
        assert node.meter.sealed(5)  # sealed again once the volume was loaded
        assert node.meter.query() == view
        assert node.settlement() == settled
        assert node.prove_closed_epochs(now=60.0 * 10) == []
        # the records a governance pull read back are dropped once idle
        node._records_cache = (5, (), time.monotonic() - 60)
        for _ in range(100):
            if node._records_cache is None:
                break
            await asyncio.sleep(0.1)
        assert node._records_cache is None
    finally:
        await node.stop()
