"""The network step of ``pqcnet demo``: the embedded twin of the compose network.

In this one process, on loopback and the embedded defaults, it runs what
``compose.yaml`` runs as containers: two relayers and a sentry as real
:class:`~pqcnet.runtime.node.NodeRuntime` nodes (each with its own QS-DAG and
control-plane agent, joined by the in-process transport instead of go-waku), a
JSON-RPC backend, a sidecar in front of an unmodified HTTP client, publishers and
subscribers, and a governance key. It then shows, each checked and printed:

* an unmodified HTTP client reaching the backend through sidecar -> QSTP -> sentry;
* frames relayed by both relayers, and a governance pull *over QSTP* (the relayers'
  ``governance_qstp_port``) that equals what the subscribers received;
* a rate-limit directive signed by governance, anchored by the sentry in its own
  QS-DAG before it takes effect, then throttling the client (429);
* a slash directive: the slashed publisher's next handshake is refused by the relayer;
* an epoch's volume proof signed and anchored in the relayer's QS-DAG, with one record's
  inclusion proof checked against the anchor.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Awaitable, Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

TENANT = "acme"
FRAMES_PER_RELAYER = 500
#: seconds any one wait of the demo may take (a loaded machine is slow, never stuck)
WAIT_S = 120.0


class _JsonRpc(BaseHTTPRequestHandler):
    """The demo backend: answers every JSON-RPC POST with the method it received."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        try:
            method = json.loads(body).get("method", "")
        except (ValueError, AttributeError):
            method = ""
        out = json.dumps({"jsonrpc": "2.0", "id": 1, "result": f"ok:{method}"}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: object) -> None:  # quiet: the demo prints its own lines
        pass


async def _until(cond: Callable[[], Awaitable[bool]], what: str) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + WAIT_S
    while not await cond():
        if loop.time() > end:
            raise TimeoutError(f"demo: timed out waiting for {what}")
        await asyncio.sleep(0.1)


def _write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


async def step_network(state: Any) -> None:
    """Run the network (needs the demo's CA and identities)."""
    import httpx

    from pqcnet.cli.demo import TRUST_DOMAIN, say
    from pqcnet.crypto.pqc import SigningKey
    from pqcnet.mesh.agent import AgentConfig, ControlPlaneAgent
    from pqcnet.mesh.directives import (
        Directive,
        GovernancePolicy,
        RateLimitUpdate,
        SlashNotice,
        sign_directive,
    )
    from pqcnet.mesh.envelope import Keyring, NodeKeys
    from pqcnet.mesh.qsdag_port import QsdagPort
    from pqcnet.mesh.transport import InProcessHub, InProcessTransport
    from pqcnet.qsdag import Ledger
    from pqcnet.qstp.errors import HandshakeError, TunnelClosed
    from pqcnet.relayer.client import PublisherClient, SubscriberClient
    from pqcnet.relayer.frame import Frame
    from pqcnet.relayer.governance import VolumeFilter, pull_volume
    from pqcnet.relayer.proof import anchored_proof, inclusion_proof, verify_inclusion
    from pqcnet.runtime.config import parse_node_config
    from pqcnet.runtime.node import NodeRuntime
    from pqcnet.sentry.config import verify_key_pem
    from pqcnet.sentry.sidecar import Sidecar, pinned_dial, serve_http

    base = state.workdir / "network"
    base.mkdir(exist_ok=True)
    ca = state.ca
    ids = {name: ca.issue(f"spiffe://{TRUST_DOMAIN}/{TENANT}/{role}/{name}")
           for name, role in (("r2", "relayer"), ("s1", "sentry"), ("c1", "sidecar"),
                              ("i1", "indexer"))}
    ids["r1"] = state.identities["relayer"]
    for name, ident in ids.items():
        ident.save(base / f"{name}-id", None)
    publisher = state.identities["publisher"]
    gov_key = SigningKey.generate()
    (base / "gov.pub").write_bytes(verify_key_pem(gov_key.public_key))
    issuer = SigningKey.generate()
    (base / "acme-issuer.pub").write_bytes(verify_key_pem(issuer.public_key))

    backend = ThreadingHTTPServer(("127.0.0.1", 0), _JsonRpc)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    control = {"transport": "embedded", "governance": {"keys": ["gov.pub"]},
               "announce_interval_s": 0.5, "tick_s": 0.1}
    files = {
        "relayer-1": {"role": "relayer", "relayer": {
            "node_id": "r1", "identity_dir": "r1-id", "listen_port": 0,
            "data_dir": "relayer-1", "grpc_port": 0, "governance_qstp_port": 0},
            "control_plane": {**control, "state_dir": "mesh-r1"}},
        "relayer-2": {"role": "relayer", "relayer": {
            "node_id": "r2", "identity_dir": "r2-id", "listen_port": 0,
            "data_dir": "relayer-2", "grpc_port": 0, "governance_qstp_port": 0},
            "control_plane": {**control, "state_dir": "mesh-r2"}},
        "sentry-1": {"role": "sentry", "sentry": {
            "listen": "127.0.0.1:0", "identity_dir": "s1-id", "ledger": "ledger-s1",
            "issuers": {TENANT: ["acme-issuer.pub"]},
            "limits": {"max_in_flight": 64, "default": {"rate": 100, "burst": 50}},
            "acl": {"rules": {"*": [{"action": "allow",
                                     "from": [f"spiffe://{TRUST_DOMAIN}/*/sidecar/*"],
                                     "methods": ["POST /rpc"]}]}},
            "backends": [{"name": "jsonrpc", "kind": "http", "tenants": [TENANT],
                          "target": f"http://127.0.0.1:{backend.server_port}"}],
            "routes": [{"prefix": "/", "backend": "jsonrpc"}]},
            "control_plane": {**control, "state_dir": "mesh-s1"}},
    }
    hub = InProcessHub()
    nodes: dict[str, NodeRuntime] = {}
    gov_keys = NodeKeys("governance", gov_key)
    gov_ledger = Ledger.open(base / "ledger-governance", sync=False)
    if gov_ledger.genesis_id is None:
        gov_ledger.init_genesis("pqcnet-demo", "governance", gov_key)
    gov = ControlPlaneAgent(gov_keys, InProcessTransport(hub), Keyring(),
                            config=AgentConfig(announce_interval_ms=500, tick_ms=100),
                            governance=GovernancePolicy([gov_key.public_key]),
                            ledger=QsdagPort(gov_ledger, gov_keys))
    bar = tqdm(total=6, desc="network demo", unit="step", disable=None)
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(backend.shutdown)
        stack.callback(gov_ledger.close)
        stack.callback(bar.close)
        for name, data in files.items():
            path = _write(base / f"node-{name}.yaml", data)
            node = NodeRuntime(parse_node_config(yaml.safe_load(path.read_text()), base,
                                                 source=str(path)),
                               transport=InProcessTransport(hub))
            await node.start()
            stack.push_async_callback(node.stop)
            nodes[name] = node
        await gov.start()
        stack.push_async_callback(gov.stop)
        bar.update()

        # -- an unmodified HTTP client through sidecar -> QSTP -> sentry -> backend
        sentry = nodes["sentry-1"]
        sidecar = Sidecar(pinned_dial("127.0.0.1", sentry.port, ids["c1"]), issuer,
                          subject="alice", tenant=TENANT)
        stack.push_async_callback(sidecar.aclose)
        local = await serve_http(sidecar, "127.0.0.1", 0)
        stack.callback(local.close)
        url = f"http://127.0.0.1:{local.sockets[0].getsockname()[1]}/rpc"
        client = await stack.enter_async_context(httpx.AsyncClient(timeout=30))

        async def call() -> int:
            r = await client.post(url, json={"jsonrpc": "2.0", "id": 1,
                                             "method": "eth_blockNumber"})
            return r.status_code

        before = [await call() for _ in range(5)]
        bar.update()

        # -- frames through both relayers; the governance pull over QSTP
        received, in_order = 0, True
        for name in ("relayer-1", "relayer-2"):
            port = nodes[name].port
            sub = await SubscriberClient.connect("127.0.0.1", port, publisher)
            await sub.subscribe(TENANT)
            pub = await PublisherClient.connect("127.0.0.1", port, publisher)
            frames = [Frame(TENANT, "orders", s, b"order-%d" % s)
                      for s in range(1, FRAMES_PER_RELAYER + 1)]
            for i in range(0, len(frames), 100):
                await pub.publish(frames[i:i + 100])
            seqs: list[int] = []
            async with asyncio.timeout(WAIT_S):
                async for batch in sub.batches():
                    seqs += [f.seq for f in batch]
                    if len(seqs) >= FRAMES_PER_RELAYER:
                        await sub.ack()
                        break
            in_order = in_order and seqs == list(range(1, FRAMES_PER_RELAYER + 1))
            received += len(seqs)
            await pub.close()
            await sub.close()
        pulled = 0
        for name in ("relayer-1", "relayer-2"):
            relayer = nodes[name].relayer
            assert relayer is not None and relayer.governance_qstp_port is not None
            target = f"127.0.0.1:{relayer.governance_qstp_port}"

            async def metered(target: str = target) -> bool:
                s = await pull_volume(target, VolumeFilter(customer=TENANT), identity=ids["i1"])
                return s.total_frames >= FRAMES_PER_RELAYER

            await _until(metered, f"{name} to meter the acked frames")
            pulled += (await pull_volume(target, VolumeFilter(customer=TENANT),
                                         identity=ids["i1"])).total_frames
        bar.update()

        # -- a rate-limit directive, anchored by the sentry before it applies
        limit = sign_directive(Directive.create(RateLimitUpdate(TENANT, 0.5, 2),
                                                now_ms=gov.clock()), gov_key)
        await gov.issue_directive(limit)

        async def throttled() -> bool:
            return await call() == 429

        await _until(throttled, "the rate-limit directive on the sentry")
        after = [await call() for _ in range(5)]
        bar.update()

        # -- a slash: the publisher is refused by the relayer from its next handshake on
        slash = sign_directive(Directive.create(
            SlashNotice(publisher.spiffe_id.node_id, "demo: volume fraud"),
            now_ms=gov.clock()), gov_key)
        await gov.issue_directive(slash)
        r1 = nodes["relayer-1"]

        async def refused() -> bool:
            try:
                c = await PublisherClient.connect("127.0.0.1", r1.port, publisher)
            except (HandshakeError, TunnelClosed):
                return True
            await c.close()
            return False

        await _until(refused, "the slash on relayer-1")
        bar.update()

        # -- the volume proof of the epoch, anchored in relayer-1's QS-DAG
        r1_node = r1.relayer
        assert r1_node is not None
        r1_node.prove_closed_epochs(now=time.time() + 2 * r1_node.cfg.epoch_seconds)
        # the node's own epoch loop may have proven the epoch already: take the latest
        proof = r1_node.proof_parts(max(r1_node.proofs), records=True)[0]
        anchored = anchored_proof(r1_node.anchor.ledger, r1_node.anchor.receipts[proof.epoch])
        verify_inclusion(proof.records[0], inclusion_proof(proof, 0), anchored)
        bar.update()
    state.results.update(network_in_order=in_order, network_http_before=before,
                         network_http_after=after, network_received=received,
                         network_pulled=pulled)
    say("network: 2 relayers, a sentry, a sidecar, governance (in-process control plane)",
        http_via_sidecar=" ".join(map(str, before)) + "  (unmodified client -> sidecar -> "
                                                      "QSTP -> sentry -> backend)",
        relayed=f"{received} frames through 2 relayers; in order, exactly once: "
                f"{'yes' if in_order else 'NO'}",
        governance_pull=f"{pulled} frames over QSTP (= received: "
                        f"{'yes' if pulled == received else 'NO'})",
        rate_limit_directive="anchored, then " + " ".join(map(str, after)),
        slash_directive=f"{publisher.spiffe_id.node_id} refused by relayer-1",
        volume_proof=f"epoch {proof.epoch} root {proof.root.hex()[:16]}... anchored, "
                     "inclusion ok")
