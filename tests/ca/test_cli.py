"""``pqcnet ca serve`` / ``ca token create`` / ``node enroll`` as a user runs them."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from pqcnet.identity import NodeIdentity, SpiffeId
from pqcnet.identity.certs import utcnow
from pqcnet.identity.tokens import TokenError, TokenStore, hash_token
from tests.procs import PQCNET as PQCNET_EXE

PQCNET = [PQCNET_EXE]


def _run(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PQCNET, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_serve_token_enroll_replay(tmp_path: Path) -> None:
    env = {**os.environ, "PQCNET_CA_PASSPHRASE": "ca-pw", "PQCNET_NODE_PASSPHRASE": "node-pw"}
    assert _run("ca", "init", "--dir", "ca", "--trust-domain", "example.org",
                cwd=tmp_path, env=env).returncode == 0
    serve = subprocess.Popen([*PQCNET, "ca", "serve", "--dir", "ca", "--port", "0"],
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert serve.stdout is not None
        line = serve.stdout.readline()
        ready = json.loads(line)
        assert ready["ready"] is True and ready["url"].startswith("https://127.0.0.1:")
        made = _run("ca", "token", "create", "--dir", "ca", "--pattern",
                    "spiffe://example.org/acme/relayer/r1", "--role", "relayer",
                    "--ttl", "10m", "--ca-url", ready["url"], "--out", "r1.token",
                    cwd=tmp_path, env=env)
        assert made.returncode == 0, made.stderr
        assert oct((tmp_path / "r1.token").stat().st_mode & 0o777) == "0o600"
        stored = [p for p in (tmp_path / "ca").iterdir() if p.name.startswith("tokens.db")]
        assert stored and all(b"pqcnet-et1." not in p.read_bytes() for p in stored)
        assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in stored), stored
        joined = _run("node", "enroll", "--token-file", "r1.token", "--out", "r1",
                      cwd=tmp_path, env=env)
        assert joined.returncode == 0, joined.stderr
        assert json.loads(joined.stdout)["enrolled"] == "spiffe://example.org/acme/relayer/r1"
        node = NodeIdentity.load(tmp_path / "r1", b"node-pw")
        assert str(node.spiffe_id) == "spiffe://example.org/acme/relayer/r1"
        again = _run("node", "enroll", "--token-file", "r1.token", "--out", "r1-again",
                     cwd=tmp_path, env=env)
        assert again.returncode == 1
        assert "401 token_used" in again.stderr
        assert "Traceback" not in again.stderr
        assert not (tmp_path / "r1-again").exists()
        assert serve.poll() is None  # still serving
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(timeout=20)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
    assert serve.returncode == 0, serve.stderr.read() if serve.stderr else ""


def test_serve_refuses_to_advertise_its_bind_address(tmp_path: Path) -> None:
    """`--host 0.0.0.0` is where the service listens, not where other nodes reach it: a
    CRL URL on it would send each enrolled node to itself. Refused before listening,
    with the option that fixes it named; `--advertise-host` gives the reachable name."""
    env = {**os.environ, "PQCNET_CA_PASSPHRASE": "ca-pw"}
    assert _run("ca", "init", "--dir", "ca", "--trust-domain", "example.org",
                cwd=tmp_path, env=env).returncode == 0
    for host in ("0.0.0.0", "::"):
        res = _run("ca", "serve", "--dir", "ca", "--host", host, "--port", "0",
                   "--crl-http-port", "18081", cwd=tmp_path, env=env)
        assert res.returncode == 1, res
        assert f"{host} is a bind address" in res.stderr, res.stderr
        assert "--advertise-host" in res.stderr and "Traceback" not in res.stderr


def test_revoke_through_the_service(tmp_path: Path) -> None:
    """`ca revoke --ca URL --identity ADMIN` while `ca serve` runs on the directory (an
    offline `--dir` revocation is refused then: tests/identity/test_ca_lock.py): the
    served CRL lists the serial at once. A node that is not an admin is refused and
    nothing is revoked; --dir with --ca is a usage error."""
    import asyncio

    from pqcnet.identity import load_crl
    from pqcnet.runtime.enroll import fetch_crl

    env = {**os.environ, "PQCNET_CA_PASSPHRASE": "ca-pw"}
    assert _run("ca", "init", "--dir", "ca", "--trust-domain", "example.org",
                cwd=tmp_path, env=env).returncode == 0
    for sid, out in (("acme/relayer/r1", "r1"), ("ops/admin/a1", "admin"),
                     ("acme/publisher/p1", "p1")):
        made = _run("ca", "issue", "--dir", "ca", "--no-node-passphrase",
                    f"spiffe://example.org/{sid}", "--out", out, cwd=tmp_path, env=env)
        assert made.returncode == 0, made.stderr
    r1 = NodeIdentity.load(tmp_path / "r1", None)
    serve = subprocess.Popen([*PQCNET, "ca", "serve", "--dir", "ca", "--port", "0"],
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert serve.stdout is not None
        url = json.loads(serve.stdout.readline())["url"]

        def served() -> frozenset[int]:
            pem, _ = asyncio.run(fetch_crl(url, r1.trust_bundle_pem, "example.org"))
            assert pem is not None
            return load_crl(pem, r1.trust_bundle_pem).revoked

        serial = format(r1.serial, "x")
        refused = _run("ca", "revoke", "--ca", url, "--identity", "p1", "--serial", serial,
                       cwd=tmp_path, env=env)
        assert refused.returncode == 1 and "403" in refused.stderr, refused
        assert "Traceback" not in refused.stderr and r1.serial not in served()
        both = _run("ca", "revoke", "--ca", url, "--dir", "ca", "--identity", "admin",
                    "--serial", serial, cwd=tmp_path, env=env)
        assert both.returncode == 2 and "not both" in both.stderr, both
        done = _run("ca", "revoke", "--ca", url, "--identity", "admin", "--serial", serial,
                    "--reason", "key_compromise", cwd=tmp_path, env=env)
        assert done.returncode == 0, done.stderr
        assert f"revoked serial {serial}" in done.stdout
        assert r1.serial in served()
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(timeout=20)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()


def test_token_list_and_revoke(tmp_path: Path) -> None:
    """``ca token list`` shows each token's state and never a secret; ``ca token
    revoke`` withdraws an unused token only, named unambiguously."""
    env = {**os.environ, "PQCNET_CA_PASSPHRASE": "ca-pw"}
    assert _run("ca", "init", "--dir", "ca", "--trust-domain", "example.org",
                cwd=tmp_path, env=env).returncode == 0
    store = TokenStore(tmp_path / "ca")
    pattern = "spiffe://example.org/acme/relayer/*"
    live, _ = store.create(pattern, "relayer", dt.timedelta(minutes=10))
    used, _ = store.create(pattern, "relayer", dt.timedelta(minutes=10))
    old, _ = store.create(pattern, "relayer", dt.timedelta(minutes=1),
                          now=utcnow() - dt.timedelta(minutes=5))
    store.redeem(used, SpiffeId.parse("spiffe://example.org/acme/relayer/r9"))
    listed = _run("ca", "token", "list", "--dir", "ca", "--json", cwd=tmp_path, env=env)
    assert listed.returncode == 0, listed.stderr
    rows = {r["hash"]: r for r in json.loads(listed.stdout)["tokens"]}
    assert {h: (r["state"], r["used_by"]) for h, r in rows.items()} == {
        hash_token(live)[:16]: ("live", ""),
        hash_token(used)[:16]: ("used", "spiffe://example.org/acme/relayer/r9"),
        hash_token(old)[:16]: ("expired", "")}
    table = _run("ca", "token", "list", "--dir", "ca", cwd=tmp_path, env=env).stdout
    assert len(table.splitlines()) == 3 and "used by spiffe://example.org/acme/relayer/r9" in table
    assert not any(s in listed.stdout + table for s in (live, used, old))
    refused = _run("ca", "token", "revoke", "--dir", "ca", hash_token(used)[:12],
                   cwd=tmp_path, env=env)
    assert refused.returncode == 1 and "already used by spiffe://" in refused.stderr
    short = _run("ca", "token", "revoke", "--dir", "ca", "abc", cwd=tmp_path, env=env)
    assert short.returncode == 1 and "at least 8 hex digits" in short.stderr
    done = _run("ca", "token", "revoke", "--dir", "ca", hash_token(live)[:8],
                cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    with pytest.raises(TokenError, match="not known"):
        store.check(live)
    again = _run("ca", "token", "revoke", "--dir", "ca", hash_token(live)[:8],
                 cwd=tmp_path, env=env)
    assert again.returncode == 1 and "no token with hash" in again.stderr


def test_serve_counts_tokens_by_state_as_they_are_made_spent_and_expire(
        tmp_path: Path) -> None:
    """``pqcnet_ca_tokens{state}`` on the running service's metrics port, scraped over
    HTTP: tokens made by ``ca token create`` in another process appear, a node's
    enrollment moves one to ``used``, a 1 s token becomes ``expired`` as time passes,
    and a revoked one leaves the count — without restarting the service."""
    import asyncio

    from tests.ports import free_port
    from tests.procs import terminate
    from tests.relayer.helpers import metrics_reach

    env = {**os.environ, "PQCNET_CA_PASSPHRASE": "ca-pw", "PQCNET_NODE_PASSPHRASE": "node-pw"}
    assert _run("ca", "init", "--dir", "ca", "--trust-domain", "example.org",
                cwd=tmp_path, env=env).returncode == 0
    metrics = free_port()
    serve = subprocess.Popen([*PQCNET, "ca", "serve", "--dir", "ca", "--port", "0",
                              "--metrics-port", str(metrics), "--crl-max-age", "2"],
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)

    def tokens_reach(want: dict[str, float]) -> None:
        asyncio.run(metrics_reach(metrics, {f'pqcnet_ca_tokens{{state="{s}"}}': n
                                            for s, n in want.items()}, limit=20))

    def create(name: str, ttl: str) -> None:
        made = _run("ca", "token", "create", "--dir", "ca", "--pattern",
                    f"spiffe://example.org/acme/relayer/{name}", "--role", "relayer",
                    "--ttl", ttl, "--ca-url", url, "--out", f"{name}.token",
                    cwd=tmp_path, env=env)
        assert made.returncode == 0, made.stderr

    try:
        assert serve.stdout is not None
        url = json.loads(serve.stdout.readline())["url"]
        tokens_reach({"live": 0, "used": 0, "expired": 0})
        for name in ("r1", "r2", "r3"):
            create(name, "10m")
        create("brief", "1s")
        joined = _run("node", "enroll", "--token-file", "r1.token", "--out", "r1",
                      cwd=tmp_path, env=env)
        assert joined.returncode == 0, joined.stderr
        tokens_reach({"live": 2, "used": 1, "expired": 1})
        r3 = hash_token(json.loads((tmp_path / "r3.token").read_text())["token"])
        assert _run("ca", "token", "revoke", "--dir", "ca", r3[:12], cwd=tmp_path,
                    env=env).returncode == 0
        tokens_reach({"live": 1, "used": 1, "expired": 1})
        assert serve.poll() is None
    finally:
        terminate(serve)
    assert serve.returncode == 0
