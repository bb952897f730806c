"""``pqcnet bench verify``: how fast anyone can check a relayer's claims.

One epoch of ``--records`` volume records (``--customers`` customers) is proven,
anchored in a real QS-DAG ledger and anchored on Layer-0; then, in the same process
on one core:

* **receipts**: one signed receipt per customer, each checked with
  :func:`~pqcnet.relayer.receipts.verify_receipt` (receipt, proof header and anchor
  vertex signatures, the customer's inclusion proofs) plus the Layer-0 check;
* **inclusion proofs**: every record of the epoch checked against the root;
* the **baseline**: raw ML-DSA-65 verifies per second measured in the same run. A
  receipt costs four verifies (receipt, proof header, anchor vertex, Layer-0
  envelope) plus hashing, so ``ratio_vs_verify_floor`` = receipts/s ÷ (verifies/s ÷ 4);
  1.0 would mean the signatures are all it costs.

Timings on a shared machine are noisy: the JSON carries the load average.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from pqcnet.bench._stats import machine
from pqcnet.crypto.pqc import SigningKey
from pqcnet.layer0 import Anchorer, JsonlSink
from pqcnet.layer0.merkle import Tree
from pqcnet.qsdag import Ledger
from pqcnet.relayer.metering import VolumeRecord
from pqcnet.relayer.proof import LedgerAnchor, build_volume_proof, verify_inclusion
from pqcnet.relayer.receipts import build_receipt, verify_receipt, verify_receipt_layer0


def _verify_rate(key: SigningKey, seconds: float = 1.0) -> float:
    msg = b"x" * 600
    sig = key.sign(msg, context=b"bench")
    pub = key.public_key
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        pub.verify(sig, msg, context=b"bench")
        n += 1
    return n / (time.perf_counter() - start)


def run(records: int = 10_000, customers: int = 100, receipts: int = 100) -> dict[str, Any]:
    """The benchmark; returns the JSON-ready result."""
    env_before = machine()
    key = SigningKey.generate()
    recs = sorted((VolumeRecord(f"c{i % customers:05d}", f"ch{i:07d}", 100 + i, 1 + i % 7, 1, 9)
                   for i in range(records)), key=lambda r: (r.customer, r.channel, r.qos))
    with tempfile.TemporaryDirectory(prefix="pqcnet-bench-verify-") as tmp:
        t0 = time.perf_counter()
        proof = build_volume_proof("relayer-1", 9, recs, key)
        prove_s = time.perf_counter() - t0
        ledger = Ledger.open(Path(tmp) / "ledger")
        try:
            ledger.init_genesis("bench", "relayer-1", key)
            vid = LedgerAnchor(ledger, "relayer-1", key).anchor_proof(proof)
            vertex = ledger.get(vid).encode()
            l0_key = SigningKey.generate()
            sink = JsonlSink(Path(tmp) / "anchors.jsonl")
            Anchorer(ledger, sink, channel="channel-0", signer_id="anchorer-1",
                     signer=l0_key).anchor_all()
        finally:
            ledger.close()
        l0_records = list(sink.records())
        names = sorted({r.customer for r in recs})[:receipts]
        t0 = time.perf_counter()
        built = [build_receipt("relayer-1", c, 9, [proof], [vertex], key) for c in names]
        build_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        for r in built:
            verify_receipt_layer0(verify_receipt(r, key.public_key), l0_records,
                                  l0_key.public_key)
        verify_s = time.perf_counter() - t0

        tree = Tree([r.canonical() for r in recs])
        paths = [tree.proof(i) for i in range(len(recs))]
        header = proof.header()
        t0 = time.perf_counter()
        for rec, inc in zip(recs, paths, strict=True):
            verify_inclusion(rec, inc, header)
        inclusion_s = time.perf_counter() - t0
    floor = _verify_rate(key)
    per_s = len(built) / verify_s
    return {
        "bench": "verify", "records": records, "customers": customers, "receipts": len(built),
        "records_per_receipt": round(records / customers, 1),
        "prove_epoch_s": round(prove_s, 3), "build_receipts_per_s": round(len(built) / build_s, 1),
        "verify_receipts_per_s": round(per_s, 1),
        "verify_inclusion_per_s": round(len(recs) / inclusion_s, 1),
        "baseline_mldsa65_verify_per_s": round(floor, 1),
        "ratio_vs_verify_floor": round(per_s / (floor / 4), 3),
        "machine_before": env_before, "machine_after": machine(),
    }


@click.command()
@click.option("--records", default=10_000, show_default=True, type=click.IntRange(1, 1 << 20),
              help="Volume records in the epoch.")
@click.option("--customers", default=100, show_default=True, type=click.IntRange(1),
              help="Customers the records are spread over.")
@click.option("--receipts", default=100, show_default=True, type=click.IntRange(1),
              help="Receipts built and verified (one per customer, at most --customers).")
def cli(records: int, customers: int, receipts: int) -> None:
    """Receipt and inclusion-proof verification rate against raw ML-DSA-65 verify."""
    click.echo(json.dumps(run(records, min(customers, records), receipts), indent=2))
