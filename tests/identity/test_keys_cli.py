"""``pqcnet keys`` (split, combine, share-serve, --key-store) and ``pqcnet ca --key-store``.

The share service runs as a real ``pqcnet keys share-serve`` process; the node side
is the CLI gathering from it over QSTP. Bad arguments are one ``error:`` line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import pqcnet.runtime.logging as plog
from pqcnet.identity.hsm import Pkcs11KeyStore, wrapped_public_key
from pqcnet.identity.keyconfig import open_key_store, read_key_store_file
from tests.identity.conftest import Token
from tests.identity.test_identity_cli import run
from tests.procs import PQCNET as PQCNET_EXE

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(autouse=True)
def _flush_logs() -> Iterator[None]:
    """``main()`` logs through a writer thread bound to capsys's stderr: flush it
    before capsys closes that stream, or a late record hits a closed file."""
    yield
    plog._stop_listener()

TD = "example.org"
PQCNET = Path(PQCNET_EXE)


def test_split_and_combine(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PQCNET_NODE_PASSPHRASE", "pw")
    key, shares = str(tmp_path / "k.pem"), tmp_path / "shares"
    assert run(capsys, "keys", "gen", "--out", key)[0] == 0
    code, out, _ = run(capsys, "keys", "split", "--key", key, "--shares", "5", "--threshold",
                       "3", "--out-dir", str(shares))
    assert code == 0 and "split 3-of-5" in out
    manifest = str(shares / "key.shares.json")
    code, out, _ = run(capsys, "keys", "combine", "--manifest", manifest,
                       *(str(shares / f"share-{i}.json") for i in (5, 2, 4)),
                       "--out", str(tmp_path / "back.pem"))
    assert code == 0 and "rebuilt" in out
    assert run(capsys, "keys", "show", "--key", str(tmp_path / "back.pem"))[1].split()[2] == \
        run(capsys, "keys", "show", "--key", key)[1].split()[2]
    code, _, err = run(capsys, "keys", "combine", "--manifest", manifest,
                       str(shares / "share-1.json"), str(shares / "share-2.json"))
    assert code == 1 and err.strip() == (
        "error: 2 share(s) given, 3 needed (a 3-of-5 split)")


@pytest.mark.parametrize(("n", "k", "message"), [
    ("3", "5", "error: threshold must be 2..3 (the share count), got 5"),
    ("20", "3", "error: share count must be 2..16, got 20"),
    ("5", "1", "error: threshold must be 2..5 (the share count), got 1"),
])
def test_split_refuses_bad_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  n: str, k: str, message: str) -> None:
    assert run(capsys, "keys", "gen", "--out", str(tmp_path / "k.pem"), "--no-passphrase")[0] == 0
    code, _, err = run(capsys, "keys", "split", "--key", str(tmp_path / "k.pem"),
                       "--no-passphrase", "--shares", n, "--threshold", k,
                       "--out-dir", str(tmp_path / "s"))
    assert code == 1 and err.strip() == message
    assert not (tmp_path / "s").exists()


def test_key_store_option_needs_exactly_one_source(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "keys", "gen", "--no-passphrase")
    assert code == 2 and "exactly one of --key/--out and --key-store" in err


@pytest.mark.services
def test_hsm_key_and_hsm_ca_through_the_cli(tmp_path: Path, token: Token,
                                            capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PQCNET_PKCS11_PIN", token.pin)
    monkeypatch.chdir(tmp_path)
    kek = f"cli-{os.getpid()}-{time.monotonic_ns()}"
    Path("ca.yaml").write_text(f"kind: pkcs11\nmodule: {token.module}\ntoken_label: "
                               f"{token.label}\nkek_label: {kek}-ca\n"
                               "wrapped_key_file: ca/ca-key.wrapped\n")
    Path("node.yaml").write_text(f"key_store:\n  kind: pkcs11\n  module: {token.module}\n"
                                 f"  token_label: {token.label}\n  kek_label: {kek}-n\n"
                                 "  wrapped_key_file: n1/key.wrapped\n")
    code, out, err = run(capsys, "ca", "init", "--dir", "ca", "--trust-domain", TD,
                         "--key-store", "ca.yaml")
    assert code == 0, err
    assert not Path("ca/ca-key.pem").exists() and Path("ca/key-store.yaml").exists()
    # later commands find the recorded key store by themselves
    assert run(capsys, "ca", "issue", "--dir", "ca", "--no-node-passphrase",
               f"spiffe://{TD}/acme/sentry/s1", "--out", "s1")[0] == 0
    assert run(capsys, "keys", "gen", "--key-store", "node.yaml")[0] == 0
    assert run(capsys, "keys", "csr", "--key-store", "node.yaml", "--spiffe-id",
               f"spiffe://{TD}/acme/relayer/n1", "--out", "n1.csr")[0] == 0
    assert run(capsys, "ca", "sign-csr", "--dir", "ca", "n1.csr", "--out", "n1/cert.pem")[0] == 0
    code, bundle, _ = run(capsys, "ca", "bundle", "--dir", "ca")
    Path("n1/bundle.pem").write_text(bundle)
    code, out, _ = run(capsys, "keys", "show", "--key-store", "node.yaml", "--identity", "n1")
    assert code == 0 and f"identity spiffe://{TD}/acme/relayer/n1" in out
    assert out.split()[2] == wrapped_public_key(Path("n1/key.wrapped")).key_id.hex()[:16]
    assert run(capsys, "ca", "revoke", "--dir", "ca", "--spiffe-id",
               f"spiffe://{TD}/acme/sentry/s1")[0] == 0
    monkeypatch.setenv("PQCNET_PKCS11_PIN", "0000")
    code, _, err = run(capsys, "ca", "crl", "--dir", "ca")
    assert code == 1 and err.strip() == f"error: PKCS#11 PIN incorrect for token {token.label!r}"
    # clean up this test's KEKs
    monkeypatch.setenv("PQCNET_PKCS11_PIN", token.pin)
    for name in ("ca/key-store.yaml", "node.yaml"):
        hsm = open_key_store(read_key_store_file(Path(name)))
        assert isinstance(hsm, Pkcs11KeyStore)
        hsm.destroy_kek()


def test_share_serve_process_and_node_gathering(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PQCNET_NODE_PASSPHRASE", raising=False)
    no = ("--no-passphrase",)
    assert run(capsys, "ca", "init", "--dir", "ca", "--trust-domain", TD, *no)[0] == 0
    for name, sid in (("c1", "ops/custodian/c1"), ("c2", "ops/custodian/c2"),
                      ("boot", "acme/relayer/r1"), ("evil", "acme/relayer/evil")):
        assert run(capsys, "ca", "issue", "--dir", "ca", *no, "--no-node-passphrase",
                   f"spiffe://{TD}/{sid}", "--out", name)[0] == 0
    assert run(capsys, "keys", "gen", "--out", "lt.pem", *no)[0] == 0
    assert run(capsys, "keys", "split", "--key", "lt.pem", *no, "--shares", "2",
               "--threshold", "2", "--out-dir", "shares")[0] == 0
    procs = []
    try:
        for i in (1, 2):
            procs.append(subprocess.Popen(
                [str(PQCNET), "keys", "share-serve", "--identity", f"c{i}", *no,
                 "--share", f"shares/share-{i}.json", "--allow", f"spiffe://{TD}/acme/relayer/r1",
                 "--port-file", f"c{i}.port"],
                stderr=subprocess.PIPE, text=True))
        deadline = time.monotonic() + 60
        while not all(Path(f"c{i}.port").exists() for i in (1, 2)):
            assert time.monotonic() < deadline, "share services did not start"
            assert all(p.poll() is None for p in procs), "a share service exited"
            time.sleep(0.1)
        ports = [Path(f"c{i}.port").read_text().strip() for i in (1, 2)]
        for client in ("boot", "evil"):
            Path(f"{client}.yaml").write_text(
                "kind: shamir\nmanifest: shares/key.shares.json\n"
                f"client_identity: {client}\n"
                "client_key_store: {kind: file, passphrase_env: null}\n"
                "timeout_s: 10\ncustodians:\n" + "".join(
                    f"  - {{address: '127.0.0.1:{p}', spiffe_id: 'spiffe://{TD}/ops/custodian/c{i}'}}\n"
                    for i, p in zip((1, 2), ports)))
        code, out, err = run(capsys, "keys", "show", "--key-store", "boot.yaml")
        assert code == 0, err
        lt = run(capsys, "keys", "show", "--key", "lt.pem", *no)[1].split()[2]
        assert out.split()[2] == lt
        code, _, err = run(capsys, "keys", "show", "--key-store", "evil.yaml")
        plog._stop_listener()  # the per-custodian warnings come from the writer thread
        err += capsys.readouterr().err
        (line,) = [x for x in err.splitlines() if x.startswith("error:")]
        assert code == 1 and line.startswith("error: 0 of 2 shares gathered from 2 custodians; ")
        assert "refused the handshake" in line and "custodian gave no share" in err
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        logs = [proc.communicate(timeout=30)[1] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), logs
    assert all("stopped after releasing 1 share(s)" in log for log in logs), logs
