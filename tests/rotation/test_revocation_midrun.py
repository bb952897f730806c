"""Revoking a publisher mid-run: its tunnel ends within the CRL refresh interval with
a GOAWAY naming the reason, it cannot connect again, and the other publisher and the
subscriber are unaffected (no failed publish, no lost or duplicated frame).

Real parts: the CA service (`/v1/revoke`, `/v1/crl` over PQ TLS), a relayer on the
embedded bus, the SDK publisher/subscriber over QSTP on loopback. The relayer's
IdentityManager fetches the CRL every second; bounds are several intervals.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from pqcnet.qstp.errors import HandshakeError, TunnelClosed
from pqcnet.relayer.client import PublisherClient, SubscriberClient
from pqcnet.relayer.config import RelayerConfig
from pqcnet.relayer.frame import Frame
from pqcnet.relayer.node import RelayerNode
from pqcnet.runtime import enroll as client
from pqcnet.runtime.rotation import IdentityManager, RotationConfig, bind_relayer
from tests.ca.conftest import TD, start_service

pytestmark = pytest.mark.timeout(180)


async def test_revoked_publisher_is_cut_off_and_others_carry_on(tmp_path: Path) -> None:
    svc = await start_service(tmp_path / "ca")
    ca = svc.ca
    relayer_id = ca.issue(f"spiffe://{TD}/acme/relayer/r1")
    good_id = ca.issue(f"spiffe://{TD}/acme/publisher/good")
    bad_id = ca.issue(f"spiffe://{TD}/acme/publisher/bad")
    sub_id = ca.issue(f"spiffe://{TD}/acme/subscriber/s1")
    admin = ca.issue(f"spiffe://{TD}/ops/admin/a1")
    relayer_dir = tmp_path / "relayer-id"
    relayer_id.save(relayer_dir, None)
    node = RelayerNode(RelayerConfig(listen_port=0, data_dir=str(tmp_path / "relayer"),
                                     shards=4), relayer_id)
    await node.start()
    manager = IdentityManager(relayer_dir, lambda: relayer_id, lambda _i: None,
                              initial=relayer_id, config=RotationConfig(
                                  poll_s=0.5, crl_url=svc.url, crl_refresh_s=1.0,
                                  rotate_key=False))
    await bind_relayer(node, manager)
    port = node.port
    sub = await SubscriberClient.connect("127.0.0.1", port, sub_id)
    await sub.subscribe("acme")
    got: list[tuple[str, int]] = []

    async def collect() -> None:
        async for batch in sub.batches():
            got.extend((f.channel, f.seq) for f in batch)

    collector = asyncio.create_task(collect())
    good = await PublisherClient.connect("127.0.0.1", port, good_id)
    bad = await PublisherClient.connect("127.0.0.1", port, bad_id)
    sent = {"good": 0, "bad": 0}
    bad_error: list[BaseException] = []

    async def pump(name: str, pub: PublisherClient, stop: asyncio.Event) -> None:
        seq = 0
        while not stop.is_set():
            seq += 1
            try:
                await pub.publish([Frame("acme", name, seq, b"x" * 64)])
            except (TunnelClosed, HandshakeError) as exc:
                bad_error.append(exc)
                return
            sent[name] = seq
            await asyncio.sleep(0.01)

    stop = asyncio.Event()
    pumps = [asyncio.create_task(pump("good", good, stop)),
             asyncio.create_task(pump("bad", bad, stop))]
    try:
        await asyncio.sleep(2.0)
        assert sent["good"] > 0 and sent["bad"] > 0
        await client.revoke(svc.url, admin, serial=bad_id.serial, reason="key_compromise")
        revoked_at = asyncio.get_running_loop().time()
        # CRL refresh 1 s + poll 0.5 s, generously
        await asyncio.wait_for(asyncio.shield(pumps[1]), 15)
        cut_after = asyncio.get_running_loop().time() - revoked_at
        assert cut_after < 15
        assert bad_error, "the revoked publisher's pump ended without an error"
        goaway = bad.tunnel.goaway  # the GOAWAY names why
        assert goaway is not None and goaway.reason == "peer certificate revoked", goaway
        # a new connect is refused at the handshake
        with pytest.raises(HandshakeError, match="revoked"):
            again = await PublisherClient.connect("127.0.0.1", port, bad_id)
            await again.publish([Frame("acme", "bad", 10_000, b"x")])
        # the good publisher keeps going
        before = sent["good"]
        await asyncio.sleep(1.5)
        assert sent["good"] > before and not pumps[0].done()
    finally:
        stop.set()
        await asyncio.gather(*pumps, return_exceptions=True)
    # every acknowledged frame of the good publisher arrives once, in order
    async with asyncio.timeout(30):
        while len([s for c, s in got if c == "good"]) < sent["good"]:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    goods = [s for c, s in got if c == "good"]
    assert goods == list(range(1, sent["good"] + 1))
    bads = [s for c, s in got if c == "bad"]
    assert len(bads) == len(set(bads)) and bads == sorted(bads)
    collector.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await collector
    for c in (good, bad):
        await c.close()
    await sub.close()
    await manager.stop()
    await node.stop()
    await svc.service.close()
    svc.ledger.close()
