"""Issue 11: anyone can verify a receipt; volume claims are checked against client-signed
ack counters (decision 0014). Real relayer, real QSTP tunnels, real QS-DAG and Layer-0.

* a customer asks the relayer for its signed receipt of an epoch and checks it with
  public keys only; every tampered part (record, signature, proof header, anchor
  vertex, Layer-0 envelope) is a typed ``ReceiptInvalid``; another tenant is refused;
* the subscriber SDK signs its ack counters and the relayer keeps them: the honest
  topic is ``supported``, an over-reported one ``overclaimed`` (with evidence that
  verifies), one whose subscriber never signs ``unsupported``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from pqcnet.crypto.pqc import SigningKey
from pqcnet.identity import dev_identities
from pqcnet.layer0 import Anchorer, JsonlSink
from pqcnet.relayer.client import PublisherClient, RelayerRefused, SubscriberClient
from pqcnet.relayer.counters import (
    AckCounter,
    CounterTracker,
    Tolerance,
    ca_trust,
    find_overclaims,
    sign_counter,
    verify_overclaim,
)
from pqcnet.relayer.errors import CounterInvalid, ReceiptInvalid
from pqcnet.relayer.frame import Frame
from pqcnet.relayer.node import RelayerNode
from pqcnet.relayer.receipts import VolumeReceipt, verify_receipt, verify_receipt_layer0
from tests.mesh.harness import until
from tests.relayer.e2e import TD, Collector, identities, start_node

pytestmark = pytest.mark.timeout(120)
HOUR = 3600.0


async def _until(cond: Callable[[], bool], what: str) -> None:
    await until(cond, 30.0, what)


async def _metered(node: RelayerNode, frames: int) -> None:
    await _until(lambda: sum(r.frames for r in node.meter.query(customer="acme")) >= frames,
                 "volume metered")


async def test_customer_receipt_verifies_with_public_keys_and_tampering_is_typed(
        tmp_path: Path) -> None:
    node = await start_node(tmp_path, epoch_seconds=HOUR)
    pub = await PublisherClient.connect("127.0.0.1", node.port, identities()[1])
    sub = await SubscriberClient.connect("127.0.0.1", node.port, identities()[2])
    await sub.subscribe("acme")
    col = Collector(sub)
    try:
        res = await pub.publish([Frame("acme", f"ch{i % 2}", 1 + i // 2, b"x" * (10 + i))
                                 for i in range(6)])
        assert all(r.accepted for r in res)
        await col.wait_for(6)
        await _metered(node, 6)
        [epoch] = {p.epoch for p in node.prove_closed_epochs(now=time.time() + 2 * HOUR)}
        receipt = await pub.receipt("acme", epoch)
        receipt = VolumeReceipt.decode(receipt.encode())  # what a customer stores as a file
        key = identities()[0].key.public_key
        vids = verify_receipt(receipt, key)
        assert receipt.total_frames == 6 and receipt.total_bytes == sum(range(10, 16))
        assert vids == [node.anchor.receipts[epoch]]

        e0 = receipt.entries[0]
        tampered = [
            replace(receipt, entries=(replace(e0, record=replace(e0.record, bytes=1)),
                                      *receipt.entries[1:])),
            replace(receipt, signature=bytes(len(receipt.signature))),
            replace(receipt, proofs=(replace(receipt.proofs[0], total_frames=1),)),
            replace(receipt, anchor_vertices=(receipt.anchor_vertices[0][:-3] + b"abc",)),
            replace(receipt, customer="globex"),
        ]
        for bad in tampered:
            with pytest.raises(ReceiptInvalid):
                verify_receipt(bad, key)
        # re-signed by the relayer but over a record it never committed: the tree says no
        forged = replace(receipt, entries=(replace(e0, record=replace(e0.record, frames=99)),
                                           *receipt.entries[1:]))
        signer = identities()[0].key
        forged = replace(forged, signature=signer.sign(
            forged.signed_bytes(), context=b"pqcnet/relayer/receipt/v1"))
        with pytest.raises(ReceiptInvalid, match="inclusion"):
            verify_receipt(forged, key)
        with pytest.raises(ReceiptInvalid, match="different key"):
            verify_receipt(receipt, SigningKey.generate().public_key)

        with pytest.raises(RelayerRefused):  # tenant acme may not read globex
            await pub.receipt("globex", epoch)
        with pytest.raises(RelayerRefused):  # not proven
            await pub.receipt("acme", epoch + 5)

        # Layer-0: the relayer's ledger anchored by an IBC-style envelope
        l0_key = SigningKey.generate()
        sink = JsonlSink(tmp_path / "layer0.jsonl")
        Anchorer(node.anchor.ledger, sink, channel="channel-0", signer_id="anchorer-1",
                 signer=l0_key).anchor_all()
        anchors = verify_receipt_layer0(vids, JsonlSink(sink.path).records(), l0_key.public_key)
        assert anchors[0].count >= 2
        with pytest.raises(ReceiptInvalid, match="layer-0"):
            verify_receipt_layer0(vids, sink.records(), SigningKey.generate().public_key)
        with pytest.raises(ReceiptInvalid, match="no layer-0 envelope"):
            verify_receipt_layer0([bytes(32)], sink.records(), l0_key.public_key)
    finally:
        await col.close()
        await pub.close()
        await node.stop()


async def test_claims_checked_against_signed_counters(tmp_path: Path) -> None:
    clock = [time.time()]
    node = await start_node(tmp_path, epoch_seconds=HOUR, metrics_port=0)
    pub = await PublisherClient.connect(
        "127.0.0.1", node.port, identities()[1],
        counters=CounterTracker("publisher", identities()[1], HOUR, clock=lambda: clock[0]))
    tracker = CounterTracker("subscriber", identities()[2], HOUR, clock=lambda: clock[0])
    counting = SubscriberClient(
        (await SubscriberClient.connect("127.0.0.1", node.port, identities()[2])).tunnel,
        counters=tracker, counter_interval=0.0)
    await counting.subscribe("acme", ("honest", "inflated"))
    silent = await SubscriberClient.connect("127.0.0.1", node.port, identities()[2])
    await silent.subscribe("acme", ("silent",))  # never signs a counter
    cols = [Collector(counting), Collector(silent)]
    try:
        frames = [Frame("acme", ch, s, b"p" * 20) for ch in ("honest", "inflated", "silent")
                  for s in range(1, 6)]
        assert all(r.accepted for r in await pub.publish(frames))
        await cols[0].wait_for(10)
        await cols[1].wait_for(5)
        await _metered(node, 15)
        epoch = node.meter.epoch()
        assert await pub.send_counters() == 3  # what the publisher saw accepted, signed
        await _until(lambda: any(sc.counter.role == "publisher" for sc in
                                 node.counters.for_topic("acme", "silent", epoch)),
                     "publisher counters kept")
        await _until(lambda: any(sc.counter.frames >= 5 for sc in
                                 node.counters.for_topic("acme", "inflated", epoch)),
                     "progress counters kept")
        clock[0] += 2 * HOUR  # the client's epoch closed: its counters become final
        assert await counting.send_counters() == 2
        await _until(lambda: all(any(sc.counter.final and sc.counter.role == "subscriber"
                                     for sc in node.counters.for_topic("acme", ch, epoch))
                                 for ch in ("honest", "inflated")),
                     "final counters kept")
        # the fraud that pays: the relayer claims 50 more frames on one topic
        node.meter.apply({(epoch, "acme", "inflated", 1): [1000, 50]})
        node.prove_closed_epochs(now=time.time() + 2 * HOUR)
        status = {c.record.channel: (c.status, c.signed_frames)
                  for c in node.check_claims(epoch)}
        assert status == {"honest": ("supported", 5), "inflated": ("overclaimed", 5),
                          "silent": ("unsupported", 0)}
        assert node.audit_claims(now=time.time() + 3 * HOUR) == {
            "supported": 1, "overclaimed": 1, "unsupported": 1}
        assert node.audit_claims(now=time.time() + 3 * HOUR) == {}  # once per epoch
        assert node.registry.get_sample_value("pqcnet_relayer_claims_records_total",
                                              {"status": "overclaimed"}) == 1.0
        [ev] = find_overclaims(node.proof_parts(epoch, records=True), node.counters, node.tolerance)
        trust = ca_trust(identities()[0].trust_anchors)
        verify_overclaim(ev, identities()[0].key.public_key, trust, Tolerance())
        assert ev.entry.record.frames == 55 and ev.counter.counter.frames == 5
        with pytest.raises(CounterInvalid):  # a looser verifier: the claim is tolerated
            verify_overclaim(ev, identities()[0].key.public_key, trust, Tolerance(10.0, 0))
        doctored = replace(ev, counter=replace(ev.counter, counter=replace(
            ev.counter.counter, frames=1)))
        with pytest.raises(CounterInvalid, match="signature"):
            verify_overclaim(doctored, identities()[0].key.public_key, trust, Tolerance())
    finally:
        for c in cols:
            await c.close()
        await pub.close()
        await node.stop()
    node = await start_node(tmp_path, epoch_seconds=HOUR)  # the relayer keeps them
    try:
        status = {c.record.channel: c.status for c in node.check_claims(epoch)}
        assert status == {"honest": "supported", "inflated": "overclaimed",
                          "silent": "unsupported"}
    finally:
        await node.stop()


def test_counter_book_refuses_foreign_ca_wrong_tenant_and_other_peer() -> None:
    from pqcnet.relayer.counters import CounterBook

    _, (other,) = dev_identities(TD, f"spiffe://{TD}/acme/subscriber/s9")
    trust = ca_trust(identities()[0].trust_anchors)
    book = CounterBook(trust)
    good = sign_counter(AckCounter("subscriber", "acme", "c", 1, 5, 50, True), identities()[2])
    foreign = sign_counter(AckCounter("subscriber", "acme", "c", 1, 1, 10, True), other)
    wrong_tenant = sign_counter(AckCounter("subscriber", "globex", "c", 1, 1, 10, True),
                                identities()[2])
    me = str(identities()[2].spiffe_id)
    assert book.add([good, foreign, wrong_tenant], peer=me) == 1
    assert book.refused == 2
    assert book.add([good], peer=str(identities()[1].spiffe_id)) == 0  # not the peer's own
    lower = sign_counter(AckCounter("subscriber", "acme", "c", 1, 3, 30, True), identities()[2])
    assert book.add([lower], peer=me) == 0  # a stale, lower counter never replaces
    assert [sc.counter.frames for sc in book.for_topic("acme", "c", 1)] == [5]
