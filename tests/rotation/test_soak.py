"""Soak: nodes with 20 s certificates run for more than five lifetimes under continuous
traffic, renewing through the CA service (``POST /v1/rotate``) at half-life.

Two paths at once, all real parts in one event loop, over loopback sockets:
  sidecar -> sentry -> HTTP backend      continuous RPCs; every one must succeed
  publisher -> relayer -> subscriber     continuous frames; none lost or duplicated
Every node renews (new key, except the relayer whose key signs its proofs) and is
served/dialled with the renewed certificate; tunnels of an old certificate get a
GOAWAY before it expires. Checked like Jepsen: the history the clients recorded
(requests attempted/failed, frames acknowledged/received) and the certificates
each node held and each client saw, independent of the nodes' own counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest

from pqcnet import qstp
from pqcnet.errors import PqcnetError
from pqcnet.identity import IssuancePolicy, MeshCA, NodeIdentity
from pqcnet.identity.tokens import TokenStore
from pqcnet.relayer.client import PublisherClient, SubscriberClient
from pqcnet.relayer.config import RelayerConfig
from pqcnet.relayer.frame import Frame
from pqcnet.relayer.node import RelayerNode
from pqcnet.runtime.ca_service import CaService, CaServiceConfig
from pqcnet.runtime.rotation import (
    CaServiceRenewer,
    IdentityManager,
    RotationConfig,
    bind_relayer,
    bind_server,
    file_identity,
)
from pqcnet.sentry.config import load_config
from pqcnet.sentry.core import Sentry
from pqcnet.sentry.server import SentryServer
from pqcnet.sentry.sidecar import Sidecar, serve_http
from tests.sentry.harness import (
    ACME_ID,
    SENTRY_ID,
    TD,
    HttpBackend,
    Mesh,
    config_dict,
    write_config,
)

pytestmark = pytest.mark.timeout(400)

TTL = dt.timedelta(seconds=20)
LIFETIMES = 5.5
RUN_S = TTL.total_seconds() * LIFETIMES


async def test_five_lifetimes_under_traffic(tmp_path: Path) -> None:
    ca = MeshCA.create(TD, policy=IssuancePolicy(max_ttl=dt.timedelta(hours=1),
                                                 default_ttl=TTL))
    ca.save(tmp_path / "ca", b"pw")
    svc = CaService(ca, tmp_path / "ca", TokenStore(tmp_path / "ca"),
                    CaServiceConfig(cert_ttl=TTL, crl_max_age_s=5))
    url = f"https://127.0.0.1:{await svc.start()}"
    held: dict[str, set[int]] = defaultdict(set)   # certificates each node held
    seen: dict[str, set[int]] = defaultdict(set)   # server certificates clients met

    def managed(name: str, sid: str, *, rotate_key: bool = True) -> IdentityManager:
        ident = ca.issue(sid, TTL)
        ident.save(tmp_path / name, None)
        load, save = file_identity(tmp_path / name, None)
        manager = IdentityManager(tmp_path / name, load, save, renewer=CaServiceRenewer(url),
                                  initial=ident, config=RotationConfig(
                                      poll_s=0.5, crl_url=url, crl_refresh_s=2.0,
                                      rotate_key=rotate_key))
        held[name].add(ident.serial)

        async def note(new: NodeIdentity, _changed: bool) -> None:
            held[name].add(new.serial)

        manager.on_change(note)
        return manager

    sentry_m = managed("sentry", SENTRY_ID)
    sidecar_m = managed("sidecar", ACME_ID)
    relayer_m = managed("relayer", f"spiffe://{TD}/acme/relayer/r1", rotate_key=False)
    pub_m = managed("publisher", f"spiffe://{TD}/acme/publisher/p1")
    sub_m = managed("subscriber", f"spiffe://{TD}/acme/subscriber/s1")
    managers = [sentry_m, sidecar_m, relayer_m, pub_m, sub_m]

    stop = asyncio.Event()
    history: dict[str, Any] = {"rpc_ok": 0, "rpc_failed": [], "acked": 0, "received": [],
                               "publish_errors": 0}
    with HttpBackend() as http:
        # ------------------------------------------------------------ sentry path
        mesh = Mesh(sentry_m.identity, sidecar_m.identity, sidecar_m.identity,
                    sidecar_m.identity, _issuer(1), _issuer(2))
        cfg_path = write_config(tmp_path, mesh, config_dict(http.port, 1, 1))
        sentry = Sentry(load_config(cfg_path))
        sentry_server = SentryServer(sentry, sentry_m.identity)
        sentry_port = await sentry_server.start()
        await bind_server(sentry_server.server, sentry_m)

        async def dial() -> Any:
            tunnel = await qstp.connect("127.0.0.1", sentry_port, sidecar_m.identity)
            seen["sentry"].add(tunnel.peer.cert_serial)
            return tunnel

        sidecar = Sidecar(dial, mesh.acme_issuer, subject="alice", tenant="acme", ttl=300)
        await sidecar_m.start()
        local = await serve_http(sidecar)
        local_port = local.sockets[0].getsockname()[1]

        async def rpcs() -> None:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{local_port}",
                                         timeout=30) as client:
                n = 0
                while not stop.is_set():
                    n += 1
                    try:
                        r = await client.post("/rpc", json={"jsonrpc": "2.0", "id": n,
                                                            "method": "eth_call"})
                        if r.status_code == 200 and r.json()["id"] == n:
                            history["rpc_ok"] += 1
                        else:
                            history["rpc_failed"].append((n, r.status_code, r.text[:200]))
                    except httpx.HTTPError as exc:
                        history["rpc_failed"].append((n, type(exc).__name__, str(exc)))
                    await asyncio.sleep(0.02)

        # ------------------------------------------------------------ relayer path
        node = RelayerNode(RelayerConfig(listen_port=0, data_dir=str(tmp_path / "rel"),
                                         shards=4), relayer_m.identity)
        await node.start()
        await bind_relayer(node, relayer_m)
        await pub_m.start()
        await sub_m.start()
        port = node.port

        async def publish() -> None:
            client: PublisherClient | None = None
            seq, retry = 1, False
            while not stop.is_set():
                if client is None:
                    try:
                        client = await PublisherClient.connect("127.0.0.1", port,
                                                               pub_m.identity)
                        seen["relayer"].add(client.tunnel.peer.cert_serial)
                    except PqcnetError:
                        await asyncio.sleep(0.1)
                        continue
                try:
                    async with asyncio.timeout(20):
                        res = await client.publish([Frame("acme", "soak", seq, b"s" * 64)],
                                                   retry=retry)
                except (PqcnetError, TimeoutError):
                    history["publish_errors"] += 1  # tunnel ended: resend the same seq
                    with contextlib.suppress(PqcnetError):
                        await client.close()
                    client, retry = None, True
                    continue
                if res[0].accepted:
                    history["acked"] = seq
                    seq, retry = seq + 1, False
                await asyncio.sleep(0.01)
            if client is not None:
                await client.close()

        async def subscribe() -> None:
            last: dict[Any, int] = {}
            while True:
                try:
                    client = await SubscriberClient.connect("127.0.0.1", port, sub_m.identity)
                except PqcnetError:
                    await asyncio.sleep(0.1)
                    continue
                client.last = last  # the application's dedup state survives reconnects
                try:
                    await client.subscribe("acme")
                    async for batch in client.batches():
                        history["received"].extend(f.seq for f in batch)
                except PqcnetError:
                    pass
                finally:
                    await client.close()

        tasks = [asyncio.create_task(rpcs()), asyncio.create_task(publish())]
        receiver = asyncio.create_task(subscribe())
        try:
            await asyncio.sleep(RUN_S)
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
        try:
            with contextlib.suppress(TimeoutError):  # the assertions below say what is missing
                async with asyncio.timeout(30):
                    while len(history["received"]) < history["acked"]:  # noqa: ASYNC110
                        await asyncio.sleep(0.1)
        finally:
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)
            local.close()
            await sidecar.aclose()
            for m in managers:
                await m.stop()
            await node.stop()
            await sentry_server.aclose()
            await svc.close()

    assert history["rpc_ok"] > 100 and history["rpc_failed"] == [], history["rpc_failed"][:5]
    assert history["acked"] > 100
    got = history["received"]
    assert got == list(range(1, history["acked"] + 1)), (  # none lost or doubled
        history["acked"], len(got), got[-5:], history["publish_errors"])
    for name in ("sentry", "sidecar", "relayer", "publisher", "subscriber"):
        assert len(held[name]) >= 4, (name, len(held[name]))
    for name in ("sentry", "relayer"):
        assert len(seen[name]) >= 4, (name, len(seen[name]))
    for m in managers:
        assert m.renewals_failed == 0, m.identity.spiffe_id


def _issuer(n: int) -> Any:
    from pqcnet.crypto.pqc import SigningKey

    return SigningKey.from_seed(bytes([n]) * 32)
