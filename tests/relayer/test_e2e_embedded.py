"""End to end over real QSTP tunnels on loopback, embedded backend: ordering and
exactly-once with concurrent publishers, bad input, metering = delivered, proof
against the QS-DAG anchor, and governance gRPC = Prometheus."""

from __future__ import annotations

import asyncio
import re
import struct
from pathlib import Path

import httpx
import pytest

from pqcnet.relayer.client import RelayerRefused
from pqcnet.relayer.errors import FieldMissing, FieldTooLarge, SeqNotMonotonic
from pqcnet.relayer.frame import Frame
from pqcnet.relayer.governance import VolumeFilter, pull_report, pull_volume
from pqcnet.relayer.proof import anchored_proof, inclusion_proof, verify_inclusion, verify_report
from pqcnet.relayer.wire import MessageReader, MessageTooLarge, ServerError, decode_server, pack
from tests.relayer.e2e import Collector, publisher, start_node, subscriber
from tests.relayer.helpers import assert_exactly_once_in_order, eventually

pytestmark = pytest.mark.timeout(120)


async def test_publish_subscribe_exactly_once_metering_and_governance(tmp_path: Path) -> None:
    node = await start_node(tmp_path, metrics_port=0, grpc_port=0)
    subs: list[Collector] = []
    pubs = []
    try:
        subs = [await subscriber(node.port, f"cust{c}") for c in range(3)]
        topics = [(f"cust{i % 3}", f"ch{i}") for i in range(12)]
        n = 50
        pubs = [await publisher(node.port) for _ in range(4)]

        async def run_pub(k: int) -> None:
            mine = topics[k::4]
            for start in range(1, n + 1, 10):
                frames = [Frame(c, ch, s, f"{c}/{ch}/{s}".encode() * 3)
                          for c, ch in mine for s in range(start, start + 10)]
                results = await pubs[k].publish(frames)
                assert all(r.accepted for r in results), results[:3]
                if start == 21:  # retry a batch already sent: must be suppressed
                    again = await pubs[k].publish(frames, retry=True)
                    assert all(r.accepted for r in again)

        await asyncio.gather(*(run_pub(k) for k in range(4)))
        for c in range(3):
            await subs[c].wait_for(4 * n)
        await asyncio.sleep(0.3)
        for c in range(3):
            assert_exactly_once_in_order(
                subs[c].by_topic, {t: n for t in topics if t[0] == f"cust{c}"})
        dups = sum(w.stats.duplicates for w in node.workers)
        assert dups == 12 * 10  # each topic's retried batch of 10, all suppressed
        assert sum(s.client.duplicates_dropped for s in subs) == 0

        # metering equals what subscribers actually received
        delivered = [f for s in subs for f in s.frames]
        metered = node.meter.query()
        assert sum(r.bytes for r in metered) == sum(len(f.payload) for f in delivered)
        assert sum(r.frames for r in metered) == len(delivered)

        # governance pull == Prometheus scrape
        target = f"127.0.0.1:{node.grpc_port}"
        summary = await pull_volume(target, VolumeFilter())
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"http://127.0.0.1:{node.metrics_port}/metrics")).text
        prom_bytes = sum(float(v) for v in re.findall(
            r'^pqcnet_relayer_volume_bytes_total\{[^}]*\} (\S+)$', text, re.M))
        prom_frames = sum(float(v) for v in re.findall(
            r'^pqcnet_relayer_volume_frames_total\{[^}]*\} (\S+)$', text, re.M))
        assert (summary.total_bytes, summary.total_frames) == (prom_bytes, prom_frames)
        assert summary.total_frames == len(delivered)
        one = await pull_volume(target, VolumeFilter(customer="cust1", channel="ch1"))
        assert one.total_frames == n
        assert "pqcnet_relayer_duplicates_frames_total 120.0" in text

        # epoch end: proof anchored in the QS-DAG; every record proves against the anchor
        import time

        proofs = node.prove_closed_epochs(now=time.time() + 2 * node.cfg.epoch_seconds)
        assert proofs and sum(p.total_frames for p in proofs) == len(delivered)
        for p in proofs:
            anchored = anchored_proof(node.anchor.ledger, node.anchor.receipts[p.epoch])
            for i, rec in enumerate(p.records):
                verify_inclusion(rec, inclusion_proof(p, i), anchored)
        report = await pull_report(target)
        verify_report(report, node.identity.key.public_key)
        assert [p.epoch for p in report.proofs] == [p.epoch for p in proofs]
    finally:
        for s in subs:
            await s.close()
        for p in pubs:
            await p.close()
        await node.stop()


async def test_bad_input_gets_typed_errors_and_hurts_nobody_else(tmp_path: Path) -> None:
    node = await start_node(tmp_path, max_payload=64)
    sub = await subscriber(node.port, "good")
    bad = await publisher(node.port)
    good = await publisher(node.port)
    try:
        ok = await bad.publish([Frame("c", "x", 1, b"ok")])
        assert ok[0].accepted
        res = await bad.publish([
            Frame("", "x", 1, b"p"),              # missing customer
            Frame("c", "x", 2, b"y" * 65),       # oversized payload
            Frame("c", "x", 1, b"again"),         # non-monotonic, no retry flag
            Frame("c", "x", 0, b"p"),             # seq missing / zero
            Frame("c", "x", 2, b"fine"),          # valid, in the same request
        ])
        codes = [r.code for r in res]
        assert codes[:4] == [FieldMissing.code, FieldTooLarge.code, SeqNotMonotonic.code,
                             FieldMissing.code]
        assert [r.accepted for r in res] == [False, False, False, False, True]
        assert "customer" in res[0].reason and "payload" in res[1].reason

        # garbage on the stream: a request-level error, the stream keeps working
        await bad.send_raw(pack(b"\xff\xff\xff"))
        with pytest.raises(RelayerRefused, match="relayer error 10"):
            # the ErrorReply for the garbage answers the oldest outstanding request
            await bad.publish([Frame("c", "x", 3, b"p")])
        assert (await bad.publish([Frame("c", "x", 3, b"p")], retry=True))[0].accepted

        # an oversized length prefix on a raw second stream resets only that stream
        raw = bad.tunnel.open_stream()
        await raw.send(struct.pack(">I", 1 << 30))
        bodies = MessageReader().feed(await raw.recv())
        err = decode_server(bodies[0])
        assert isinstance(err, ServerError) and err.code == MessageTooLarge.code

        # the other publisher and the same tunnel still work
        for s in range(1, 21):
            assert (await good.publish([Frame("good", "g", s, b"x")]))[0].accepted
        await sub.wait_for(20)
        assert sub.by_topic[("good", "g")] == list(range(1, 21))
        assert (await bad.publish([Frame("c", "x", 4, b"p")]))[0].accepted
    finally:
        await sub.close()
        await bad.close()
        await good.close()
        await node.stop()


async def test_subscriber_dropping_mid_stream_loses_nothing(tmp_path: Path) -> None:
    """A subscriber's tunnel dies mid-delivery, twice; the worker survives, holds the
    frames, and the reconnected subscriber gets the rest, each seq once, in order."""
    from tests.relayer.resilient import ResilientPublisher, ResilientSubscriber

    node = await start_node(tmp_path)
    port = node.port
    topics = [("acme", f"ch{i}") for i in range(4)]
    n = 600
    sub = ResilientSubscriber(lambda: port, "acme")
    pub = ResilientPublisher(lambda: port, topics, n, batch=10, pace=0.005)
    try:
        for cut in (400, 1200):
            await eventually(lambda c=cut: sub.total() >= c)
            for s in list(node.ingress.sessions):  # kill the subscriber's tunnel(s) only
                if not s.shards:
                    await s.tunnel.close()
        await asyncio.wait_for(pub.task, 60)
        await sub.wait_for(len(topics) * n, 60)
        assert_exactly_once_in_order(sub.by_topic, {t: n for t in topics})
        # (whether a cut hits an in-flight batch is timing; the worker-level test covers it)
        assert all(not t.done() for t in node._tasks)
    finally:
        await sub.close()
        pub.task.cancel()
        await node.stop()
