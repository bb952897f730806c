"""``pqcnet node run`` does not go dark either: a relayer node with a 30 s certificate and
``--renew-ca-dir`` presents a renewed certificate after the first one expired, and a
client handshake (which checks validity) still succeeds."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from pqcnet import qstp
from pqcnet.identity import NodeIdentity
from tests.procs import PQCNET

pytestmark = pytest.mark.timeout(300)


def _run(*args: str, cwd: Path, env: dict[str, str]) -> None:
    proc = subprocess.run([PQCNET, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


async def _peer_not_after(port: int, client: NodeIdentity) -> dt.datetime:
    tunnel = await qstp.connect("127.0.0.1", port, client)
    try:
        return tunnel.peer.cert_not_after
    finally:
        await tunnel.close()


def test_relayer_node_renews_its_certificate(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PQCNET_NODE_PASSPHRASE"}
    env["PQCNET_CA_PASSPHRASE"] = "ca-pw"
    td = "spiffe://example.org/acme"
    _run("ca", "init", "--dir", "ca", "--trust-domain", "example.org", cwd=tmp_path, env=env)
    _run("ca", "issue", "--dir", "ca", f"{td}/relayer/r1", "--ttl", "30s", "--out", "r1",
         "--no-node-passphrase", cwd=tmp_path, env=env)
    _run("ca", "issue", "--dir", "ca", f"{td}/publisher/p1", "--out", "p1",
         "--no-node-passphrase", cwd=tmp_path, env=env)
    issued = time.monotonic()
    original = NodeIdentity.load(tmp_path / "r1", None).not_after
    (tmp_path / "node.yaml").write_text(yaml.safe_dump({
        "role": "relayer",
        "relayer": {"node_id": "r1", "identity_dir": "r1", "listen_port": 0,
                    "data_dir": "data"},
        "control_plane": {"transport": "embedded"}}))
    proc = subprocess.Popen(
        [PQCNET, "node", "run", "--config", "node.yaml", "--renew-ca-dir", "ca",
         "--reload-poll", "0.5"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else "node exited"
        port = int(json.loads(line)["port"])
        client = NodeIdentity.load(tmp_path / "p1", None)
        asyncio.run(_peer_not_after(port, client))  # serving (renewed or not yet)
        time.sleep(max(0.0, 36 - (time.monotonic() - issued)))  # past the first expiry
        now = dt.datetime.now(dt.UTC)
        assert original < now, "the issued certificate should have expired by now"
        second = asyncio.run(_peer_not_after(port, client))
        assert second > now and second != original
        # the relayer kept its key (it signs its proofs); the certificate on disk is new
        on_disk = NodeIdentity.load(tmp_path / "r1", None)
        assert on_disk.not_after == second
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
