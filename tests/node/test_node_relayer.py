"""``pqcnet node run`` for a relayer over real go-waku nodes (a real subprocess).

Governance slashes a publisher with ``pqcnet mesh directive`` (published on another
go-waku node than the relayer's): afterwards the slashed publisher's QSTP handshake
to the running relayer is refused while another publisher still publishes. The
relayer's anchored volume proof shows up on the ``relay-reports`` topic, signed by
the relayer, with the anchor the relayer's governance gRPC report lists.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from pathlib import Path

import pytest

from pqcnet.crypto.pqc import SigningKey
from pqcnet.errors import PqcnetError
from pqcnet.identity import NodeIdentity, dev_identities
from pqcnet.mesh.envelope import EnvelopeVerifier, Keyring, MessageType, now_ms
from pqcnet.mesh.messages import RelayReport
from pqcnet.mesh.transport import topic_map
from pqcnet.mesh.waku import WakuRestClient
from pqcnet.relayer.client import PublisherClient, SubscriberClient
from pqcnet.relayer.frame import Frame
from pqcnet.relayer.governance import pull_report
from pqcnet.runtime.relay_reports import VOLUME_PROOF_KIND
from pqcnet.sentry.config import verify_key_pem

from ..relayer.e2e import Collector
from .harness import NodeProcess, namespace, run_cli, until_async, write_yaml

pytestmark = [pytest.mark.services, pytest.mark.timeout(150)]
TD = "pqcnet.test"


async def _can_connect(port: int, who: NodeIdentity) -> bool:
    try:
        client = await PublisherClient.connect("127.0.0.1", port, who)
    except PqcnetError:
        return False
    await client.close()
    return True


def _envelope_jobs(port: int) -> dict[str, float]:
    """``pqcnet_mesh_envelope_jobs_total`` by ``where``, scraped like Prometheus would."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {w: float(v) for w, v in re.findall(
        r'^pqcnet_mesh_envelope_jobs_total\{where="([^"]+)"\} (\S+)$', text, re.M)}


async def test_relayer_node_obeys_slash_and_publishes_proofs(
        waku_rest_urls: list[str], tmp_path: Path) -> None:
    _ca, (relayer_id, good, rogue, sub_id) = dev_identities(
        TD, f"spiffe://{TD}/ops/relayer/relayer-1", f"spiffe://{TD}/acme/publisher/good-1",
        f"spiffe://{TD}/acme/publisher/rogue-1", f"spiffe://{TD}/acme/subscriber/s1")
    relayer_id.save(tmp_path / "relayer-id", None)
    gov = SigningKey.generate()
    (tmp_path / "gov.pem").write_bytes(gov.to_pem())
    (tmp_path / "gov.pub").write_bytes(verify_key_pem(gov.public_key))
    ns = namespace()
    config = write_yaml(tmp_path / "node.yaml", {
        "role": "relayer",
        "relayer": {"node_id": "relayer-1", "listen_port": 0, "identity_dir": "relayer-id",
                    "data_dir": "data", "shards": 2, "epoch_seconds": 1.0, "grpc_port": 0,
                    "metrics_port": 0},
        "control_plane": {"transport": "waku", "waku_rest_urls": [waku_rest_urls[0]],
                          "namespace": ns, "governance": {"keys": ["gov.pub"]},
                          "announce_interval_s": 1.0, "report_interval_s": 0.2,
                          "metrics_port": 0},
    })
    observer = WakuRestClient(waku_rest_urls[-1])
    reports_topic = topic_map(ns)["relay-reports"]
    await observer.subscribe([reports_topic])
    ring = Keyring()
    ring.add("relayer-1", relayer_id.key.public_key, 1)
    verifier = EnvelopeVerifier(ring)
    reports: list[RelayReport] = []

    async def report_seen() -> bool:
        for m in await observer.messages(reports_topic):
            msg = verifier.accept(m.payload, now_ms())
            if msg is not None and msg.type is MessageType.RELAY_REPORT:
                reports.append(RelayReport.decode(msg.body))
        return bool(reports)

    try:
        async with NodeProcess(config) as node:
            port = node.ready["port"]
            assert node.ready["role"] == "relayer" and node.ready["node"] == "relayer-1"
            assert await _can_connect(port, rogue)
            # traffic so an epoch with volume closes and gets proven + anchored
            sub = await SubscriberClient.connect("127.0.0.1", port, sub_id)
            await sub.subscribe("acme", ())
            collector = Collector(sub)
            pub = await PublisherClient.connect("127.0.0.1", port, good)
            assert all(r.accepted for r in await pub.publish(
                [Frame("acme", "ch", s, b"x" * 64) for s in range(1, 6)]))
            await pub.close()
            await collector.wait_for(5, limit=20)
            await sub.close()

            # --- slash rogue-1 through the mesh, from another go-waku node; a directive
            # published before the relay mesh grafted may be lost, so re-issue (each is
            # a new directive) until the relayer refuses the rogue, within a bound
            async def slashed() -> bool:
                for _ in range(10):
                    if not await _can_connect(port, rogue):
                        return True
                    await asyncio.sleep(0.3)
                return False

            for _attempt in range(5):
                status, out, err = await run_cli(
                    "mesh", "directive", "--waku", waku_rest_urls[-1], "--namespace", ns,
                    "--key", str(tmp_path / "gov.pem"), "--slash", "rogue-1",
                    "--reason", "test slash")
                assert status == 0, err
                assert json.loads(out)["action"] == "slash"
                if await slashed():
                    break
            else:
                raise AssertionError("slash directive never took effect on the relayer")
            for _ in range(3):  # refused every time, not by chance
                assert not await _can_connect(port, rogue)
            pub = await PublisherClient.connect("127.0.0.1", port, good)
            try:
                results = await pub.publish([Frame("acme", "ch", 6, b"still works")])
                assert results[0].accepted
            finally:
                await pub.close()

            # --- the anchored volume proof on relay-reports
            await until_async(report_seen, 30, "a relay report on the mesh", interval=0.2)
            rep = await pull_report(f"127.0.0.1:{node.ready['grpc_port']}", 0)
            assert all(r.kind == VOLUME_PROOF_KIND for r in reports)
            assert reports[0].anchor_id in rep.receipts
            assert rep.proofs and sum(p.total_frames for p in rep.proofs) >= 5
            # every envelope it published was signed on its crypto thread (default
            # sign_threads 1), none on the loop that carries the tunnels
            jobs = _envelope_jobs(node.ready["mesh_metrics_port"])
            assert jobs.get("pool", 0) >= len(reports) + 1, jobs  # announcements too
            assert jobs.get("loop", 0) == 0, jobs
            status = await node.stop()
        assert status == 0, node.stderr.decode()[-2000:]
        logs = [json.loads(line) for line in node.stderr.decode().splitlines()
                if line.startswith("{")]
        msgs = {entry["msg"] for entry in logs}
        assert {"node up", "directive applied", "node stopped"} <= msgs, msgs
    finally:
        await observer.aclose()
