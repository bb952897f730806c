"""Issue 11, reproduction 7: the proof pipeline under crashes, huge epochs and many customers.

* A crash between anchoring an epoch and writing its proof file must not anchor the epoch
  a second time after the restart (the intent is recorded durably first).
* An epoch with more records than one Merkle tree holds is split into several signed
  trees; it never raises inside ``prove_closed_epochs`` and never stops later epochs.
* Prometheus customer/channel label values are bounded (an ``other`` bucket) and the
  series of pruned epochs are removed.
"""

from __future__ import annotations

import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from pqcnet.qsdag import VertexKind
from pqcnet.relayer import proof as proof_mod
from pqcnet.relayer.errors import ProofError
from pqcnet.relayer.metering import OTHER_LABEL, VolumeDelta, VolumeMeter
from pqcnet.relayer.node import RelayerNode
from pqcnet.relayer.proof import anchored_proof, inclusion_proof, verify_inclusion
from tests.relayer.e2e import identities, start_node

pytestmark = pytest.mark.timeout(60)


def _volume_proof_vertices(node: RelayerNode) -> list[bytes]:
    ledger = node.anchor.ledger
    return [v for v in ledger.ids() if ledger.get(v).kind == VertexKind.VOLUME_PROOF]


async def _traffic(node: RelayerNode, epoch: int, customers: int = 1) -> None:
    delta: VolumeDelta = {(epoch, f"c{i}", "ch", 1): [10 * (i + 1), i + 1]
                          for i in range(customers)}
    await node.store.save(0, {}, delta)
    node.meter.apply(delta)


class _Crash(Exception):
    """Stands for the process dying at this point."""


def _backend(request: pytest.FixtureRequest, backend: str) -> dict[str, Any]:
    if backend == "redis":
        return {"backend": "redis", "redis_url": request.getfixturevalue("redis_url"),
                "redis_prefix": f"test:{uuid.uuid4().hex[:8]}", "epoch_seconds": 60.0}
    return {"epoch_seconds": 60.0}


@pytest.mark.parametrize("backend", ["embedded", "redis"])
async def test_crash_between_anchor_and_proof_file_does_not_anchor_twice(
        backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        request: pytest.FixtureRequest) -> None:
    kw = _backend(request, backend)
    node = await start_node(tmp_path, **kw)
    try:
        await _traffic(node, 3, customers=2)

        def crash(*_a: object, **_k: object) -> None:
            raise _Crash

        monkeypatch.setattr(node.proof_store, "write", crash)
        with pytest.raises(_Crash):
            node.prove_closed_epochs(now=60.0 * 10)
        assert len(_volume_proof_vertices(node)) == 1  # anchored, proof file never written
    finally:
        monkeypatch.undo()
        await node.stop()
    node = await start_node(tmp_path, **kw)  # the restart
    try:
        node.prove_closed_epochs(now=60.0 * 10)
        vids = _volume_proof_vertices(node)
        assert len(vids) == 1, "epoch 3 was anchored twice"
        assert sorted(node.proofs) == [3]
        assert node.anchor.receipts[3] == vids[0]
        stored, vid = node.proof_store.read(3)
        assert vid == vids[0] and stored.record_count == 2
        assert not list((node.data_dir / "proofs").glob("*.intent"))
    finally:
        await node.stop()
    node = await start_node(tmp_path, **kw)  # and again: nothing new
    try:
        assert node.prove_closed_epochs(now=60.0 * 10) == []
        assert len(_volume_proof_vertices(node)) == 1
    finally:
        await node.stop()


async def test_crash_after_intent_before_anchor_anchors_once_on_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    node = await start_node(tmp_path, epoch_seconds=60.0)
    try:
        await _traffic(node, 3)

        def crash(*_a: object, **_k: object) -> bytes:
            raise _Crash

        monkeypatch.setattr(node.anchor, "anchor_proof", crash)
        with pytest.raises(_Crash):
            node.prove_closed_epochs(now=60.0 * 10)
        assert _volume_proof_vertices(node) == []
    finally:
        monkeypatch.undo()
        await node.stop()
    node = await start_node(tmp_path, epoch_seconds=60.0)
    try:
        node.prove_closed_epochs(now=60.0 * 10)
        assert len(_volume_proof_vertices(node)) == 1 and sorted(node.proofs) == [3]
    finally:
        await node.stop()


async def test_epoch_over_one_tree_is_split_and_later_epochs_still_proven(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proof_mod, "MAX_LEAVES", 4)  # a tree of 4 stands for 2**20
    node = await start_node(tmp_path, epoch_seconds=60.0)
    try:
        await _traffic(node, 3, customers=10)  # 10 records: three trees
        await _traffic(node, 4, customers=1)
        proven = node.prove_closed_epochs(now=60.0 * 10)
        assert sorted({p.epoch for p in proven}) == [3, 4]
        parts = [p for p in proven if p.epoch == 3]
        assert [(p.part, p.parts, p.record_count) for p in parts] == [
            (0, 3, 4), (1, 3, 4), (2, 3, 2)]
        assert sum(p.total_frames for p in parts) == sum(range(1, 11))
        assert len(_volume_proof_vertices(node)) == 4
        key = identities()[0].key.public_key
        for p in parts:  # each part anchored and each record provable under its part
            vid = node.anchor.part_receipt(3, p.part)
            header = anchored_proof(node.anchor.ledger, vid)
            proof_mod.verify_volume_proof(header, key)
            assert (header.part, header.parts) == (p.part, p.parts)
            for i, rec in enumerate(p.records):
                verify_inclusion(rec, inclusion_proof(p, i), header)
        rep = node.report()
        assert sum(p.total_frames for p in rep.proofs) == sum(range(1, 11)) + 1
    finally:
        await node.stop()
    node = await start_node(tmp_path, epoch_seconds=60.0)  # parts survive a restart
    try:
        assert node.prove_closed_epochs(now=60.0 * 10) == []
        assert len(node.proof_parts(3)) == 3
        assert len(_volume_proof_vertices(node)) == 4
    finally:
        await node.stop()


def _series(meter: VolumeMeter) -> set[tuple[str, str]]:
    out = set()
    for line in generate_latest(meter.registry).decode().splitlines():
        if line.startswith("pqcnet_relayer_volume_frames_total{"):
            labels = dict(kv.split("=", 1) for kv in line[line.index("{") + 1:
                                                           line.index("}")].split(","))
            out.add((labels["customer"].strip('"'), labels["channel"].strip('"')))
    return out


def test_label_cardinality_is_bounded_and_pruned_series_go() -> None:
    meter = VolumeMeter(60.0, max_label_series=3)
    for i in range(5):
        meter.apply({(1, f"c{i}", "ch", 1): [10, 1]})
    meter.apply({(2, "c0", "ch", 1): [10, 1]})
    series = _series(meter)
    assert (OTHER_LABEL, OTHER_LABEL) in series
    assert len(series) <= 4  # 3 named + other
    other = meter.registry.get_sample_value(
        "pqcnet_relayer_volume_frames_total",
        {"customer": OTHER_LABEL, "channel": OTHER_LABEL, "qos": "1"})
    assert other == 2.0  # c3 and c4 folded into other; nothing lost from the totals
    meter.forget_before(2)  # epoch 1 pruned: only c0 still has traffic in memory
    assert _series(meter) == {("c0", "ch")}
    meter.apply({(2, "c9", "ch", 1): [5, 1]})  # freed slots are reusable
    assert ("c9", "ch") in _series(meter)


def test_folded_pairs_cost_nothing_beyond_their_epoch_volume() -> None:
    """Pairs past the label bound are not remembered one by one: 20,000 distinct
    (customer, channel) pairs cost the meter only their per-epoch volume entries, and
    the series stay bounded; a folded pair stays folded while its traffic is in memory."""
    meter = VolumeMeter(60.0, max_label_series=3)
    keys = [(1, f"c{i % 4}", f"m{i}", 1) for i in range(20_000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(0, len(keys), 100):
            meter.apply({k: [64, 1] for k in keys[i:i + 100]})
        per_pair = (tracemalloc.get_traced_memory()[0] - before) / len(keys)
    finally:
        tracemalloc.stop()
    # one epoch entry (key tuple, [bytes, frames], dict slot) is ~170 B; remembering
    # each folded pair with its qos set cost ~300 B more
    assert per_pair < 260, per_pair
    assert len(_series(meter)) == 4
    assert sum(r.frames for r in meter.records(1)) == 20_000  # totals exact
    meter.apply({(2, "c1", "m5", 1): [1, 1]})  # folded, with traffic in epochs 1 and 2
    meter.forget_before(2)  # epoch 1 pruned: the named pairs' slots are free again
    assert _series(meter) == {(OTHER_LABEL, OTHER_LABEL)}
    meter.apply({(2, "c1", "m5", 1): [1, 1]})  # still live: stays under other
    meter.apply({(2, "c2", "new", 1): [1, 1]})  # a pair not in memory takes a slot
    assert _series(meter) == {(OTHER_LABEL, OTHER_LABEL), ("c2", "new")}


async def test_a_damaged_intent_is_a_typed_error_and_later_epochs_are_still_proven(
        tmp_path: Path) -> None:
    node = await start_node(tmp_path, epoch_seconds=60.0)
    try:
        await _traffic(node, 3)
        await _traffic(node, 4)
        (node.data_dir / "proofs").mkdir(exist_ok=True)
        (node.data_dir / "proofs" / "3.intent").write_bytes(b"\x00\x00\x00\x09garbage")
        with pytest.raises(ProofError, match="damaged"):
            node.proof_store.read_intent(3)
        proven = node.prove_closed_epochs(now=60.0 * 10)  # never raises
        assert [p.epoch for p in proven] == [4] and sorted(node.proofs) == [4]
        assert len(_volume_proof_vertices(node)) == 1
    finally:
        await node.stop()


def test_parts_are_bounded_by_encoded_size_too(monkeypatch: pytest.MonkeyPatch) -> None:
    from pqcnet.relayer.metering import VolumeRecord

    monkeypatch.setattr(proof_mod, "MAX_PART_BYTES", 1000)  # ~7 records of ~130 bytes
    recs = [VolumeRecord("c" * 40, f"{i:040d}", 1, 1, 1, 2) for i in range(20)]
    slices = proof_mod.split_records(recs)
    assert len(slices) > 2 and [r for s in slices for r in s] == recs
    assert all(sum(len(r.customer) + len(r.channel) + 48 for r in s) <= 1000 for s in slices)
    parts = proof_mod.build_volume_proofs("r", 2, recs, identities()[0].key)
    assert [p.part for p in parts] == list(range(len(slices)))
    assert {p.parts for p in parts} == {len(slices)}
