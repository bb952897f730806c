"""Envelopes (ICS-04 commitment, signature) and the anchoring adapter over a real ledger."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest

from pqcnet.layer0 import (
    Anchorer,
    EnvelopeInvalid,
    EpochRecord,
    JsonlSink,
    ProofInvalid,
    SequenceError,
    make_envelope,
    packet_commitment,
    verify_anchored,
    verify_envelope,
    verify_record,
)
from pqcnet.qsdag import Route, VertexKind
from tests.qsdag.conftest import ALICE, GOV, make_ledger

pytestmark = pytest.mark.timeout(120)


def test_commitment_is_ics04_bytes() -> None:
    data = b"packet-data"
    manual = hashlib.sha256(
        (1_700_000_000_000_000_000).to_bytes(8, "big") + (1).to_bytes(8, "big")
        + (42).to_bytes(8, "big") + hashlib.sha256(data).digest()).digest()
    assert packet_commitment(data, 1_700_000_000_000_000_000, 1, 42) == manual


def test_envelope_signature_and_commitment_checked() -> None:
    from pqcnet.layer0.envelope import EpochAnchor

    data = EpochAnchor("n", 0, 0, 3, 4, b"\x01" * 32).encode()
    env = make_envelope("channel-0", 1, data, "gov", GOV, timeout_height=(1, 99))
    assert verify_envelope(env, GOV.public_key).count == 4
    for bad in (replace(env, data=data + b"\x00"), replace(env, sequence=2),
                replace(env, timeout_height=(1, 100)), replace(env, channel="channel-1")):
        with pytest.raises(EnvelopeInvalid):
            verify_envelope(bad, GOV.public_key)
    with pytest.raises(EnvelopeInvalid):
        verify_envelope(env, ALICE.public_key)


def test_anchorer_epochs_sequences_and_inclusion_proofs(tmp_path: Path) -> None:
    ledger = make_ledger(tmp_path / "l")
    for i in range(9):
        ledger.append(VertexKind.ROUTE, Route(f"t{i}", "alice"), "alice", ALICE)
    sink_path = tmp_path / "anchors.jsonl"
    anchorer = Anchorer(ledger, JsonlSink(sink_path), channel="channel-0", signer_id="gov",
                        signer=GOV, epoch_size=5)
    records = anchorer.anchor_all()
    assert [r.envelope.sequence for r in records] == [1, 2, 3]
    assert [len(r.ids) for r in records] == [5, 5, 2] and anchorer.pending() == 0
    assert [i for r in records for i in r.ids] == ledger.ids()
    for record in records:
        verify_record(record, GOV.public_key)
        for vid in record.ids:
            verify_anchored(vid, record.proof(vid), record.envelope, GOV.public_key)
    # a vertex from another epoch does not verify against this envelope
    with pytest.raises(ProofInvalid):
        verify_anchored(records[1].ids[0], records[0].proof(records[0].ids[1]),
                        records[0].envelope, GOV.public_key)
    with pytest.raises(ProofInvalid):
        records[0].proof(records[1].ids[0])
    # restart: the sink file is the state; new vertices continue the sequence
    ledger.append(VertexKind.ROUTE, Route("late", "alice"), "alice", ALICE)
    again = Anchorer(ledger, JsonlSink(sink_path), channel="channel-0", signer_id="gov",
                     signer=GOV, epoch_size=5)
    nxt = again.anchor_next()
    assert nxt is not None and nxt.envelope.sequence == 4
    assert nxt.anchor.first_position == len(ledger) - 1
    lines = sink_path.read_text().splitlines()
    assert len(lines) == 4
    assert EpochRecord.from_json(json.loads(lines[-1])) == nxt
    ledger.close()


def test_sink_refuses_non_increasing_sequence_and_tolerates_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    sink = JsonlSink(path)
    env = make_envelope("c", 1, b"x", "gov", GOV)
    sink.submit(EpochRecord(env, (b"\x00" * 32,)))
    for seq in (1, 3):
        with pytest.raises(SequenceError):
            sink.submit(EpochRecord(make_envelope("c", seq, b"x", "gov", GOV), ()))
    with path.open("a") as fh:
        fh.write('{"envelope": {"chan')  # crash mid-write
    reopened = JsonlSink(path)
    last = reopened.last("c")
    assert last is not None and last.envelope.sequence == 1
    # the next record lands on a line of its own (before, it was glued to the fragment:
    # one unreadable line, the record gone at the next start)
    second = EpochRecord(make_envelope("c", 2, b"y", "gov", GOV), (b"\x01" * 32,))
    reopened.submit(second)
    assert [json.loads(line) for line in path.read_text().splitlines()][-1] == \
        second.to_json()
    again = JsonlSink(path).last("c")
    assert again is not None and again.envelope.sequence == 2
