"""Client-side failover of the cluster SDK against real relayers on loopback: the
publisher moves past a relayer that is gone, with the same seqs; the cluster
subscriber listens to every relayer and shares one cursor."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest

from pqcnet.relayer.client import ClusterSubscriber, FailoverPublisher
from pqcnet.relayer.frame import Frame
from tests.relayer.e2e import identities, start_node
from tests.relayer.helpers import assert_exactly_once_in_order
from tests.relayer.proc import PQCNET

pytestmark = pytest.mark.timeout(90)


def _dead_port() -> int:
    with socket.socket() as s:  # bound then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_failover_publisher_and_cluster_subscriber(tmp_path: Path) -> None:
    node = await start_node(tmp_path)
    dead = ("127.0.0.1", _dead_port())
    live = ("127.0.0.1", node.port)
    pub = FailoverPublisher([dead, live], identities()[1], retry_delay=0.05, give_up=30)
    sub = ClusterSubscriber([dead, live], identities()[2], "acme", retry_delay=0.05)
    got: list[Frame] = []

    async def take() -> None:
        async for batch in sub.batches():
            got.extend(batch)
            if len(got) >= 60:
                await sub.ack()
                return

    task = asyncio.create_task(take())
    try:
        for first in range(1, 61, 20):
            frames = [Frame("acme", "ch", s, b"x%d" % s) for s in range(first, first + 20)]
            results = await pub.publish(frames)
            assert all(r.accepted for r in results)
        # the same seqs again (a publisher's retry after a lost answer): dedup drops them
        again = await pub.publish([Frame("acme", "ch", s, b"x%d" % s) for s in range(1, 21)],
                                  retry=True)
        assert len(again) == 20
        async with asyncio.timeout(60):
            await task
        assert pub.failovers >= 1  # the dead address was tried first
        assert_exactly_once_in_order({("acme", "ch"): [f.seq for f in got]}, {("acme", "ch"): 60})
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await pub.close()
        await sub.close()
        await node.stop()


async def test_cli_publish_and_subscribe_take_a_relayer_list(tmp_path: Path) -> None:
    """`pqcnet publish/subscribe --relayer dead,live`: the publisher fails over, the
    subscriber listens to both and gets every frame once."""
    node = await start_node(tmp_path)
    pub_dir, sub_dir = tmp_path / "pub", tmp_path / "sub"
    identities()[1].save(pub_dir, None)
    identities()[2].save(sub_dir, None)
    relayers = f"127.0.0.1:{_dead_port()},127.0.0.1:{node.port}"
    try:
        pub = await asyncio.create_subprocess_exec(
            PQCNET, "publish", "--relayer", relayers, "--identity", str(pub_dir),
            "--customer", "acme", "--channel", "ch", "--count", "40", "--batch", "10",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        out, _ = await asyncio.wait_for(pub.communicate(), 60)
        summary = json.loads(out.decode().strip().splitlines()[-1])
        assert summary["accepted"] == 40 and summary["failovers"] >= 1, summary
        sub = await asyncio.create_subprocess_exec(
            PQCNET, "subscribe", "--relayer", relayers, "--identity", str(sub_dir),
            "--customer", "acme", "--count", "40", "--timeout", "60",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        out, _ = await asyncio.wait_for(sub.communicate(), 90)
        lines = [json.loads(x) for x in out.decode().strip().splitlines()]
        assert [row["seq"] for row in lines[:-1]] == list(range(1, 41))
        assert lines[-1]["frames"] == 40
    finally:
        await node.stop()


async def test_failover_publisher_does_not_hide_a_refusal_of_its_identity(
        tmp_path: Path) -> None:
    """A slashed publisher (denied by the relayer's PeerGate) gets the refusal at once,
    not after failing over for ``give_up`` seconds."""
    from pqcnet.qstp.errors import HandshakeError
    from pqcnet.qstp.tls import PeerGate, TlsPolicy
    from pqcnet.relayer.config import RelayerConfig
    from pqcnet.relayer.node import RelayerNode
    from tests.relayer.e2e import GRANT_ALL

    relayer, pub_id, _ = identities()
    cfg = RelayerConfig(listen_port=0, data_dir=str(tmp_path / "r"), authz=GRANT_ALL)
    node = RelayerNode(cfg, relayer, TlsPolicy(gate=PeerGate((pub_id.spiffe_id.node_id,))))
    await node.start()
    try:
        pub = FailoverPublisher([("127.0.0.1", node.port)], pub_id, give_up=600.0)
        with pytest.raises(HandshakeError, match=r"\[certificate-refused\]"):
            await asyncio.wait_for(pub.publish([Frame("acme", "ch", 1, b"x")]), 120)
        await pub.close()
    finally:
        await node.stop()
