"""Enrollment survives a lost answer: the same node retrying with its spent token, and a
``pqcnet ca serve`` SIGKILLed while enrollments are in flight.

The retry rule (``TokenStore.is_retry``) is an authority, so each way someone without it
tries is here too: the token holder with another key, the same key for another ID, a
retry after the token expired.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from pqcnet.crypto.pqc import SigningKey
from pqcnet.identity import MeshCA, NodeIdentity, SpiffeId
from pqcnet.identity.certs import utcnow
from pqcnet.identity.tokens import TokenBundle, TokenStore, write_bundle
from pqcnet.qsdag import Ledger, OpaqueRecord
from pqcnet.runtime import enroll as client
from pqcnet.runtime.ca_service import ISSUED, ISSUED_CONTENT_TYPE, TOKEN_REPLAYS
from pqcnet.runtime.errors import CaServiceError
from tests.ca.conftest import TD, Service, token_rows
from tests.ports import free_port
from tests.procs import PQCNET as PQCNET_EXE

PQCNET = [PQCNET_EXE]
WILD = f"spiffe://{TD}/acme/relayer/*"


def _issued(path: str) -> float:
    return ISSUED.labels(path=path)._value.get()


async def test_same_node_same_key_gets_its_answer_again(service: Service) -> None:
    bundle = service.token(WILD)
    key = SigningKey.generate()
    sid = SpiffeId.parse(f"{WILD[:-1]}r1")
    first, _ = await client.enroll(service.url, bundle, sid, key)
    retries, replays = _issued("enroll_retry"), TOKEN_REPLAYS._value.get()
    again, _ = await client.enroll(service.url, bundle, sid, key)  # the answer was "lost"
    assert again.spiffe_id == sid and again.serial != first.serial
    assert again.key.public_key.raw == key.public_key.raw
    assert _issued("enroll_retry") == retries + 1
    assert TOKEN_REPLAYS._value.get() == replays  # not a replay
    assert service.vertices() == 2  # both issuances are QS-DAG vertices
    assert {first.serial, again.serial} <= set(service.ca.issued)


async def test_spent_token_with_another_key_or_id_is_still_a_replay(service: Service) -> None:
    bundle = service.token(WILD)
    key = SigningKey.generate()
    sid = SpiffeId.parse(f"{WILD[:-1]}r1")
    await client.enroll(service.url, bundle, sid, key)
    before, replays = service.state(), TOKEN_REPLAYS._value.get()
    attempts = [
        (sid, SigningKey.generate()),  # stole the token, not the key
        (SpiffeId.parse(f"{WILD[:-1]}r2"), key),  # same key, another node of the pattern
    ]
    for other_sid, other_key in attempts:
        with pytest.raises(CaServiceError) as err:
            await client.enroll(service.url, bundle, other_sid, other_key)
        assert (err.value.status, err.value.code) == (401, "token_used")
    assert TOKEN_REPLAYS._value.get() == replays + 2
    assert service.state() == before, "a refused retry wrote something"


async def test_no_retry_once_the_token_expired(service: Service) -> None:
    key = SigningKey.generate()
    sid = SpiffeId.parse(f"{WILD[:-1]}r1")
    # a token that expires 2 s from now: spend it, then wait until it expired
    bundle = service.token(WILD, ttl=dt.timedelta(seconds=2))
    await client.enroll(service.url, bundle, sid, key)
    await asyncio.sleep(max(0.0, (bundle.expires_at - utcnow()).total_seconds()) + 0.2)
    before = service.state()
    with pytest.raises(CaServiceError) as err:
        await client.enroll(service.url, bundle, sid, key)
    assert (err.value.status, err.value.code) == (401, "token_used")
    assert service.state() == before


# ------------------------------------------------------------------ the CA killed mid-run

N_NODES = 8


def _serve(tmp: Path, port: int, env: dict[str, str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen([*PQCNET, "--log-level", "info", "ca", "serve", "--dir", "ca",
                             "--port", str(port), "--enroll-rate", "1000",
                             "--enroll-burst", "1000"],
                            cwd=tmp, env=env, stdout=subprocess.PIPE,
                            stderr=open(tmp / "serve.log", "a"), text=True)  # noqa: SIM115
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line and json.loads(line)["ready"] is True, (tmp / "serve.log").read_text()[-2000:]
    return proc


def _spent(ca_dir: Path) -> int:
    return sum(1 for row in token_rows(ca_dir) if row[5] is not None)  # used_us


def test_ca_killed_mid_enrollment_strands_no_node(tmp_path: Path) -> None:
    """``pqcnet ca serve`` gets SIGKILL right after the first token is spent, while the
    other nodes' enrollments are in flight, and comes back on the same port. Every
    ``pqcnet node enroll`` still ends enrolled (its retries reach the restarted CA; a
    node whose answer was lost is recognised), each certificate a node holds is in the
    CA's issued log and anchored as a QS-DAG issuance vertex, no serial twice, and
    nothing half-written on either side."""
    env = {**os.environ, "PQCNET_CA_PASSPHRASE": "ca-pw", "PQCNET_NODE_PASSPHRASE": "node-pw"}
    made = subprocess.run([*PQCNET, "ca", "init", "--dir", "ca", "--trust-domain", TD],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    ca_dir = tmp_path / "ca"
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    ca_bundle = (ca_dir / "ca-cert.pem").read_bytes()
    store = TokenStore(ca_dir)
    for k in range(N_NODES):
        secret, rec = store.create(f"spiffe://{TD}/acme/relayer/n{k}", "relayer",
                                   dt.timedelta(minutes=10))
        write_bundle(tmp_path / f"n{k}.token", TokenBundle(secret, rec.pattern, rec.role,
                                                           rec.expires_at, ca_bundle, url))
    serve = _serve(tmp_path, port, env)
    nodes: list[subprocess.Popen[str]] = []
    try:
        nodes = [subprocess.Popen([*PQCNET, "node", "enroll", "--token-file", f"n{k}.token",
                                   "--out", f"n{k}", "--retry-for", "120", "--timeout", "10"],
                                  cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
                 for k in range(N_NODES)]
        deadline = time.monotonic() + 120
        while _spent(ca_dir) == 0:
            assert time.monotonic() < deadline, "no enrollment reached the CA"
            assert serve.poll() is None
            time.sleep(0.005)
        serve.send_signal(signal.SIGKILL)
        serve.wait()
        killed_at_spent = _spent(ca_dir)
        time.sleep(1.5)  # down for a while: in-flight requests fail, nodes back off
        serve = _serve(tmp_path, port, env)
        outs = [(p.communicate(timeout=300), p.returncode) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(timeout=20)
        except subprocess.TimeoutExpired:
            serve.kill()
    assert killed_at_spent < N_NODES, "the CA was killed only after all enrollments: no fault"
    for k, ((stdout, stderr), code) in enumerate(outs):
        assert code == 0, f"node n{k} failed: {stderr[-1500:]}"
        assert "Traceback" not in stderr
        assert json.loads(stdout)["enrolled"] == f"spiffe://{TD}/acme/relayer/n{k}"
    # independent of the service: its files, read after it stopped
    ca = MeshCA.load(ca_dir, b"ca-pw")
    ledger = Ledger.open(ca_dir / "ledger")
    try:
        anchored = {json.loads(p.body)["sha3_256"]
                    for p in (ledger.payload(v) for v in ledger.ids())
                    if isinstance(p, OpaqueRecord) and p.content_type == ISSUED_CONTENT_TYPE}
    finally:
        ledger.close()
    serials = []
    for k in range(N_NODES):
        node = NodeIdentity.load(tmp_path / f"n{k}", b"node-pw")
        serials.append(node.serial)
        assert node.serial in ca.issued, f"n{k} holds a certificate the CA did not record"
        der = node.certificate.public_bytes(Encoding.DER)
        assert hashlib.sha3_256(der).hexdigest() in anchored, f"n{k}'s issuance not anchored"
    assert len(set(serials)) == N_NODES
    assert _spent(ca_dir) == N_NODES  # every token spent once, the file intact
