"""``pqcnet node run`` relayer (real subprocess, real go-waku): a forced rekey of the
running relayer, and a slash that survives a restart.

* ``pqcnet mesh directive --rekey relayer-1``: a new publisher tunnel sees the new
  certificate key, publishing still works, and the next volume proof is signed by the
  new key and anchored under key version 2 in the relayer's QS-DAG. A subscriber takes
  the frames: only delivered frames are metered, so without one no epoch has volume
  (and the governance report was then seen to time out — see the README, Relayer).
* ``--slash rogue-1`` (rogue-1 registered in the ledger, so the slash is anchored
  there), then restart: the rogue's handshake is refused at once, with no directive
  after the restart (the gate is seeded from the QS-DAG); the restarted node presents
  the rotated key (written back to ``identity_dir``) and anchors its next proof.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from pqcnet.crypto.pqc import SigningKey, VerifyKey
from pqcnet.errors import PqcnetError
from pqcnet.identity import NodeIdentity, dev_identities
from pqcnet.qsdag import Ledger
from pqcnet.relayer.client import PublisherClient, SubscriberClient
from pqcnet.relayer.frame import Frame
from pqcnet.relayer.governance import pull_report
from pqcnet.relayer.proof import VolumeProof, verify_volume_proof
from pqcnet.runtime.governance import peer_key
from pqcnet.sentry.config import verify_key_pem

from ..relayer.e2e import Collector
from .harness import NodeProcess, namespace, run_cli, until_async, write_yaml
from .test_node_relayer import _can_connect

pytestmark = [pytest.mark.services, pytest.mark.timeout(150)]
TD = "pqcnet.test"


async def _server_key(port: int, who: NodeIdentity) -> VerifyKey:
    client = await PublisherClient.connect("127.0.0.1", port, who)
    try:
        return peer_key(client.tunnel)
    finally:
        await client.close()


async def _directive(waku: str, ns: str, gov: Path, *args: str,
                     effect: Callable[[], Awaitable[bool]]) -> None:
    """Issue until it took effect (a directive sent before the relay mesh grafted may be
    lost; each re-issue is a new directive), within a bound."""
    for _attempt in range(5):
        status, _out, err = await run_cli("mesh", "directive", "--waku", waku, "--namespace",
                                          ns, "--key", str(gov), *args)
        assert status == 0, err
        try:
            await until_async(effect, 3, f"directive {args}", interval=0.2)
            return
        except AssertionError:
            continue
    raise AssertionError(f"directive {args} never took effect")


async def test_relayer_forced_rekey_and_slash_survive_restart(
        waku_rest_urls: list[str], tmp_path: Path) -> None:
    ca, (relayer_id, good, rogue, sub_id) = dev_identities(
        TD, f"spiffe://{TD}/ops/relayer/relayer-1", f"spiffe://{TD}/acme/publisher/good-1",
        f"spiffe://{TD}/acme/publisher/rogue-1", f"spiffe://{TD}/acme/subscriber/s1")
    relayer_id.save(tmp_path / "relayer-id", None)
    ca.save(tmp_path / "ca", None)
    with Ledger.open(tmp_path / "data" / "ledger") as ledger:  # rogue-1 is a known author
        ledger.init_genesis("pqcnet-dev", "relayer-1", relayer_id.key)
        ledger.register_author("rogue-1", rogue.key.public_key, registrar="relayer-1",
                               signer=relayer_id.key)
    gov = SigningKey.generate()
    (tmp_path / "gov.pem").write_bytes(gov.to_pem())
    (tmp_path / "gov.pub").write_bytes(verify_key_pem(gov.public_key))
    ns, waku = namespace(), waku_rest_urls[-1]
    config = write_yaml(tmp_path / "node.yaml", {
        "role": "relayer",
        "relayer": {"node_id": "relayer-1", "listen_port": 0, "identity_dir": "relayer-id",
                    "data_dir": "data", "shards": 2, "epoch_seconds": 0.5, "grpc_port": 0},
        "control_plane": {"transport": "waku", "waku_rest_urls": [waku_rest_urls[0]],
                          "namespace": ns, "governance": {"keys": ["gov.pub"]},
                          "announce_interval_s": 1.0, "publish_reports": False,
                          "ca_dir": "ca"},
    })
    old_id = relayer_id.key.public_key.key_id
    async with NodeProcess(config) as node:
        port, grpc = node.ready["port"], f"127.0.0.1:{node.ready['grpc_port']}"
        assert (await _server_key(port, good)).key_id == old_id
        assert await _can_connect(port, rogue)

        async def refused() -> bool:
            return not await _can_connect(port, rogue)

        await _directive(waku, ns, tmp_path / "gov.pem", "--slash", "rogue-1",
                         "--reason", "test", effect=refused)

        new_key: list[VerifyKey] = []

        async def rekeyed() -> bool:
            try:  # a handshake racing the GOAWAY / re-listen is refused: poll again
                key = await _server_key(port, good)
            except PqcnetError:
                return False
            new_key[:] = [key]
            return key.key_id != old_id

        await _directive(waku, ns, tmp_path / "gov.pem", "--rekey", "relayer-1",
                         effect=rekeyed)
        # only delivered frames are metered: a subscriber takes the 3 frames
        sub = await SubscriberClient.connect("127.0.0.1", port, sub_id)
        await sub.subscribe("acme", ())
        collector = Collector(sub)
        pub = await PublisherClient.connect("127.0.0.1", port, good)  # same port, new cert
        try:
            assert peer_key(pub.tunnel).key_id == new_key[0].key_id
            results = await pub.publish([Frame("acme", "ch", s, b"x" * 32) for s in (1, 2, 3)])
            assert all(r.accepted for r in results)
        finally:
            await pub.close()
        await collector.wait_for(3, limit=20)
        await sub.close()

        proofs: list[tuple[VolumeProof, bytes]] = []

        async def proven() -> bool:  # the epoch holding the 3 frames, proven after rekey
            rep = await pull_report(grpc, 0)
            proofs[:] = [(p, rep.receipts[i]) for i, p in enumerate(rep.proofs)
                         if p.total_frames >= 3]
            return bool(proofs)

        try:
            await until_async(proven, 30, "a volume proof after the rekey", interval=0.2)
        except BaseException:
            await node.stop()  # the node's own logs, without the Waku polling lines
            print("\n".join(x for x in node.stderr.decode().splitlines()
                            if '"httpx"' not in x)[-8000:])
            raise
        assert await node.stop() == 0, node.stderr.decode()[-2000:]
    proof, vid = proofs[-1]
    verify_volume_proof(proof, new_key[0])
    with Ledger.open(tmp_path / "data" / "ledger") as ledger:
        vertex = ledger.get(vid)
        assert vertex.author == "relayer-1" and vertex.key_version == 2
        registered = ledger.key_for("relayer-1", 2)
        assert registered is not None and registered.key_id == new_key[0].key_id
        assert ledger.is_slashed("rogue-1")

    # --- restart: no directive now, yet the rogue stays refused; others still connect;
    # the node presents the rotated key (written back to identity_dir) and its next
    # proof is anchored under it
    rotated = NodeIdentity.load(tmp_path / "relayer-id", None)
    assert rotated.key.public_key.key_id == new_key[0].key_id
    # the CA recorded the certificate it issued for the new key (it did not: `ca revoke
    # --spiffe-id` and the live-node count missed it), read from its journal
    journal = (tmp_path / "ca" / "ca-issued.jsonl").read_text().splitlines()
    assert format(rotated.serial, "x") in {json.loads(x).get("serial") for x in journal}
    async with NodeProcess(config) as node:
        port, grpc = node.ready["port"], f"127.0.0.1:{node.ready['grpc_port']}"
        assert (await _server_key(port, good)).key_id == new_key[0].key_id
        for _ in range(3):
            assert not await _can_connect(port, rogue)
        sub = await SubscriberClient.connect("127.0.0.1", port, sub_id)
        await sub.subscribe("acme", ())
        collector = Collector(sub)
        pub = await PublisherClient.connect("127.0.0.1", port, good)
        try:
            results = await pub.publish([Frame("acme", "ch2", s, b"y" * 32) for s in (1, 2)])
            assert all(r.accepted for r in results)
        finally:
            await pub.close()
        await collector.wait_for(2, limit=20)
        await sub.close()
        seen = {p.epoch for p, _vid in proofs}

        async def proven_again() -> bool:  # a proof made after the restart
            rep = await pull_report(grpc, 0)
            proofs[:] = [(p, rep.receipts[i]) for i, p in enumerate(rep.proofs)
                         if p.epoch not in seen]
            return bool(proofs)

        try:
            await until_async(proven_again, 30, "a volume proof after the restart",
                              interval=0.2)
        except BaseException:
            await node.stop()
            print(node.stderr.decode()[-8000:])
            raise
        status = await node.stop()
    assert status == 0, node.stderr.decode()[-2000:]
    proof, vid = proofs[-1]
    verify_volume_proof(proof, new_key[0])
    with Ledger.open(tmp_path / "data" / "ledger") as ledger:
        vertex = ledger.get(vid)
        assert vertex.author == "relayer-1" and vertex.key_version == 2
    logs = [json.loads(x) for x in node.stderr.decode().splitlines() if x.startswith("{")]
    assert "slashed peers denied from the QS-DAG" in {e["msg"] for e in logs}
