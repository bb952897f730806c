"""Merkle tree, volume meter, signed proofs and anchoring into a real QS-DAG ledger."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pqcnet.crypto.pqc import SigningKey
from pqcnet.layer0.merkle import MAX_LEAVES, merkle_root
from pqcnet.qsdag import Ledger
from pqcnet.relayer.errors import ProofError
from pqcnet.relayer.frame import Frame
from pqcnet.relayer.metering import VolumeMeter, VolumeRecord
from pqcnet.relayer.proof import (
    LedgerAnchor,
    PerformanceReport,
    anchored_proof,
    build_volume_proof,
    inclusion_proof,
    sign_report,
    verify_inclusion,
    verify_report,
    verify_volume_proof,
)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 70), st.data())
def test_every_record_proves_through_layer0_tree_and_tamper_fails(n: int,
                                                                  data: st.DataObject) -> None:
    """The volume proof uses the house RFC 6962 tree: its root is layer0's root."""
    records = [VolumeRecord(f"c{i}", "ch", i, 1, 0, 7) for i in range(n)]
    proof = build_volume_proof("r", 7, records, _KEY)
    assert proof.root == merkle_root([r.canonical() for r in records])
    i = data.draw(st.integers(0, n - 1))
    inc = inclusion_proof(proof, i)
    verify_inclusion(records[i], inc, proof.header())
    with pytest.raises(ProofError):
        verify_inclusion(replace(records[i], bytes=10**6), inc, proof.header())
    with pytest.raises(ProofError):  # a proof for a different tree size
        verify_inclusion(records[i], replace(inc, size=n + 1), proof.header())
    if n > 1:
        with pytest.raises(ProofError):
            verify_inclusion(records[i], replace(inc, index=(i + 1) % n), proof.header())


def test_epoch_over_the_tree_bound_is_a_typed_error() -> None:
    records = [VolumeRecord("c", "ch", 0, 0, 0, 1)] * (MAX_LEAVES + 1)
    with pytest.raises(ProofError, match="at most"):
        build_volume_proof("r", 1, records, _KEY)


_KEY = SigningKey.generate()


def _meter(clock: list[float]) -> VolumeMeter:
    return VolumeMeter(10.0, clock=lambda: clock[0])


def test_meter_aggregates_per_epoch_and_matches_prometheus() -> None:
    clock = [100.0]
    m = _meter(clock)
    m.record(0, [Frame("a", "x", 1, b"12345"), Frame("a", "x", 2, b"1"), Frame("b", "y", 1, b"")])
    clock[0] = 115.0
    m.record(3, [Frame("a", "x", 3, b"123", qos=2)])
    assert m.epochs() == [10, 11]
    assert [(r.customer, r.bytes, r.frames) for r in m.records(10)] == [("a", 6, 2), ("b", 0, 1)]
    assert sum(r.bytes for r in m.query(customer="a")) == 9
    assert m.query(epoch_from=11)[0].qos == 2
    got = m.registry.get_sample_value("pqcnet_relayer_volume_bytes_total",
                                      {"customer": "a", "channel": "x", "qos": "1"})
    assert got == 6.0


def test_proof_signs_verifies_and_anchors_in_qsdag(tmp_path: Path) -> None:
    clock = [100.0]
    m = _meter(clock)
    m.record(0, [Frame(f"c{i}", "ch", 1, b"x" * i) for i in range(7)])
    key = SigningKey.generate()
    proof = build_volume_proof("relayer-1", 10, m.records(10), key)
    verify_volume_proof(proof, key.public_key)
    assert proof.total_bytes == sum(range(7)) and proof.record_count == 7
    with pytest.raises(ProofError):
        verify_volume_proof(replace(proof, total_bytes=1), key.public_key)
    with pytest.raises(ProofError):
        verify_volume_proof(proof, SigningKey.generate().public_key)

    gov = SigningKey.generate()
    ledger = Ledger.open(tmp_path / "ledger")
    ledger.init_genesis("pqcnet-test", "gov-1", gov)
    ledger.register_author("relayer-1", key.public_key, registrar="gov-1", signer=gov)
    anchor = LedgerAnchor(ledger, "relayer-1", key)
    vid = anchor.anchor_proof(proof)
    anchored = anchored_proof(ledger, vid)
    assert anchored.records == () and anchored.root == proof.root
    verify_volume_proof(anchored, key.public_key)
    for i, rec in enumerate(proof.records):
        verify_inclusion(rec, inclusion_proof(proof, i), anchored)
    with pytest.raises(ProofError):
        verify_inclusion(replace(proof.records[3], bytes=999), inclusion_proof(proof, 3), anchored)

    report = sign_report(PerformanceReport("relayer-1", 10, 10, (proof,), (vid,), 42.0), key)
    verify_report(report, key.public_key)
    with pytest.raises(ProofError):
        verify_report(replace(report, uptime_seconds=43.0), key.public_key)
    assert ledger.has(anchor.anchor_report(report))
    ledger.close()


def test_a_held_batch_keeps_its_epoch_and_later_ones_unsettled() -> None:
    clock = [100.0]
    m = _meter(clock)
    late = m.aggregate([Frame("a", "x", 1, b"abc")])  # epoch 10, being written
    m.hold(late)
    assert not m.settled(10) and not m.settled(11) and m.settled(9)
    m.hold(late)  # a second worker's batch of the same epoch
    m.release(late)
    assert not m.settled(10)
    m.apply(late)
    m.release(late)
    assert m.settled(10) and m.settled(11)


async def test_node_proves_an_epoch_only_after_its_last_batch_was_written(
        tmp_path: Path) -> None:
    """A batch delivered near the end of an epoch and written after it must land in the
    proof of that epoch, not after it (metered but never proven)."""
    import time

    from tests.relayer.e2e import start_node

    node = await start_node(tmp_path, epoch_seconds=3600.0)
    try:
        early = node.meter.aggregate([Frame("a", "x", 1, b"12")])
        node.meter.apply(early)
        late = node.meter.aggregate([Frame("a", "x", 2, b"345")])  # same epoch, in flight
        node.meter.hold(late)
        later = time.time() + 7200
        assert node.prove_closed_epochs(now=later) == []  # held: nothing proven yet
        node.meter.apply(late)
        node.meter.release(late)
        [proof] = node.prove_closed_epochs(now=later)
        assert (proof.total_frames, proof.total_bytes) == (2, 5)
    finally:
        await node.stop()
