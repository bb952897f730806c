"""`pqcnet qstp serve|connect` as real processes over loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pqcnet.identity import dev_identities

from .qstputil import CLIENT_ID, SERVER_ID, make_mesh

pytestmark = pytest.mark.timeout(90)

PASS_ENV = "PQCNET_TEST_NODE_PASSPHRASE"


def pqcnet(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, PASS_ENV: "s3cret"}
    return subprocess.run([sys.executable, "-c", "from pqcnet.cli import main; main()", *args],
                          capture_output=True, text=True, env=env, timeout=60, check=check)


@pytest.fixture(scope="module")
def identities(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ids")
    mesh = make_mesh()
    _ca, (stranger,) = dev_identities("mesh.test", "spiffe://mesh.test/acme/publisher/zz")
    out = {}
    for name, ident in (("server", mesh.server), ("client", mesh.client),
                        ("stranger", stranger)):
        ident.save(root / name, b"s3cret")
        out[name] = root / name
    return out


@pytest.fixture
def server(identities: dict[str, Path]) -> Iterator[tuple[subprocess.Popen[str], int]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", "from pqcnet.cli import main; main()", "qstp", "serve",
         "--identity", str(identities["server"]), "--passphrase-env", PASS_ENV,
         "--port", "0", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, PASS_ENV: "s3cret"})
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())
        assert first["event"] == "listening"
        assert first["identity"] == SERVER_ID
        yield proc, int(first["listening"].rsplit(":", 1)[1])
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_help_texts() -> None:
    for sub in ("serve", "connect"):
        res = pqcnet("qstp", sub, "--help")
        assert res.returncode == 0
        assert "--identity" in res.stdout


def test_connect_prints_negotiated_parameters_and_resumes(
    server: tuple[subprocess.Popen[str], int], identities: dict[str, Path]
) -> None:
    proc, port = server
    res = pqcnet("qstp", "connect", f"127.0.0.1:{port}", "--identity",
                 str(identities["client"]), "--passphrase-env", PASS_ENV, "--json",
                 "--send", "hello qstp", "--resume")
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    first, echo, second, _echo2 = lines
    assert first["event"] == "connection"
    assert first["tls_version"] == "TLSv1.3"
    assert first["group"] == "X25519MLKEM768"
    assert first["cipher"] == "TLS_AES_256_GCM_SHA384"
    assert first["peer"] == SERVER_ID
    assert first["resumed"] is False
    assert "peer_cert_not_after" in first
    assert echo == {"event": "echo", "sent": "hello qstp", "reply": "hello qstp"}
    assert second["event"] == "resumed connection" and second["resumed"] is True
    # the server printed the client's identity for both tunnels
    proc.terminate()
    out, _err = proc.communicate(timeout=10)
    tunnels = [json.loads(line) for line in out.splitlines() if '"tunnel"' in line]
    assert [t["peer"] for t in tunnels] == [CLIENT_ID, CLIENT_ID]
    assert [t["resumed"] for t in tunnels] == [False, True]


def test_refused_handshake_exits_nonzero_with_one_clear_line(
    server: tuple[subprocess.Popen[str], int], identities: dict[str, Path]
) -> None:
    _proc, port = server
    res = pqcnet("qstp", "connect", f"127.0.0.1:{port}", "--identity",
                 str(identities["stranger"]), "--passphrase-env", PASS_ENV)
    assert res.returncode == 1
    assert res.stdout == ""
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "refused" in errors[0]
    assert "Traceback" not in res.stderr


def _one_error(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 1 and "Traceback" not in res.stderr
    (line,) = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    return line


def test_missing_passphrase_is_a_clear_error(identities: dict[str, Path]) -> None:
    res = pqcnet("qstp", "connect", "127.0.0.1:9", "--identity", str(identities["client"]),
                 "--passphrase-env", "PQCNET_UNSET_VARIABLE_FOR_TEST")
    key = identities["client"] / "key.pem"
    assert _one_error(res) == (
        f"error: cannot load identity from {identities['client']}: {key} is encrypted: "
        "a passphrase is required (set $PQCNET_UNSET_VARIABLE_FOR_TEST)")


def test_a_missing_bundle_is_named_not_blamed_on_the_key(
        identities: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "client"
    broken.mkdir()
    for name in ("key.pem", "cert.pem"):
        (broken / name).write_bytes((identities["client"] / name).read_bytes())
    for env in (PASS_ENV, "PQCNET_UNSET_VARIABLE_FOR_TEST"):  # with or without a passphrase
        res = pqcnet("qstp", "connect", "127.0.0.1:9", "--identity", str(broken),
                     "--passphrase-env", env)
        assert _one_error(res) == (f"error: cannot load identity from {broken}: trust "
                                   f"bundle file not found: {broken / 'bundle.pem'}")
