"""ServerBinding on a real QSTP server: a peer whose certificate is about to expire gets
a GOAWAY naming why (before the expiry), a renewed server certificate is served to new
handshakes at once, and a pair on disk that does not load is never taken."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import pytest

from pqcnet import qstp
from pqcnet.identity import MeshCA
from pqcnet.identity.node import CERT_FILE
from pqcnet.runtime.rotation import IdentityManager, RotationConfig, bind_server, file_identity

pytestmark = pytest.mark.timeout(120)
TD = "example.org"


async def _sink(tunnel: qstp.Tunnel) -> None:
    await tunnel.wait_closed()


async def test_expiring_peer_gets_goaway_and_disk_changes_apply(tmp_path: Path) -> None:
    ca = MeshCA.create(TD)
    server_id = ca.issue(f"spiffe://{TD}/acme/relayer/r1", dt.timedelta(hours=1))
    server_id.save(tmp_path / "srv", None)
    load, save = file_identity(tmp_path / "srv", None)
    manager = IdentityManager(tmp_path / "srv", load, save, initial=server_id,
                              config=RotationConfig(poll_s=0.2))
    server = await qstp.serve(_sink, "127.0.0.1", 0, server_id)
    await bind_server(server, manager)
    try:
        # a client whose certificate lives 8 s: ended ~3 s before, with the reason
        short = ca.issue(f"spiffe://{TD}/acme/publisher/p1", dt.timedelta(seconds=8))
        tunnel = await qstp.connect("127.0.0.1", server.port, short)
        await asyncio.wait_for(tunnel.wait_closed(), 20)
        assert tunnel.goaway is not None and tunnel.goaway.reason == "peer certificate expires"
        assert dt.datetime.now(dt.UTC) < short.not_after
        # a half-written pair (new certificate, old key) is not taken ...
        other = ca.issue(f"spiffe://{TD}/acme/relayer/r1", dt.timedelta(hours=1))
        (tmp_path / "srv" / CERT_FILE).write_bytes(other.cert_chain_pem)
        await asyncio.sleep(1.0)
        assert manager.identity.serial == server_id.serial
        client = ca.issue(f"spiffe://{TD}/acme/publisher/p2", dt.timedelta(hours=1))
        t1 = await qstp.connect("127.0.0.1", server.port, client)
        assert t1.peer.cert_serial == server_id.serial
        # ... the complete pair is, and new handshakes meet it
        other.save(tmp_path / "srv", None)
        async with asyncio.timeout(10):
            while manager.identity.serial != other.serial:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        t2 = await qstp.connect("127.0.0.1", server.port, client)
        assert t2.peer.cert_serial == other.serial
        for t in (t1, t2):
            await t.close()
    finally:
        await manager.stop()
        server.close()
        await server.wait_closed()
