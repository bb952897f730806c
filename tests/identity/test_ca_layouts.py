"""The CA honours configured SPIFFE layouts (``spiffe_layouts``) when it decides what to
sign: an ID of another shape (``spiffe://td/ns/acme/sa/web``) gets its tenant and role
from the layout it fits, and every rule that reads them (allowed tenants and roles, token
bindings, nodes per tenant) applies; an ID that fits no layout is refused. Shown on the
library, on ``pqcnet ca serve``'s enrollment over real PQ TLS sockets, and on the CLI.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pqcnet.cli import main
from pqcnet.crypto.pqc import SigningKey
from pqcnet.identity import IssuancePolicy, MeshCA, NodeIdentity, SpiffeId
from pqcnet.identity.ca import stored_policy
from pqcnet.identity.errors import IdentityError, PolicyViolation
from pqcnet.identity.spiffe import SpiffeLayout
from pqcnet.identity.tokens import TokenBundle, TokenStore
from pqcnet.qsdag.ledger import Ledger
from pqcnet.runtime import enroll as client
from pqcnet.runtime.ca_service import CaService, CaServiceConfig
from pqcnet.runtime.errors import CaServiceError

pytestmark = pytest.mark.timeout(120)

TD = "corp.test"
K8S = SpiffeLayout.of(f"spiffe://{TD}/ns/{{tenant}}/sa/{{node}}", role="sidecar")
POLICY = IssuancePolicy(allowed_roles=("sidecar", "relayer"), allowed_tenants=("acme",),
                        spiffe_layouts=(K8S,))


def test_policy_reads_tenant_and_role_through_the_layouts(tmp_path: Path) -> None:
    ca = MeshCA.create(TD, policy=POLICY)
    web = ca.issue(f"spiffe://{TD}/ns/acme/sa/web", dt.timedelta(hours=1))
    assert str(web.spiffe_id) == f"spiffe://{TD}/ns/acme/sa/web"  # the SAN as asked
    ca.issue(f"spiffe://{TD}/acme/relayer/r1")  # the three-segment shape still works
    with pytest.raises(PolicyViolation, match="tenant 'globex' not allowed"):
        ca.issue(f"spiffe://{TD}/ns/globex/sa/web")
    with pytest.raises(PolicyViolation, match="fits none of the CA's SPIFFE layouts"):
        ca.issue(f"spiffe://{TD}/apps/acme/web/x")
    # without the layout the same ID has no role and is refused by the role rule
    bare = MeshCA.create(TD, policy=IssuancePolicy(allowed_roles=("sidecar",)))
    with pytest.raises(PolicyViolation, match="role '' not allowed"):
        bare.issue(f"spiffe://{TD}/ns/acme/sa/web")
    # the layouts are part of the CA's saved policy
    ca.save(tmp_path / "ca", b"pw")
    assert stored_policy(tmp_path / "ca").spiffe_layouts == (K8S,)
    assert MeshCA.load(tmp_path / "ca", b"pw").policy == POLICY


def test_token_bindings_of_another_shape_must_fit_a_layout(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    hour = dt.timedelta(hours=1)
    store.create(f"spiffe://{TD}/ns/acme/sa/*", "sidecar", hour, layouts=(K8S,))
    with pytest.raises(IdentityError, match=re.escape("ns/{tenant}/sa/{node}")):
        store.create(f"spiffe://{TD}/ns/acme/sa/*", "relayer", hour, layouts=(K8S,))
    with pytest.raises(IdentityError, match="token pattern must be"):
        store.create(f"spiffe://{TD}/apps/acme/web/*", "sidecar", hour, layouts=(K8S,))
    with pytest.raises(IdentityError, match="token pattern must be"):
        store.create(f"spiffe://{TD}/ns/acme/sa/*", "sidecar", hour)  # CA has no layouts


class _Svc:
    def __init__(self, ca: MeshCA, tokens: TokenStore, service: CaService, url: str,
                 ledger: Ledger) -> None:
        self.ca, self.tokens, self.service, self.url, self.ledger = (ca, tokens, service,
                                                                     url, ledger)

    def bundle(self, pattern: str, role: str) -> TokenBundle:
        secret, rec = self.tokens.create(pattern, role, dt.timedelta(minutes=5),
                                         layouts=self.ca.policy.spiffe_layouts)
        return TokenBundle(secret, pattern, role, rec.expires_at, self.ca.trust_bundle_pem(),
                           self.url)

    async def enroll(self, bundle: TokenBundle, sid: str) -> NodeIdentity:
        ident, _ = await client.enroll(self.url, bundle, SpiffeId.parse(sid),
                                       SigningKey.generate())
        return ident


@pytest.fixture
async def svc(tmp_path: Path) -> AsyncIterator[_Svc]:
    ca = MeshCA.create(TD, policy=POLICY)
    ca.save(tmp_path, b"pw")
    tokens, ledger = TokenStore(tmp_path), Ledger.open(tmp_path / "ledger")
    service = CaService(ca, tmp_path, tokens, CaServiceConfig(max_nodes_per_tenant=2),
                        ledger=ledger)
    port = await service.start()
    try:
        yield _Svc(ca, tokens, service, f"https://127.0.0.1:{port}", ledger)
    finally:
        await service.close()
        ledger.close()


async def test_ca_service_enrolls_ids_of_a_configured_layout(svc: _Svc) -> None:
    ident = await svc.enroll(svc.bundle(f"spiffe://{TD}/ns/acme/sa/*", "sidecar"),
                             f"spiffe://{TD}/ns/acme/sa/web")
    assert str(ident.spiffe_id) == f"spiffe://{TD}/ns/acme/sa/web"
    assert ident.certificate.issuer == svc.ca.certificate.subject
    # renewing with the current certificate works for such an ID too
    new = await client.rotate(svc.url, ident)
    assert str(new.spiffe_id) == str(ident.spiffe_id) and new.serial != ident.serial


async def test_ca_service_refuses_what_the_layout_makes_off_policy(svc: _Svc) -> None:
    async def refused(bundle: TokenBundle, sid: str, status: int, code: str) -> str:
        issued = len(svc.ca.issued)
        with pytest.raises(CaServiceError) as err:
            await svc.enroll(bundle, sid)
        assert (err.value.status, err.value.code) == (status, code), err.value
        assert len(svc.ca.issued) == issued, "a refused enrollment issued a certificate"
        return str(err.value)

    any_ns = svc.bundle(f"spiffe://{TD}/ns/*/sa/*", "sidecar")
    # tenant globex (read through the layout) is not in the CA's allowed tenants
    assert "globex" in await refused(any_ns, f"spiffe://{TD}/ns/globex/sa/web", 403, "policy")
    # an ID of a shape no layout describes: its tenant and role are unknown
    three = svc.bundle(f"spiffe://{TD}/acme/sidecar/*", "sidecar")
    assert "fits none" in await refused(three, f"spiffe://{TD}/apps/acme/web/x", 403,
                                        "policy")
    # the token's binding is checked on the layout's role and pattern
    assert "outside this token's binding" in await refused(
        any_ns, f"spiffe://{TD}/acme/relayer/r9", 403, "wrong_pattern")
    # nodes per tenant counts layout-shaped IDs under their tenant (limit 2)
    for name in ("a", "b"):
        await svc.enroll(svc.bundle(f"spiffe://{TD}/ns/acme/sa/*", "sidecar"),
                         f"spiffe://{TD}/ns/acme/sa/{name}")
    await refused(svc.bundle(f"spiffe://{TD}/ns/acme/sa/*", "sidecar"),
                  f"spiffe://{TD}/ns/acme/sa/c", 403, "max_nodes")


async def test_attested_role_read_through_the_layout(tmp_path: Path) -> None:
    """``--attest-role sidecar``: a layout-shaped ID is a sidecar, so it must attest, and
    its attestation must name the role the layout gives it."""
    ca = MeshCA.create(TD, policy=POLICY)
    ca.save(tmp_path, b"pw")
    service = CaService(ca, tmp_path, TokenStore(tmp_path),
                        CaServiceConfig(attest_roles=("sidecar",)))
    svc = _Svc(ca, service.tokens, service, f"https://127.0.0.1:{await service.start()}",
               Ledger.open(tmp_path / "ledger"))
    sid = SpiffeId.parse(f"spiffe://{TD}/ns/acme/sa/web")
    try:
        with pytest.raises(CaServiceError) as err:
            await svc.enroll(svc.bundle(f"spiffe://{TD}/ns/acme/sa/*", "sidecar"), str(sid))
        assert (err.value.status, err.value.code) == (403, "attestation_required")
        # the role as the ID names it (none), a wrong one, the one the layout reads
        for role, refusal in (("", (400, "bad_attestation")),
                              ("relayer", (403, "attestation_mismatch")), ("sidecar", None)):
            key = SigningKey.generate()
            att = client.attestation_for(key, dataclasses.replace(sid, role=role))
            coro = client.enroll(svc.url, svc.bundle(f"spiffe://{TD}/ns/acme/sa/*", "sidecar"),
                                 sid, key, attestation=att)
            if refusal is None:
                assert str((await coro)[0].spiffe_id) == str(sid)
                continue
            with pytest.raises(CaServiceError) as err:
                await coro
            assert (err.value.status, err.value.code) == refusal
    finally:
        await service.close()
        svc.ledger.close()


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    try:
        main(list(argv))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out + err


def test_cli_init_with_a_layout_then_issue_and_tokens(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    ca = str(tmp_path / "ca")
    layout = f"spiffe://{TD}/ns/{{tenant}}/sa/{{node}},role=sidecar"
    code, out = _run(capsys, "ca", "init", "--dir", ca, "--trust-domain", TD,
                     "--no-passphrase", "--tenant", "acme", "--spiffe-layout", layout)
    assert code == 0, out
    code, out = _run(capsys, "ca", "issue", "--dir", ca, "--no-passphrase",
                     "--no-node-passphrase", f"spiffe://{TD}/ns/acme/sa/web",
                     "--out", str(tmp_path / "web"))
    assert code == 0 and "issued" in out, out
    code, out = _run(capsys, "ca", "issue", "--dir", ca, "--no-passphrase",
                     "--no-node-passphrase", f"spiffe://{TD}/ns/globex/sa/web",
                     "--out", str(tmp_path / "bad"))
    assert code != 0 and "tenant 'globex' not allowed" in out, out
    assert not (tmp_path / "bad").exists()
    code, out = _run(capsys, "ca", "token", "create", "--dir", ca, "--pattern",
                     f"spiffe://{TD}/ns/acme/sa/*", "--role", "sidecar",
                     "--out", str(tmp_path / "tok.json"))
    assert code == 0, out
    code, out = _run(capsys, "ca", "token", "create", "--dir", ca, "--pattern",
                     f"spiffe://{TD}/ns/acme/sa/*", "--role", "relayer",
                     "--out", str(tmp_path / "tok2.json"))
    assert code != 0 and "token pattern must be" in out, out
    assert not (tmp_path / "tok2.json").exists()
    code, out = _run(capsys, "ca", "init", "--dir", str(tmp_path / "ca2"), "--trust-domain",
                     TD, "--no-passphrase", "--spiffe-layout", f"spiffe://{TD}/ns/{{tenant}}")
    assert code != 0 and "needs {role} or a fixed role" in out, out


def test_node_enroll_attests_the_role_its_layout_gives(tmp_path: Path) -> None:
    """`pqcnet ca serve --attest-role sidecar` and `pqcnet node enroll --attest` for a
    layout-shaped ID: the node attests as the token's role (the ID itself names none)."""
    exe = str(Path(sys.executable).parent / "pqcnet")
    env = {**os.environ, "PQCNET_CA_PASSPHRASE": "ca-pw"}

    def pqcnet(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([exe, *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120)

    made = pqcnet("ca", "init", "--dir", "ca", "--trust-domain", TD, "--spiffe-layout",
                  f"spiffe://{TD}/ns/{{tenant}}/sa/{{node}},role=sidecar")
    assert made.returncode == 0, made.stderr
    serve = subprocess.Popen([exe, "ca", "serve", "--dir", "ca", "--port", "0",
                              "--attest-role", "sidecar"], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert serve.stdout is not None
        ready = json.loads(serve.stdout.readline() or "{}")
        assert ready.get("ready") is True, serve.stderr.read() if serve.stderr else ""
        made = pqcnet("ca", "token", "create", "--dir", "ca", "--pattern",
                      f"spiffe://{TD}/ns/acme/sa/*", "--role", "sidecar", "--ca-url",
                      ready["url"], "--out", "web.token")
        assert made.returncode == 0, made.stderr
        joined = pqcnet("node", "enroll", "--token-file", "web.token", "--spiffe-id",
                        f"spiffe://{TD}/ns/acme/sa/web", "--out", "web", "--no-passphrase",
                        "--attest")
        assert joined.returncode == 0, joined.stderr
        assert json.loads(joined.stdout)["enrolled"] == f"spiffe://{TD}/ns/acme/sa/web"
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(timeout=20)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
