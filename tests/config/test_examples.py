"""Every file in ``examples/`` works as shipped: each is copied into a fresh directory
laid out like the repository, the one-time preparation its comments name is run with
the real commands (throwaway identities and keys), only ports and the Waku address are
substituted — as a user on a shared machine would — and the command it documents starts
and reports ready. The sentry example also starts with its ``ledger:`` line uncommented
(it used to fail with an API name, "run init_genesis first")."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import uuid
from pathlib import Path

import pytest

from pqcnet.qsdag import Ledger
from tests.node.harness import PQCNET, NodeProcess, run_cli

pytestmark = pytest.mark.timeout(180)
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SHIPPED = {"sentry.yaml", "relayer.yaml", "node-relayer.yaml", "node-sentry.yaml"}


def test_every_example_is_started_here() -> None:
    assert {p.name for p in EXAMPLES.glob("*.yaml")} == SHIPPED


def _edit(path: Path, *pairs: tuple[str, str]) -> None:
    text = path.read_text()
    for old, new in pairs:
        assert old in text, f"{path.name} no longer holds {old!r}"
        text = text.replace(old, new)
    path.write_text(text)


async def _pq(*args: str, cwd: Path) -> str:
    proc = await asyncio.create_subprocess_exec(
        PQCNET, *args, cwd=cwd, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    """``<tmp>/examples`` holding the shipped files; ``<tmp>/.cache`` beside it."""
    shutil.copytree(EXAMPLES, tmp_path / "examples")
    return tmp_path


async def _prepare_sentry(repo: Path) -> Path:
    ex = repo / "examples"
    await _pq("ca", "init", "--dir", "ca", "--trust-domain", "pqcnet.test", "--no-passphrase",
              cwd=ex)
    await _pq("ca", "issue", "--dir", "ca", "--no-passphrase", "--no-node-passphrase",
              "spiffe://pqcnet.test/ops/sentry/s1", "--out", "sentry-id", cwd=ex)
    await _pq("assertion", "keygen", "--out", "acme-issuer.pem", "--pub", "acme-issuer.pub",
              cwd=ex)
    _edit(ex / "sentry.yaml", ("listen: 127.0.0.1:7443", "listen: 127.0.0.1:0"))
    return ex / "sentry.yaml"


async def _prepare_relayer(repo: Path) -> Path:
    await _pq("relayer", "dev-identities", "--out", ".cache/relayer-dev", cwd=repo)
    _edit(repo / "examples" / "relayer.yaml", ("listen_port: 7400", "listen_port: 0"),
          ("metrics_port: 9400", "metrics_port: 0"), ("grpc_port: 7401", "grpc_port: 0"))
    return repo / "examples" / "relayer.yaml"


async def _run_until_line(args: list[str], cwd: Path, stream: str, needle: str) -> str:
    """Start ``pqcnet ARGS``, wait for a line containing ``needle`` on ``stream``,
    then SIGTERM it and require a clean exit."""
    proc = await asyncio.create_subprocess_exec(
        PQCNET, *args, cwd=cwd, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    pipe = proc.stdout if stream == "stdout" else proc.stderr
    assert pipe is not None
    try:
        line = (await asyncio.wait_for(pipe.readline(), 60)).decode()
        assert needle in line, line + (await proc.communicate())[1].decode()[-2000:]
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()[-2000:]
    return line


async def test_sentry_example(repo: Path) -> None:
    config = await _prepare_sentry(repo)
    line = await _run_until_line(["sentry", "run", "--config", "sentry.yaml", "--no-passphrase"],
                                 config.parent, "stderr", "listening on 127.0.0.1:")
    assert "spiffe://pqcnet.test/ops/sentry/s1" in line


async def test_sentry_example_with_its_ledger(repo: Path) -> None:
    config = await _prepare_sentry(repo)
    _edit(config, ("# ledger: ledger ", "ledger: ledger   "))
    await _run_until_line(["sentry", "run", "--config", "sentry.yaml", "--no-passphrase"],
                          config.parent, "stderr", "listening on 127.0.0.1:")
    ledger = Ledger.open(config.parent / "ledger")
    try:
        assert ledger.genesis_id is not None  # a dev genesis, this sentry as authority
        assert len(list(ledger.ids())) >= 3  # genesis, policy anchor, attestation
    finally:
        ledger.close()


async def test_sentry_example_ledger_without_dev_genesis_names_the_command(repo: Path) -> None:
    config = await _prepare_sentry(repo)
    _edit(config, ("# ledger: ledger ", "ledger: ledger   "),
          ("# attestation_interval: 60", "ledger_dev_genesis: false"))
    status, _out, err = await run_cli("sentry", "run", "--config", str(config),
                                      "--no-passphrase")
    assert status == 1 and err.count("\n") == 1, err
    assert "has no genesis; create it with `pqcnet ledger --path" in err, err
    assert "init --network NAME --authority s1 --key AUTHORITY.pem`" in err, err


async def test_relayer_example(repo: Path) -> None:
    config = await _prepare_relayer(repo)
    line = await _run_until_line(["relayer", "run", "--config", str(config)], repo, "stdout",
                                 '"ready": true')
    assert '"backend": "embedded"' in line


@pytest.mark.services
@pytest.mark.parametrize("name", ["node-relayer.yaml", "node-sentry.yaml"])
async def test_node_examples(repo: Path, name: str, waku_rest_urls: list[str]) -> None:
    await _pq("mesh", "keygen", ".cache/gov.pem", cwd=repo)
    if name == "node-relayer.yaml":
        await _prepare_relayer(repo)
    else:
        await _prepare_sentry(repo)
    config = repo / "examples" / name
    _edit(config, ("http://127.0.0.1:8645", waku_rest_urls[0]),
          ("namespace: dev", f"namespace: ex{uuid.uuid4().hex[:8]}"))
    async with NodeProcess(config) as node:
        assert node.ready["role"] == name[5:-5] and node.ready["transport"] == "waku"
        assert node.ready["port"] > 0
    assert node.proc is not None and node.proc.returncode == 0, node.stderr.decode()[-2000:]
