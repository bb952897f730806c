"""``pqcnet ca serve`` with the CA key in PKCS#11 (the SoftHSM2 token of
``scripts/services``): a node enrolls and renews through the running service, and the
certificates it gets are signed by the key the HSM's KEK unwraps — no CA key file exists.
Without the token's PIN the service does not start.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pqcnet.identity import NodeIdentity
from pqcnet.identity.certs import load_certs
from pqcnet.identity.hsm import Pkcs11KeyStore, wrapped_public_key
from pqcnet.identity.keyconfig import open_key_store, read_key_store_file
from pqcnet.runtime import enroll as client
from tests.identity.conftest import Token
from tests.procs import PQCNET

pytestmark = [pytest.mark.timeout(180), pytest.mark.services]

TD = "example.org"
R1 = f"spiffe://{TD}/acme/relayer/r1"


def _run(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PQCNET, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_ca_serve_with_the_ca_key_in_the_hsm_enrolls_and_renews(tmp_path: Path,
                                                                token: Token) -> None:
    env = {**os.environ, "PQCNET_PKCS11_PIN": token.pin}
    kek = f"serve-{os.getpid()}-{time.monotonic_ns()}"
    (tmp_path / "ca.yaml").write_text(
        f"kind: pkcs11\nmodule: {token.module}\ntoken_label: {token.label}\n"
        f"kek_label: {kek}\nwrapped_key_file: ca/ca-key.wrapped\n")
    made = _run("ca", "init", "--dir", "ca", "--trust-domain", TD, "--key-store", "ca.yaml",
                cwd=tmp_path, env=env)
    assert made.returncode == 0, made.stderr
    try:
        ca_dir = tmp_path / "ca"
        assert not (ca_dir / "ca-key.pem").exists()  # the key is only wrapped by the HSM
        ca_public = wrapped_public_key(ca_dir / "ca-key.wrapped")
        ca_cert = load_certs((ca_dir / "ca-cert.pem").read_bytes())[0]
        assert ca_cert.public_key() == ca_public.cryptography_key

        # someone without the token's PIN cannot run the CA: a clear error, no service
        denied = subprocess.run([PQCNET, "ca", "serve", "--dir", "ca", "--port", "0"],
                                cwd=tmp_path, env={**env, "PQCNET_PKCS11_PIN": "0000"},
                                capture_output=True, text=True, timeout=60)
        assert denied.returncode == 1
        assert denied.stdout == ""  # never said ready
        assert f"PKCS#11 PIN incorrect for token {token.label!r}" in denied.stderr
        assert "Traceback" not in denied.stderr

        serve = subprocess.Popen([PQCNET, "ca", "serve", "--dir", "ca", "--port", "0"],
                                 cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        try:
            assert serve.stdout is not None
            ready = json.loads(serve.stdout.readline() or "{}")
            assert ready.get("ready") is True, serve.stderr.read() if serve.stderr else ""
            url = ready["url"]
            made = _run("ca", "token", "create", "--dir", "ca", "--pattern", R1, "--role",
                        "relayer", "--ca-url", url, "--out", "r1.token", cwd=tmp_path, env=env)
            assert made.returncode == 0, made.stderr
            joined = _run("node", "enroll", "--token-file", "r1.token", "--out", "r1",
                          "--no-passphrase", cwd=tmp_path, env=env)
            assert joined.returncode == 0, joined.stderr
            assert json.loads(joined.stdout)["enrolled"] == R1
            node = NodeIdentity.load(tmp_path / "r1", None)  # chain checked against the CA
            assert str(node.spiffe_id) == R1
            ca_public.verify(node.certificate.signature,
                             node.certificate.tbs_certificate_bytes)
            # renewing through the running service: signed by the HSM-held key again
            new = asyncio.run(client.rotate(url, node))
            assert new.serial != node.serial and str(new.spiffe_id) == R1
            ca_public.verify(new.certificate.signature, new.certificate.tbs_certificate_bytes)
            assert serve.poll() is None  # still serving
        finally:
            _stop(serve)
        assert serve.returncode == 0, serve.stderr.read() if serve.stderr else ""
    finally:
        hsm = open_key_store(read_key_store_file(tmp_path / "ca" / "key-store.yaml",
                                                 default_dir=tmp_path / "ca"))
        assert isinstance(hsm, Pkcs11KeyStore)
        hsm.destroy_kek()
