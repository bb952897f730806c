"""One writer of a CA directory at a time (:mod:`pqcnet.identity.ca_lock`).

Before, ``pqcnet ca revoke --dir`` beside a running ``pqcnet ca serve`` printed
"revoked", the service never saw it, and its next state write undid it; two CLI
writers at once could lose one's change the same way. Now the service holds the
directory's writer lock while it runs — CLI writers are refused at once, naming it and
what to do — and short writers wait for each other. Checked with real processes, the
state read back from the files the CA writes (``ca-state.json``), not through the
process that wrote them."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from pqcnet.identity import MeshCA, NodeIdentity
from pqcnet.identity.ca_lock import SERVICE, CaDirBusy, ca_writer
from pqcnet.runtime.rotation import LocalCaRenewer
from tests.procs import PQCNET, terminate

TD = "example.org"
ENV = {**os.environ, "PQCNET_CA_PASSPHRASE": "ca-pw"}


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PQCNET, *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=120)


def _revoked(ca_dir: Path) -> set[str]:
    """Serials revoked in the CA's state file, read as JSON (not by pqcnet)."""
    return {r["serial"] for r in json.loads((ca_dir / "ca-state.json").read_text())["revocations"]}


def _issued(ca_dir: Path) -> set[str]:
    """Serials in the CA's issued journal (``ca-issued.jsonl``), parsed here."""
    lines = [json.loads(x) for x in (ca_dir / "ca-issued.jsonl").read_text().splitlines()]
    return ({d["serial"] for d in lines if "serial" in d}
            - {d["forget"] for d in lines if "forget" in d})


def _init_with_nodes(tmp_path: Path, *names: str) -> dict[str, str]:
    assert _run("ca", "init", "--dir", "ca", "--trust-domain", TD, cwd=tmp_path).returncode == 0
    serials = {}
    for name in names:
        made = _run("ca", "issue", "--dir", "ca", "--no-node-passphrase",
                    f"spiffe://{TD}/acme/relayer/{name}", "--out", name, cwd=tmp_path)
        assert made.returncode == 0, made.stderr
        serials[name] = format(NodeIdentity.load(tmp_path / name, None).serial, "x")
    return serials


def _serve(tmp_path: Path) -> subprocess.Popen[str]:
    serve = subprocess.Popen([PQCNET, "ca", "serve", "--dir", "ca", "--port", "0"],
                             cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert serve.stdout is not None
    assert json.loads(serve.stdout.readline())["ready"] is True
    return serve


def test_cli_writers_are_refused_while_ca_serve_runs_there(tmp_path: Path) -> None:
    """While the service runs: ``ca revoke --dir``, ``ca issue``, ``ca crl`` and a
    second ``ca serve`` are refused with exit 1 and a message naming the service's pid
    and the way through it; nothing is written. After a SIGTERM — and after a SIGKILL,
    which runs no clean-up — the same revocation goes through and stays."""
    serials = _init_with_nodes(tmp_path, "r1")
    state = (tmp_path / "ca" / "ca-state.json").read_bytes()
    serve = _serve(tmp_path)
    try:
        refused = {
            "revoke": _run("ca", "revoke", "--dir", "ca", "--serial", serials["r1"],
                           cwd=tmp_path),
            "issue": _run("ca", "issue", "--dir", "ca", "--no-node-passphrase",
                          f"spiffe://{TD}/acme/relayer/r2", "--out", "r2", cwd=tmp_path),
            "crl": _run("ca", "crl", "--dir", "ca", "--out", "crl.pem", cwd=tmp_path),
        }
        for what, done in refused.items():
            assert done.returncode == 1, (what, done.stdout, done.stderr)
            assert f"is served by pqcnet ca serve (pid {serve.pid})" in done.stderr, what
            assert "pqcnet ca revoke --ca URL --identity ADMIN_DIR" in done.stderr, what
            assert "Traceback" not in done.stderr and done.stdout == "", what
        second = subprocess.run([PQCNET, "ca", "serve", "--dir", "ca", "--port", "0"],
                                cwd=tmp_path, env=ENV, capture_output=True, text=True,
                                timeout=60)
        assert second.returncode == 1
        assert f"already served by pqcnet ca serve (pid {serve.pid})" in second.stderr
        assert not (tmp_path / "r2").exists() and not (tmp_path / "crl.pem").exists()
        assert (tmp_path / "ca" / "ca-state.json").read_bytes() == state
        assert serve.poll() is None
    finally:
        terminate(serve)
    assert serve.returncode == 0
    done = _run("ca", "revoke", "--dir", "ca", "--serial", serials["r1"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert _revoked(tmp_path / "ca") == {serials["r1"]}

    # a service killed outright holds nothing: the kernel drops its flock
    serve = _serve(tmp_path)
    serve.send_signal(signal.SIGKILL)
    terminate(serve)  # reaps it and closes its pipes
    made = _run("ca", "issue", "--dir", "ca", "--no-node-passphrase",
                f"spiffe://{TD}/acme/relayer/r3", "--out", "r3", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert _revoked(tmp_path / "ca") == {serials["r1"]}  # and the revocation stayed


def test_a_short_writer_waits_for_another_and_both_changes_stay(tmp_path: Path) -> None:
    """A writer that holds the lock (here the test, as ``pqcnet ca issue`` would, in the
    middle of its read-change-write) makes ``ca revoke --dir`` wait, not fail; when it
    lets go, the revocation runs on the state the first writer left, so both changes
    are in the file. Held past the wait, the second writer is refused, named."""
    serials = _init_with_nodes(tmp_path, "r1", "r2")
    ca_dir = tmp_path / "ca"
    release = threading.Event()
    holding = threading.Event()

    def first_writer() -> None:
        with ca_writer(ca_dir, "pqcnet ca issue"):
            ca = MeshCA.load(ca_dir, b"ca-pw")
            holding.set()
            release.wait(30)
            ca.revoke(int(serials["r2"], 16))
            ca.save_state(ca_dir)

    thread = threading.Thread(target=first_writer)
    thread.start()
    assert holding.wait(30)
    second = subprocess.Popen([PQCNET, "ca", "revoke", "--dir", "ca", "--serial",
                               serials["r1"]], cwd=tmp_path, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3)  # it started and is waiting: nothing written yet
        assert second.poll() is None, second.communicate()
        assert _revoked(ca_dir) == set()
        release.set()
        thread.join(30)
        out, err = second.communicate(timeout=60)
    finally:
        release.set()
        if second.poll() is None:
            second.kill()
            second.wait()
    assert second.returncode == 0, err
    assert f"revoked serial {serials['r1']}" in out
    assert _revoked(ca_dir) == {serials["r1"], serials["r2"]}  # before: r1's was lost

    with ca_writer(ca_dir, "pqcnet ca crl"), \
            pytest.raises(CaDirBusy, match=r"being written by pqcnet ca crl \(pid \d+\)"), \
            ca_writer(ca_dir, "pqcnet ca issue", wait_s=0.3):
        pass


def test_a_renewer_on_the_directory_of_a_running_service_is_refused(tmp_path: Path) -> None:
    """``--renew-ca-dir`` pointing at a served directory: the renewal fails with the
    service named (the identity manager retries and logs it), and the CA's state is not
    written behind the service's back. Without the service the renewal is recorded."""
    serials = _init_with_nodes(tmp_path, "r1")
    ca_dir = tmp_path / "ca"
    node = NodeIdentity.load(tmp_path / "r1", None)

    def load() -> object:
        return MeshCA.load(ca_dir, b"ca-pw")

    def save(ca: object) -> None:
        assert isinstance(ca, MeshCA)
        ca.save_state(ca_dir)

    renewer = LocalCaRenewer(load, save, hold=lambda: ca_writer(ca_dir, "a renewer"))
    state = (ca_dir / "ca-state.json").read_bytes()
    with ca_writer(ca_dir, SERVICE), pytest.raises(CaDirBusy, match="is served by pqcnet"):
        asyncio.run(renewer.renew(node, rotate_key=False))
    assert (ca_dir / "ca-state.json").read_bytes() == state
    new = asyncio.run(renewer.renew(node, rotate_key=False))
    assert new.serial != node.serial
    assert {format(new.serial, "x"), serials["r1"]} <= _issued(ca_dir)


def test_a_directory_that_cannot_be_locked_is_a_clear_error(tmp_path: Path) -> None:
    """A forced rekey's ``ca_dir`` that does not exist (a typo in the node config) is an
    :class:`IdentityError` naming the lock file, not an ``OSError`` from deep inside."""
    from pqcnet.identity.errors import IdentityError

    with pytest.raises(IdentityError, match=r"cannot take the CA writer lock .*missing"), \
            ca_writer(tmp_path / "missing", "pqcnet node run"):
        pass
