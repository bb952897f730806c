"""Signing and sealing on the crypto pool's threads keeps the envelope counter order.

The counter is what receivers' replay windows check; taking it in a worker thread
would race (two envelopes with one counter) or follow the threads' finishing order.
These tests publish many messages at once through a :class:`Publisher` with a
:class:`CryptoPool` over real go-waku nodes and check, from the receiver's side,
that every envelope was accepted and that the counters increase strictly in the
order the publishes were called.
"""

from __future__ import annotations

import asyncio
import itertools
import struct
import threading
import uuid

import pytest

from pqcnet.crypto.pqc import SigningKey
from pqcnet.mesh.envelope import (
    ControlMessage,
    EnvelopeSigner,
    EnvelopeVerifier,
    Keyring,
    MessageType,
    NodeKeys,
    now_ms,
)
from pqcnet.mesh.errors import ConfigError, TransportClosed
from pqcnet.mesh.offload import MAX_PENDING_LIMIT, CryptoPool
from pqcnet.mesh.publisher import Publisher
from pqcnet.mesh.transport import InProcessHub, InProcessTransport, Transport
from pqcnet.mesh.waku import WakuTransport

from .harness import node_key, until

N = 120
_IDX = struct.Struct(">I")


async def _burst(pub_t: Transport, sub_t: Transport, *, sealed: bool,
                 settle_s: float, inline_when_alone: bool = True,
                 ) -> tuple[list[ControlMessage], EnvelopeVerifier, Publisher, int]:
    """``N`` concurrent publishes through a pooled Publisher; what the receiver got."""
    sender = NodeKeys("offload-sender", node_key("offload-sender"))
    receiver = NodeKeys("offload-receiver", node_key("offload-receiver"))
    ring = Keyring()
    ring.add(sender.node_id, sender.signing_key.public_key, 1)
    verifier = EnvelopeVerifier(ring, [receiver.recipient_key])
    pool = CryptoPool(threads=2, max_pending=4)
    publisher = Publisher(pub_t, EnvelopeSigner(sender), namespace="o" + uuid.uuid4().hex[:8],
                          crypto=pool, inline_when_alone=inline_when_alone)
    topic = publisher.inbox(receiver.node_id) if sealed else publisher.topics["routes"]
    sub = await sub_t.subscribe([topic])
    await asyncio.sleep(settle_s)  # let the relay mesh graft the topic's shard
    peak = 0
    sampling = True

    async def sample() -> None:
        nonlocal peak
        while sampling:
            peak = max(peak, pool.in_flight)
            await asyncio.sleep(0)

    sampler = asyncio.create_task(sample())

    async def one(i: int) -> None:
        body = _IDX.pack(i)
        if sealed:
            await publisher.send_sealed(receiver.node_id, receiver.recipient_key.public,
                                        MessageType.RELAY_REPORT, body)
        else:
            await publisher.publish(topic, MessageType.ROUTE_ADVERTISEMENT, body)

    try:
        # started in index order: publish i is called before publish i+1
        await asyncio.gather(*(one(i) for i in range(N)))
        got: list[ControlMessage] = []
        async with asyncio.timeout(60):
            while len(got) + sum(verifier.drops.values()) < N:
                m = await sub.get()
                msg = verifier.accept(m.payload, now_ms())
                if msg is not None:
                    got.append(msg)
    finally:
        sampling = False
        await sampler
        sub.close()
        pool.close()
    return got, verifier, publisher, peak


def _check(got: list[ControlMessage], verifier: EnvelopeVerifier, publisher: Publisher,
           peak: int, *, sealed: bool) -> None:
    pool = publisher.crypto
    assert pool is not None
    assert not verifier.drops, f"receiver dropped {dict(verifier.drops)}"
    assert len(got) == N
    by_index = {_IDX.unpack(m.body)[0]: m for m in got}
    assert sorted(by_index) == list(range(N))
    counters = [by_index[i].counter for i in range(N)]
    assert all(a < b for a, b in itertools.pairwise(counters)), \
        "counters are not strictly increasing in publish order"
    assert all(m.sealed is sealed for m in got)
    # over Waku the first publish was alone and signed inline, the rest overlapped on the
    # threads; in process (inline_when_alone off) every one went through the threads
    inline = 1 if publisher.inline_when_alone else 0
    assert publisher.inline_alone == inline and pool.completed == N - inline
    assert 1 <= peak <= pool.max_pending


@pytest.mark.services
@pytest.mark.timeout(120)
@pytest.mark.parametrize("sealed", [True, False], ids=["sealed", "signed"])
async def test_concurrent_publishes_over_go_waku_keep_counter_order(
        waku_rest_urls: list[str], sealed: bool) -> None:
    pub_t = WakuTransport.connect(waku_rest_urls[0], timeout_s=5.0, poll_interval_s=0.02)
    sub_t = WakuTransport.connect(waku_rest_urls[-1], timeout_s=5.0, poll_interval_s=0.02)
    try:
        got, verifier, publisher, peak = await _burst(pub_t, sub_t, sealed=sealed,
                                                      settle_s=1.0)
    finally:
        await pub_t.close()
        await sub_t.close()
    _check(got, verifier, publisher, peak, sealed=sealed)


async def test_concurrent_publishes_in_process_keep_counter_order() -> None:
    hub = InProcessHub()
    got, verifier, publisher, peak = await _burst(
        InProcessTransport(hub), InProcessTransport(hub), sealed=True, settle_s=0.0,
        inline_when_alone=False)
    _check(got, verifier, publisher, peak, sealed=True)


async def test_work_runs_on_the_pool_threads_and_the_key_is_the_reserved_one() -> None:
    keys = NodeKeys("rekeyed", node_key("rekeyed"))
    signer = EnvelopeSigner(keys)
    old_public = keys.signing_key.public_key
    pool = CryptoPool(threads=1, max_pending=1)
    try:
        unsigned = signer.reserve(MessageType.DAG_TIPS, b"tips", now_ms=now_ms())
        signer.rekey(SigningKey.generate(), 2)  # a forced rekey before the thread signs
        names: list[str] = []

        def job() -> bytes:
            names.append(threading.current_thread().name)
            return unsigned.wire()

        wire = await pool.run(job)
        assert names[0].startswith("pqcnet-crypto") and names[0] != \
            threading.current_thread().name
        ring = Keyring()
        ring.add("rekeyed", old_public, 1)  # signed with the key current at reservation
        msg = EnvelopeVerifier(ring).open(wire, now_ms())
        assert msg.key_version == 1 and msg.counter == unsigned.counter
        nxt = signer.reserve(MessageType.DAG_TIPS, b"tips", now_ms=now_ms())
        assert nxt.counter == unsigned.counter + 1  # counters continue across the rekey
    finally:
        pool.close()
    with pytest.raises(TransportClosed):
        await pool.run(lambda: b"")


async def test_counters_are_taken_at_the_call_not_in_the_threads() -> None:
    """With every worker thread busy, publishes already hold their counters (in call
    order); when the threads free up, the receiver accepts them all."""
    hub = InProcessHub()
    sender = NodeKeys("gated", node_key("gated"))
    receiver = NodeKeys("gated-rx", node_key("gated-rx"))
    ring = Keyring()
    ring.add(sender.node_id, sender.signing_key.public_key, 1)
    verifier = EnvelopeVerifier(ring, [receiver.recipient_key])
    signer = EnvelopeSigner(sender)
    pool = CryptoPool(threads=2, max_pending=8)
    publisher = Publisher(InProcessTransport(hub), signer, crypto=pool,
                          inline_when_alone=False)
    sub = await InProcessTransport(hub).subscribe([publisher.inbox(receiver.node_id)])
    gate = threading.Event()
    gates = [asyncio.create_task(pool.run(gate.wait)) for _ in range(2)]
    try:
        await until(lambda: pool.in_flight == 2, what="both threads held")
        start = signer.counter
        sends = [asyncio.create_task(publisher.send_sealed(
            receiver.node_id, receiver.recipient_key.public, MessageType.RELAY_REPORT,
            _IDX.pack(i))) for i in range(20)]
        await asyncio.sleep(0.05)
        assert signer.counter == start + 20  # reserved on the loop, threads still busy
        assert not any(t.done() for t in sends)
        gate.set()
        await asyncio.gather(*gates, *sends)
        msgs = [verifier.accept((await sub.get()).payload, now_ms()) for _ in range(20)]
        assert None not in msgs and not verifier.drops
        order = {_IDX.unpack(m.body)[0]: m.counter for m in msgs if m is not None}
        assert [order[i] for i in range(20)] == list(range(start + 1, start + 21))
    finally:
        gate.set()
        sub.close()
        pool.close()


async def test_a_lone_publish_signs_inline() -> None:
    """One publish at a time gains nothing from a thread hop: it is signed on the loop."""
    hub = InProcessHub()
    keys = NodeKeys("alone", node_key("alone"))
    pool = CryptoPool(threads=2)
    publisher = Publisher(InProcessTransport(hub), EnvelopeSigner(keys), crypto=pool)
    sub = await InProcessTransport(hub).subscribe([publisher.topics["routes"]])
    try:
        for i in range(3):
            await publisher.publish(publisher.topics["routes"], MessageType.ROUTE_ADVERTISEMENT,
                                    _IDX.pack(i))
        assert publisher.inline_alone == 3 and pool.completed == 0
        assert publisher.in_progress == 0
        assert sub.pending == 3
    finally:
        sub.close()
        pool.close()


def test_pool_bounds_are_checked() -> None:
    for threads, pending in ((0, 4), (2, 0), (2, MAX_PENDING_LIMIT + 1)):
        with pytest.raises(ConfigError):
            CryptoPool(threads, pending)
