"""``pqcnet node run`` relayer (real subprocess, real go-waku): the governance gRPC
report answers while the relayer holds frames for a customer with no subscriber.

The earlier "report times out" was not gRPC: the node's stderr was a pipe the test
stopped reading after the ``ready`` line, and httpx logged every Waku poll at INFO
(~200 B, ~10/s). After ~30 s the pipe (64 KiB) plus the reader's buffer (128 KiB) was
full and the event loop blocked in ``write(2)`` inside ``StreamHandler.emit`` (py-spy:
MainThread in ``write`` under ``WakuRestClient.messages``; grpc's poller thread idle in
``epoll_wait``), so the accepted gRPC call was never served. Two fixes, both checked
here: the node no longer logs per HTTP request, and the harness drains stderr.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pqcnet.crypto.pqc import SigningKey
from pqcnet.identity import dev_identities
from pqcnet.relayer.client import PublisherClient
from pqcnet.relayer.frame import Frame
from pqcnet.relayer.governance import VolumeFilter, pull_report, pull_volume
from pqcnet.sentry.config import verify_key_pem

from .harness import NodeProcess, namespace, write_yaml

pytestmark = [pytest.mark.services, pytest.mark.timeout(90)]
TD = "pqcnet.test"
#: seconds the node runs with frames held and the Waku poller going before the pull
HOLD_S = 4.0


async def test_report_answers_with_frames_held_for_no_subscriber(
        waku_rest_urls: list[str], tmp_path: Path) -> None:
    _ca, (relayer_id, good) = dev_identities(
        TD, f"spiffe://{TD}/ops/relayer/relayer-1", f"spiffe://{TD}/acme/publisher/good-1")
    relayer_id.save(tmp_path / "relayer-id", None)
    gov = SigningKey.generate()
    (tmp_path / "gov.pub").write_bytes(verify_key_pem(gov.public_key))
    config = write_yaml(tmp_path / "node.yaml", {
        "role": "relayer",
        "relayer": {"node_id": "relayer-1", "listen_port": 0, "identity_dir": "relayer-id",
                    "data_dir": "data", "shards": 2, "epoch_seconds": 0.5, "grpc_port": 0,
                    "high_water": 5, "low_water": 2},
        "control_plane": {"transport": "waku", "waku_rest_urls": [waku_rest_urls[0]],
                          "namespace": namespace(), "governance": {"keys": ["gov.pub"]},
                          "announce_interval_s": 1.0, "publish_reports": False},
    })
    async with NodeProcess(config) as node:
        grpc = f"127.0.0.1:{node.ready['grpc_port']}"
        try:
            pub = await PublisherClient.connect("127.0.0.1", node.ready["port"], good)
            try:  # no subscriber: the relayer holds them (backlog above high_water)
                results = await pub.publish([Frame("acme", "ch", s, b"x" * 64)
                                             for s in range(1, 21)])
                assert all(r.accepted for r in results)
            finally:
                await pub.close()
            await asyncio.sleep(HOLD_S)
            summary = await pull_volume(grpc, VolumeFilter(), deadline=5)
            assert summary.total_frames == 0  # nothing delivered, nothing metered
            rep = await pull_report(grpc, 0, deadline=5)
            assert rep.relayer_id == "relayer-1" and rep.proofs == ()
            # the harness read the node's logs while it ran ...
            assert b'"node up"' in node.stderr_so_far()
            # ... and they carry no line per Waku poll (the flood that filled the pipe)
            assert b'"logger": "httpx"' not in node.stderr_so_far()
        except BaseException:
            await node.stop()
            print(node.stderr.decode()[-8000:])
            raise
        assert await node.stop() == 0, node.stderr.decode()[-2000:]
