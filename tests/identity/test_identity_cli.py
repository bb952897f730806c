"""``pqcnet ca`` / ``pqcnet keys`` end to end, and their files used for a real handshake."""

from __future__ import annotations

from pathlib import Path

import pytest

from pqcnet.cli import main
from pqcnet.identity import NodeIdentity, load_crl
from pqcnet.qstp.tls import HandshakeRefused, TlsPolicy, build_context, new_connection
from tests.qstp.tlsutil import handshake_pair

pytestmark = pytest.mark.timeout(120)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        main(list(argv))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PQCNET_CA_PASSPHRASE", "ca-secret")
    monkeypatch.setenv("PQCNET_NODE_PASSPHRASE", "node-secret")


def test_ca_lifecycle_and_handshake(tmp_path: Path, capsys, env) -> None:  # type: ignore[no-untyped-def]
    ca, td = str(tmp_path / "ca"), "example.org"
    assert run(capsys, "ca", "init", "--dir", ca, "--trust-domain", td,
               "--role", "sentry", "--role", "relayer")[0] == 0
    code, out, _ = run(capsys, "ca", "issue", "--dir", ca, f"spiffe://{td}/acme/sentry/s1",
                       "--out", str(tmp_path / "s1"))
    assert code == 0 and "issued" in out
    # node-side key + CSR, CA signs it
    key, csr, cert = (str(tmp_path / n) for n in ("r1.key", "r1.csr", "r1.pem"))
    assert run(capsys, "keys", "gen", "--out", key)[0] == 0
    assert run(capsys, "keys", "csr", "--key", key, "--spiffe-id",
               f"spiffe://{td}/acme/relayer/r1", "--out", csr)[0] == 0
    assert run(capsys, "ca", "sign-csr", "--dir", ca, csr, "--out", cert, "--ttl", "2h")[0] == 0
    r1_dir = tmp_path / "r1"
    r1_dir.mkdir()
    (r1_dir / "key.pem").write_bytes(Path(key).read_bytes())
    (r1_dir / "cert.pem").write_bytes(Path(cert).read_bytes())
    code, bundle, _ = run(capsys, "ca", "bundle", "--dir", ca)
    (r1_dir / "bundle.pem").write_text(bundle)

    sentry = NodeIdentity.load(tmp_path / "s1", b"node-secret")
    relayer = NodeIdentity.load(r1_dir, b"node-secret")
    policy = TlsPolicy()

    def handshake(server_id: NodeIdentity):  # type: ignore[no-untyped-def]
        server = new_connection(build_context(server_id, policy, server=True), server=True)
        client = new_connection(build_context(relayer, policy, server=False), server=False)
        return handshake_pair(client, server)

    assert handshake(sentry).ok
    # revoke the relayer's certificate, publish a CRL, hand it to the sentry
    code, out, _ = run(capsys, "ca", "revoke", "--dir", ca, "--cert", cert,
                       "--reason", "key_compromise")
    assert code == 0 and "key_compromise" in out
    crl_file = tmp_path / "crl.pem"
    assert run(capsys, "ca", "crl", "--dir", ca, "--out", str(crl_file))[0] == 0
    crl = load_crl(crl_file.read_bytes(), sentry.trust_bundle_pem)
    assert crl.is_revoked(relayer.serial)
    outcome = handshake(sentry.with_crl(crl_file.read_bytes()))
    assert isinstance(outcome.server_error, HandshakeRefused)
    assert outcome.server_error.reason == "revoked"
    code, out, _ = run(capsys, "ca", "show", str(tmp_path / "s1"))
    assert code == 0 and f"spiffe://{td}/acme/sentry/s1" in out


def test_cli_errors_are_one_line(tmp_path: Path, capsys, env, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    ca = str(tmp_path / "ca")
    assert run(capsys, "ca", "init", "--dir", ca, "--trust-domain", "ex.org",
               "--role", "sentry", "--max-ttl", "6h", "--default-ttl", "1h")[0] == 0
    cases = [
        (("ca", "issue", "--dir", ca, "spiffe://ex.org/a/relayer/r", "--out", "x"), "role"),
        (("ca", "issue", "--dir", ca, "spiffe://ex.org/a/sentry/s", "--out", "x",
          "--ttl", "7h"), "exceeds"),
        (("ca", "issue", "--dir", str(tmp_path / "none"), "spiffe://ex.org/a/sentry/s",
          "--out", "x"), "no CA"),
        (("ca", "issue", "--dir", ca, "nonsense", "--out", "x"), "SPIFFE"),
        (("ca", "init", "--dir", ca, "--trust-domain", "ex.org"), "already"),
        (("ca", "revoke", "--dir", ca, "--spiffe-id", "spiffe://ex.org/a/sentry/n"),
         "no unexpired"),
    ]
    for argv, needle in cases:
        code, _, err = run(capsys, *argv)
        assert code == 1, argv
        assert err.startswith("error: ") and needle in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    monkeypatch.setenv("PQCNET_CA_PASSPHRASE", "wrong")
    code, _, err = run(capsys, "ca", "crl", "--dir", ca)
    assert code == 1 and "wrong passphrase" in err
    code, _, err = run(capsys, "ca", "revoke", "--dir", ca)
    assert code == 2 and "exactly one" in err  # usage error
    code, _, err = run(capsys, "ca", "init", "--dir", ca, "--trust-domain", "x",
                       "--max-ttl", "soon")
    assert code == 2 and "duration" in err


def test_help_for_every_command(capsys) -> None:  # type: ignore[no-untyped-def]
    for argv in (("ca",), ("keys",), ("ca", "init"), ("ca", "issue"), ("ca", "sign-csr"),
                 ("ca", "revoke"), ("ca", "crl"), ("ca", "bundle"), ("ca", "show"),
                 ("keys", "gen"), ("keys", "csr")):
        code, out, _ = run(capsys, *argv, "--help")
        assert code == 0 and "Usage:" in out
