"""The relayer step of ``pqcnet demo``: publish → relayer → subscriber, metered and proven.

Starts a relayer (embedded RocksDB bus, 32 shards) with the demo's relayer identity,
publishes frames over QSTP on a few channels, receives them in order as a
subscriber, then closes the epoch: a signed volume proof is anchored in the
relayer's QS-DAG and one record's inclusion proof is checked against the anchor.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tqdm import tqdm

DEMO_FRAMES = 5_000
DEMO_CHANNELS = 5


async def step_relayer(state: Any) -> None:
    """Relay frames end to end and prove the volume (needs the demo's identities)."""
    from pqcnet.cli.demo import say
    from pqcnet.relayer.client import PublisherClient, SubscriberClient
    from pqcnet.relayer.config import RelayerConfig
    from pqcnet.relayer.frame import Frame
    from pqcnet.relayer.node import RelayerNode
    from pqcnet.relayer.proof import anchored_proof, inclusion_proof, verify_inclusion

    cfg = RelayerConfig(listen_port=0, data_dir=str(state.workdir / "relayer-data"))
    node = RelayerNode(cfg, state.identities["relayer"])
    await node.start()
    try:
        ident = state.identities["publisher"]
        sub = await SubscriberClient.connect("127.0.0.1", node.port, ident)
        await sub.subscribe("acme")
        pub = await PublisherClient.connect("127.0.0.1", node.port, ident)
        got: dict[str, list[int]] = {}
        bar = tqdm(total=DEMO_FRAMES, unit="frame", desc="relayer", disable=None)

        async def receive() -> None:
            n = 0
            async for batch in sub.batches():
                for f in batch:
                    got.setdefault(f.channel, []).append(f.seq)
                n += len(batch)
                bar.update(len(batch))
                if n >= DEMO_FRAMES:
                    await sub.ack()  # the last batch: frames are metered once acked
                    return

        t0 = time.perf_counter()
        rx = asyncio.create_task(receive())
        per = DEMO_FRAMES // DEMO_CHANNELS
        for start in range(1, per + 1, 100):
            frames = [Frame("acme", f"ch{c}", s, b"demo-payload-%d" % s)
                      for c in range(DEMO_CHANNELS) for s in range(start, start + 100)]
            await pub.publish(frames)
        await asyncio.wait_for(rx, 60)
        elapsed = time.perf_counter() - t0
        bar.close()
        in_order = all(seqs == list(range(1, per + 1)) for seqs in got.values())
        for _ in range(3000):  # ≤ 30 s: the final ack reaches the meter just after
            if sum(r.frames for r in node.meter.query()) >= DEMO_FRAMES:
                break
            await asyncio.sleep(0.01)
        proofs = node.prove_closed_epochs(now=time.time() + 2 * cfg.epoch_seconds)
        proof = proofs[-1]
        anchored = anchored_proof(node.anchor.ledger, node.anchor.receipts[proof.epoch])
        verify_inclusion(proof.records[0], inclusion_proof(proof, 0), anchored)
        say("relayer: publish -> bus -> subscriber", backend="embedded RocksDB, 32 shards",
            frames=f"{DEMO_FRAMES} on {DEMO_CHANNELS} channels",
            rate=f"{DEMO_FRAMES / elapsed:,.0f} frames/s",
            in_order_exactly_once="yes" if in_order else "NO",
            metered=f"{sum(p.total_frames for p in proofs)} frames, "
                    f"{sum(p.total_bytes for p in proofs)} bytes",
            volume_proof=f"root {proof.root.hex()[:16]}... anchored in QS-DAG, inclusion ok")
        await pub.close()
        await sub.close()
    finally:
        await node.stop()
