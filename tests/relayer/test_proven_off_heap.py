"""A proven epoch's per-topic records leave memory (issue 15's 1M-topic relayer under
1 GiB): the node keeps proof headers and per-customer totals, and reads the records back
from its proof files for receipts, claim checks and reports — before and after a
restart. A proof file that went missing is a typed error, never a wrong answer."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from pqcnet.identity import dev_identities
from pqcnet.layer0.merkle import leaf_hash, merkle_root, root_of_leaf_hashes
from pqcnet.proto import relayer_pb2 as pb
from pqcnet.relayer.errors import ProofError
from pqcnet.relayer.metering import VolumeDelta, VolumeRecord
from pqcnet.relayer.proof import build_volume_proofs, proof_from_pb, proof_to_pb
from pqcnet.relayer.proofstore import encode_proof
from pqcnet.relayer.receipts import verify_receipt
from tests.relayer.e2e import identities, start_node

pytestmark = pytest.mark.timeout(60)

CUSTOMERS = ("acme", "zeta", "umbrella")


def _records(n: int, epoch: int = 7) -> list[VolumeRecord]:
    rng = random.Random(n)
    recs = [VolumeRecord(CUSTOMERS[i % 3], f"ch{i}-" + "é" * (i % 5), rng.randrange(1 << 40),
                         rng.randrange(1 << 20), i % 3, epoch) for i in range(n)]
    return sorted(recs, key=lambda r: (r.customer, r.channel, r.qos))


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 100, 1000])
def test_root_from_leaf_hashes_is_the_merkle_root(n: int) -> None:
    leaves = [r.canonical() for r in _records(n)]
    assert root_of_leaf_hashes([leaf_hash(x) for x in leaves]) == merkle_root(leaves)


@pytest.mark.parametrize("n", [0, 1, 300])
def test_streamed_proof_encoding_is_the_protobuf_message(n: int) -> None:
    _, ids = dev_identities("t.example", "spiffe://t.example/t/relayer/r")
    [proof] = build_volume_proofs("r", 7, _records(n), ids[0].key)
    msg = pb.VolumeProof()
    msg.ParseFromString(encode_proof(proof))
    assert msg == proof_to_pb(proof)  # field for field, records in leaf order
    assert proof_from_pb(msg) == proof


async def test_proven_records_are_read_back_from_the_proof_files(tmp_path: Path) -> None:
    node = await start_node(tmp_path, epoch_seconds=60.0)
    try:
        delta: VolumeDelta = {(5, c, f"ch{i}", 1): [10 * i + 1, i + 1]
                              for i in range(50) for c in CUSTOMERS}
        await node.store.save(0, {}, delta)
        node.meter.apply(delta)
        [signed] = node.prove_closed_epochs(now=60.0 * 10)
        assert len(signed.records) == 150
        # in memory: the header and the per-customer totals only
        assert [p.records for p in node.proof_parts(5)] == [()]
        assert node.proofs[5].records == () and node.proofs[5].root == signed.root
        [read] = node.proof_parts(5, records=True)
        assert read == signed
        settled = node.settlement()
        for c in CUSTOMERS:
            frames = sum(r.frames for r in signed.records if r.customer == c)
            assert settled[(c, "proved")][1] == settled[(c, "anchored")][1] == frames
        receipt = node.receipt_for("zeta", 5)
        assert [e.record.channel for e in receipt.entries] == sorted(f"ch{i}" for i in range(50))
        verify_receipt(receipt, identities()[0].key.public_key)
        assert len(node.report(5, 5).proofs[0].records) == 150
    finally:
        await node.stop()

    node = await start_node(tmp_path, epoch_seconds=60.0)  # restart: loaded stripped too
    try:
        assert [p.records for p in node.proof_parts(5)] == [()]
        assert node.settlement() == settled
        assert node.receipt_for("acme", 5).entries == node.receipt_for("acme", 5).entries
        verify_receipt(node.receipt_for("umbrella", 5), identities()[0].key.public_key)

        # the proof file goes missing under a running node: typed errors, nothing made up
        (node.data_dir / "proofs" / "5.proof").unlink()
        with pytest.raises(ProofError):
            node.receipt_for("zeta", 5)  # not cached: never asked for before
        with pytest.raises(ProofError):
            node.report(5, 5)
        assert node.audit_claims(now=time.time() + 10**9) == {}  # skipped, logged
        assert node.settlement() == settled  # the totals it signed still add up
    finally:
        await node.stop()
