"""The issue's reproduction: a node must not go dark when its certificate expires.

``pqcnet ca issue --ttl 20s`` for a server, ``pqcnet qstp serve``, re-issue into the
same identity directory, wait past the first certificate's expiry, connect: the
server presents the re-issued certificate (hot reload). A second server renews by
itself through the on-disk CA (``--renew-ca-dir``). Certificates live 30 s rather
than the issue's 20 s only because every ``pqcnet`` command here starts with the
OpenSSL self-check, which takes seconds on a loaded machine: the re-issued
certificate must outlive "first expiry + 4 s" plus a slow client start.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.procs import PQCNET

pytestmark = pytest.mark.timeout(240)


def _run(*args: str, cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run([PQCNET, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _serve(*args: str, cwd: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([PQCNET, "qstp", "serve", "--json", "--port", "0",
                             "--reload-poll", "0.5", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else "server exited"
        event = json.loads(line)
        if event["event"] == "listening":
            return proc, int(event["listening"].rsplit(":", 1)[1])


def _connect(port: int, cwd: Path, env: dict[str, str]) -> dict[str, object]:
    out = _run("qstp", "connect", f"127.0.0.1:{port}", "--identity", "client", "--json",
               "--send", "ping", cwd=cwd, env=env)
    return json.loads(out.splitlines()[0])


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_server_outlives_its_short_certificate(tmp_path: Path) -> None:
    env = {**os.environ, "PQCNET_CA_PASSPHRASE": "ca-pw", "PQCNET_NODE_PASSPHRASE": "n-pw"}
    _run("ca", "init", "--dir", "ca", "--trust-domain", "example.org", cwd=tmp_path, env=env)
    td = "spiffe://example.org/acme"
    _run("ca", "issue", "--dir", "ca", f"{td}/relayer/r1", "--ttl", "30s", "--out", "srv",
         cwd=tmp_path, env=env)
    _run("ca", "issue", "--dir", "ca", f"{td}/relayer/r2", "--ttl", "30s", "--out", "auto",
         cwd=tmp_path, env=env)
    _run("ca", "issue", "--dir", "ca", f"{td}/publisher/p1", "--out", "client",
         cwd=tmp_path, env=env)
    issued = time.monotonic()
    watched, port_w = _serve("--identity", "srv", cwd=tmp_path, env=env)
    renewing, port_r = _serve("--identity", "auto", "--renew-ca-dir", "ca", cwd=tmp_path,
                              env=env)
    try:
        first_w = _connect(port_w, tmp_path, env)
        first_r = _connect(port_r, tmp_path, env)
        # someone else (a person, cert-manager) re-issues into the watched directory
        time.sleep(max(0.0, 15 - (time.monotonic() - issued)))
        _run("ca", "issue", "--dir", "ca", f"{td}/relayer/r1", "--ttl", "30s", "--out", "srv",
             cwd=tmp_path, env=env)
        time.sleep(max(0.0, 34 - (time.monotonic() - issued)))  # first expiry + 4 s
        now = dt.datetime.now(dt.UTC)
        second_w = _connect(port_w, tmp_path, env)
        second_r = _connect(port_r, tmp_path, env)
        for first, second in ((first_w, second_w), (first_r, second_r)):
            assert second["peer_cert_not_after"] != first["peer_cert_not_after"]
            # the new certificate is a short one too (renewal keeps the lifetime)
            left = dt.datetime.fromisoformat(str(second["peer_cert_not_after"])) - now
            assert left < dt.timedelta(seconds=60)  # not the 5 min a backdated TTL would give
            assert dt.datetime.fromisoformat(str(second["peer_cert_not_after"])) > now
            assert second["group"] == "X25519MLKEM768"
    finally:
        _stop(watched)
        _stop(renewing)
