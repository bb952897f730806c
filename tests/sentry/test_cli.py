"""The CLI walkthrough of the README, with real processes: CA, issuer key, sentry, sidecar."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from click.testing import CliRunner

from pqcnet.cli import app
from tests.ports import free_port

from .harness import PQCNET, HttpBackend, cli_identities, pq

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)


def test_assertion_issue_and_inspect(tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(app, ["assertion", "keygen", "--out", str(tmp_path / "k.pem"),
                            "--pub", str(tmp_path / "k.pub")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["assertion", "issue", "--key", str(tmp_path / "k.pem"),
                            "--subject", "alice", "--tenant", "acme", "--channel-binding",
                            "ab" * 32, "--ttl", "60", "--scope", "read"])
    assert r.exit_code == 0, r.output
    token = r.output.strip()
    r = runner.invoke(app, ["assertion", "inspect", token])
    claims = json.loads(r.output)
    assert claims["subject"] == "alice" and claims["scopes"] == ["read"]
    assert claims["expires_at"] - claims["issued_at"] == 60
    r = runner.invoke(app, ["assertion", "inspect", "not-an-assertion!"])
    assert r.exit_code != 0


def test_walkthrough_sentry_and_sidecar_processes(tmp_path: Path) -> None:
    d = tmp_path
    cli_identities(d)
    sentry_port, sidecar_port = free_port(), free_port()
    with HttpBackend() as backend:
        cfg = yaml.safe_load((ROOT / "examples" / "sentry.yaml").read_text())
        cfg["listen"] = f"127.0.0.1:{sentry_port}"
        cfg["backends"][0]["target"] = f"http://127.0.0.1:{backend.port}"
        (d / "sentry.yaml").write_text(yaml.safe_dump(cfg))
        check = json.loads(pq("sentry", "check", "--config", "sentry.yaml", cwd=d))
        assert len(check["sanitizer_policy_sha256"]["acme"]) == 64
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        sentry = subprocess.Popen([*PQCNET, "sentry", "run", "--config", "sentry.yaml",
                                   "--no-passphrase"], cwd=d, env=env,
                                  stderr=subprocess.PIPE, text=True)
        sidecar = None
        try:
            assert "listening" in (sentry.stderr.readline() if sentry.stderr else "")
            sidecar = subprocess.Popen(
                [*PQCNET, "sidecar", "--sentry", f"127.0.0.1:{sentry_port}",
                 "--identity-dir", "acme-id", "--issuer-key", "acme-issuer.pem",
                 "--tenant", "acme", "--subject", "alice", "--listen",
                 f"127.0.0.1:{sidecar_port}", "--no-passphrase"],
                cwd=d, env=env, stderr=subprocess.PIPE, text=True)
            assert "sidecar (http)" in (sidecar.stderr.readline() if sidecar.stderr else "")
            r = httpx.post(f"http://127.0.0.1:{sidecar_port}/rpc",
                           json={"id": 3, "params": {"user_id": "u1", "ip": "1.1.1.1"}},
                           headers={"x-forwarded-for": "1.1.1.1"}, timeout=10)
            assert r.status_code == 200 and r.json()["id"] == 3
            assert r.json()["result"]["echo"]["params"]["user_id"].startswith("hmac256:")
            assert "x-forwarded-for" not in {k.lower() for k in
                                             backend.seen.requests[-1]["headers"]}
            r = httpx.get(f"http://127.0.0.1:{sidecar_port}/admin", timeout=10)
            assert r.status_code == 403
        finally:
            for p in (sidecar, sentry):
                if p is not None:
                    p.send_signal(signal.SIGTERM)
            for p in (sidecar, sentry):
                if p is not None:
                    assert p.wait(timeout=20) == 0
                    if p.stderr:
                        p.stderr.close()
