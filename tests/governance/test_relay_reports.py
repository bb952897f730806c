"""A real relayer's anchored volume proofs published on the control plane and checked
against the QS-DAG by governance's slashing indexer (in-process and over go-waku)."""

from __future__ import annotations

import dataclasses
import time
import uuid
from pathlib import Path

import pytest

from pqcnet.identity import MeshCA
from pqcnet.mesh.messages import RelayReport, SlashingProposal
from pqcnet.mesh.qsdag_port import QsdagPort
from pqcnet.mesh.slashing import SlashingIndexer
from pqcnet.mesh.transport import InProcessHub, InProcessTransport, Transport
from pqcnet.mesh.waku import WakuTransport
from pqcnet.qsdag import Ledger
from pqcnet.relayer.client import PublisherClient, SubscriberClient
from pqcnet.relayer.config import RelayerConfig
from pqcnet.relayer.frame import Frame
from pqcnet.relayer.node import RelayerNode
from pqcnet.runtime.relay_reports import VOLUME_PROOF_KIND, RelayReportPublisher

from ..mesh.harness import FAST, make_agents, node_key, stop_all, until
from ..relayer.e2e import Collector

pytestmark = pytest.mark.timeout(120)
TD = "pqcnet.test"


async def _scenario(transports: list[Transport], tmp: Path, limit_s: float,
                    namespace: str = "") -> None:
    ca = MeshCA.create(TD)
    relayer_id = ca.issue(f"spiffe://{TD}/ops/relayer/relayer-1", key=node_key("relayer-1"))
    pub_id = ca.issue(f"spiffe://{TD}/acme/publisher/p1")
    sub_id = ca.issue(f"spiffe://{TD}/acme/subscriber/s1")
    gov_ledger = Ledger.open(tmp / "ledger-gov")
    gov_ledger.init_genesis("pqcnet-test", "gov", node_key("gov"))
    gov_ledger.register_author("relayer-1", node_key("relayer-1").public_key,
                               registrar="gov", signer=node_key("gov"))
    seed = Ledger.open(tmp / "ledger-relayer")  # the relayer joins the same DAG
    seed.import_(gov_ledger.export(gov_ledger.tips()))
    seed.close()
    node = RelayerNode(RelayerConfig(node_id="relayer-1", listen_port=0, shards=4,
                                     data_dir=str(tmp / "relayer"),
                                     ledger_dir=str(tmp / "ledger-relayer"),
                                     ledger_dev_genesis=False), relayer_id)
    cfg = dataclasses.replace(FAST, namespace=namespace)
    gov, r_agent = agents = make_agents(["gov", "relayer-1"], transports, tmp, config=cfg)
    got: list[tuple[RelayReport, str, list[SlashingProposal]]] = []
    indexer = SlashingIndexer(gov_ledger)
    gov.report_listeners.append(lambda rep, s: got.append((rep, s, indexer.check_report(rep, s))))
    sub: Collector | None = None
    try:
        await node.start()
        gov.ledger = QsdagPort(gov_ledger, gov.keys)
        r_agent.ledger = QsdagPort(node.anchor.ledger, r_agent.keys)
        for a in agents:
            await a.start()
        await until(lambda: all(len(a.peers.live(a.clock())) == 1 for a in agents), limit_s,
                    "mesh")
        client = await SubscriberClient.connect("127.0.0.1", node.port, sub_id)
        await client.subscribe("acme", ())
        sub = Collector(client)
        pub = await PublisherClient.connect("127.0.0.1", node.port, pub_id)
        results = await pub.publish([Frame("acme", "ch", s, b"x" * s) for s in range(1, 11)])
        assert all(r.accepted for r in results)
        await pub.close()
        await sub.wait_for(10)
        # frames count once the subscriber's ack reaches the relayer, just after the read
        await until(lambda: sum(r.frames for r in node.meter.query()) == 10, limit_s,
                    "subscriber acks metered")
        proofs = node.prove_closed_epochs(now=time.time() + 2 * node.cfg.epoch_seconds)
        assert proofs and sum(p.total_frames for p in proofs) == 10
        anchors = [node.anchor.receipts[p.epoch] for p in proofs]
        await until(lambda: all(gov_ledger.has(a) for a in anchors), limit_s,
                    "anchors synced to governance")
        publisher = RelayReportPublisher(node, r_agent)
        assert await publisher.publish_new() == len(proofs)
        assert await publisher.publish_new() == 0  # each proof once
        await until(lambda: len(got) == len(proofs), limit_s, "reports delivered")
        assert all(rep.kind == VOLUME_PROOF_KIND and s == "relayer-1" and proposals == []
                   for rep, s, proposals in got)
        # a report that does not match its anchor becomes a slashing proposal
        lie = RelayReport(VOLUME_PROOF_KIND, got[0][0].payload + b"!", anchors[0])
        await r_agent.publish_report(lie)
        await until(lambda: len(got) == len(proofs) + 1, limit_s, "lie delivered")
        [proposal] = got[-1][2]
        assert proposal.target == "relayer-1" and proposal.kind == "volume_mismatch"
    finally:
        if sub is not None:
            await sub.close()
        await stop_all(agents)
        await node.stop()
        gov_ledger.close()


async def test_relay_reports_in_process(tmp_path: Path) -> None:
    hub = InProcessHub()
    await _scenario([InProcessTransport(hub) for _ in range(2)], tmp_path, 20)


@pytest.mark.services
async def test_relay_reports_over_go_waku(waku_rest_urls: list[str], tmp_path: Path) -> None:
    ts = [WakuTransport.connect(u, timeout_s=3.0, retries=2, poll_interval_s=0.03)
          for u in (waku_rest_urls[0], waku_rest_urls[-1])]
    await _scenario(list(ts), tmp_path, 40, namespace="r" + uuid.uuid4().hex[:10])


