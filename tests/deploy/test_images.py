"""The role images (docker/Dockerfile) built from the local base, run the way the
compose file and the Helm chart run them: read-only root filesystem, non-root, all
capabilities dropped, no new privileges, on a network the test creates. They must pass
their healthcheck, measure their image identity, and refuse bad key files or config
with a clear message and a non-zero exit.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pqcnet.identity import dev_identities
from tests.sentry.harness import config_dict, make_mesh, write_config
from tools import images as images_tool

from .conftest import Docker

pytestmark = pytest.mark.timeout(1800)

UID = 10001
HARDENED = ("--read-only", "--tmpfs", "/tmp:size=16m", "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges", "--user", f"{UID}:{UID}")


def _own(path: Path) -> None:
    """Make a host directory readable by the image's user (uid 10001)."""
    for p in [path, *path.rglob("*")]:
        if os.geteuid() == 0:
            os.chown(p, UID, UID)
        else:
            p.chmod(0o755 if p.is_dir() else 0o644)


@pytest.fixture
def network(docker: Docker) -> Iterator[str]:
    name = f"pqcnet-test-{secrets.token_hex(4)}"
    docker.run("network", "create", "--internal", name)
    try:
        yield name
    finally:
        docker.run("network", "rm", name, check=False)


@pytest.fixture
def containers(docker: Docker) -> Iterator[list[str]]:
    """Names of containers the test started; removed (with volumes) afterwards."""
    names: list[str] = []
    yield names
    for n in names:
        docker.run("rm", "-f", "-v", n, check=False)


def _start(docker: Docker, containers: list[str], network: str, image: str, conf: Path,
           *cmd: str) -> str:
    name = f"pqcnet-test-{secrets.token_hex(4)}"
    containers.append(name)
    docker.run("run", "-d", "--name", name, "--network", network, *HARDENED,
               "-v", f"{conf}:/etc/pqcnet:ro", image, *cmd)
    return name


def _wait_health(docker: Docker, name: str, timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        state = json.loads(docker.run("inspect", "--format", "{{json .State}}", name).stdout)
        status = state.get("Health", {}).get("Status", "")
        if status == "healthy" or not state["Running"]:
            break
        time.sleep(1)
    return status


def _wait_exit(docker: Docker, name: str, timeout: float = 60) -> int:
    out = docker.run("wait", name, timeout=timeout).stdout.strip()
    return int(out)


def _sentry_conf(tmp_path: Path, **extra: object) -> Path:
    conf = tmp_path / "sentry-conf"
    conf.mkdir()
    mesh = make_mesh()
    mesh.sentry.save(conf / "sentry-id", None)
    cfg = {**config_dict(1, 1, 1), "listen": "0.0.0.0:7443", "identity_dir": "sentry-id",
           "metrics_port": 9100, "metrics_host": "0.0.0.0", **extra}
    write_config(conf, mesh, cfg)
    _own(conf)
    return conf


def _relayer_conf(tmp_path: Path) -> Path:
    conf = tmp_path / "relayer-conf"
    conf.mkdir()
    _, (node,) = dev_identities("pqcnet.dev", "spiffe://pqcnet.dev/dev/relayer/relayer-1")
    node.save(conf / "relayer-id", None)
    (conf / "relayer.yaml").write_text(yaml.safe_dump({"relayer": {
        "node_id": "relayer-1", "listen_host": "0.0.0.0", "listen_port": 7400,
        "identity_dir": "relayer-id", "data_dir": "/var/lib/pqcnet/data",
        "backend": "embedded", "shards": 4, "metrics_port": 9100,
        "metrics_host": "0.0.0.0"}}))
    _own(conf)
    return conf


def test_images_are_labelled_non_root_and_measure_their_identity(
        docker: Docker, images: dict[str, str]) -> None:
    assert set(images) == {"sentry", "relayer"}
    for role, ref in images.items():
        cfg = json.loads(docker.run("image", "inspect", "--format", "{{json .Config}}",
                                    ref).stdout)
        assert cfg["User"] == f"{UID}:{UID}", role
        labels = cfg["Labels"]
        for key in ("version", "revision", "source", "title", "base.digest"):
            assert labels.get(f"org.opencontainers.image.{key}"), (role, key, labels)
        assert labels["org.opencontainers.image.title"] == f"pqcnet-{role}"
        # built from this tree: the compose network reuses it, an image of another
        # tree (a branch, an older commit) is rebuilt instead (tools/compose.py)
        assert labels["pqcnet.inputs"] == images_tool.image_inputs(role)
        assert cfg["Healthcheck"]["Test"][0] == "CMD"
        env = dict(e.split("=", 1) for e in cfg["Env"])
        base = env["PQCNET_BASE_IMAGE_DIGEST"]
        assert base.startswith("sha256:") and base == labels["org.opencontainers.image.base.digest"]
        # The attestation's image identity: the orchestrator's digest, then the base's.
        out = docker.run("run", "--rm", *HARDENED, "-e", "PQCNET_IMAGE_DIGEST=sha256:feed",
                         "--entrypoint", "python3", ref, "-c",
                         "from pqcnet.qsdag.attestation import measure; "
                         "print(measure(b'').image_digest)").stdout.strip()
        assert out == f"sha256:feed,base={base}"
        # the event loop the benchmarks measured (the `fast` extra is in every role image)
        loop = docker.run("run", "--rm", "--entrypoint", "python3", ref, "-c",
                          "from pqcnet._util.loop import loop_name; print(loop_name())"
                          ).stdout.strip()
        assert loop == "uvloop", role
    # No pip (nor compilers) in the final stage.
    out = docker.run("run", "--rm", "--entrypoint", "python3", images["sentry"], "-c",
                     "import importlib.util as u; print(u.find_spec('pip'))").stdout.strip()
    assert out == "None"


def test_sentry_runs_read_only_and_becomes_healthy(
        docker: Docker, images: dict[str, str], network: str, containers: list[str],
        tmp_path: Path) -> None:
    conf = _sentry_conf(tmp_path)
    name = _start(docker, containers, network, images["sentry"], conf,
                  "sentry", "run", "--config", "/etc/pqcnet/sentry.yaml", "--no-passphrase")
    status = _wait_health(docker, name)
    assert status == "healthy", docker.run("logs", name, check=False).stderr[-3000:]
    host = json.loads(docker.run("inspect", "--format", "{{json .HostConfig}}", name).stdout)
    assert host["ReadonlyRootfs"] is True and host["CapDrop"] == ["ALL"]
    ready = docker.run("exec", name, "python3", "-c",
                       "import urllib.request as u; print(u.urlopen("
                       "'http://127.0.0.1:9100/readyz').read().decode())").stdout
    assert json.loads(ready) == {"ready": True,
                                 "checks": {"listening": True, "identity": True}}
    # Read-only really: the root filesystem refuses a write.
    res = docker.run("exec", name, "python3", "-c", "open('/opt/pqcnet/x', 'w')", check=False)
    assert res.returncode != 0 and "Read-only file system" in res.stderr


def test_relayer_runs_read_only_and_becomes_healthy(
        docker: Docker, images: dict[str, str], network: str, containers: list[str],
        tmp_path: Path) -> None:
    conf = _relayer_conf(tmp_path)
    name = _start(docker, containers, network, images["relayer"], conf,
                  "relayer", "run", "--config", "/etc/pqcnet/relayer.yaml")
    status = _wait_health(docker, name)
    assert status == "healthy", docker.run("logs", name, check=False).stderr[-3000:]
    metrics = docker.run("exec", name, "python3", "-c",
                         "import urllib.request as u; print(u.urlopen("
                         "'http://127.0.0.1:9100/metrics').read().decode())").stdout
    assert "pqcnet_relayer_" in metrics


def test_bad_key_file_is_refused_with_a_clear_message(
        docker: Docker, images: dict[str, str], network: str, containers: list[str],
        tmp_path: Path) -> None:
    conf = _sentry_conf(tmp_path)
    key = next((conf / "sentry-id").glob("*key*"))
    key.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    _own(conf)
    name = _start(docker, containers, network, images["sentry"], conf,
                  "sentry", "run", "--config", "/etc/pqcnet/sentry.yaml", "--no-passphrase")
    assert _wait_exit(docker, name) != 0
    logs = docker.run("logs", name).stderr
    assert "Traceback" not in logs, logs[-3000:]
    assert "key" in logs.lower(), logs[-3000:]


def test_bad_config_is_refused_with_a_clear_message(
        docker: Docker, images: dict[str, str], network: str, containers: list[str],
        tmp_path: Path) -> None:
    conf = _sentry_conf(tmp_path)
    cfg = yaml.safe_load((conf / "sentry.yaml").read_text())
    cfg["limits"]["default"]["rate"] = "fast"
    (conf / "sentry.yaml").write_text(yaml.safe_dump(cfg))
    _own(conf)
    name = _start(docker, containers, network, images["sentry"], conf,
                  "sentry", "run", "--config", "/etc/pqcnet/sentry.yaml", "--no-passphrase")
    assert _wait_exit(docker, name) != 0
    logs = docker.run("logs", name).stderr
    assert "Traceback" not in logs, logs[-3000:]
    assert "limits.default.rate" in logs, logs[-3000:]


def test_inputs_hash_follows_the_tree_not_its_caches(tmp_path: Path) -> None:
    """An image is stale when any file it is built from changes, not when bytecode
    or caches appear (tools/images.py ``inputs_hash``)."""
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "src" / "pkg" / "mod.py").write_text("x = 1\n")
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    paths = ("src", "pyproject.toml")
    first = images_tool.inputs_hash(paths, tmp_path)
    (tmp_path / "src" / "pkg" / "__pycache__").mkdir()
    (tmp_path / "src" / "pkg" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\0")
    assert images_tool.inputs_hash(paths, tmp_path) == first
    (tmp_path / "src" / "pkg" / "mod.py").write_text("x = 2\n")
    assert images_tool.inputs_hash(paths, tmp_path) != first
    (tmp_path / "src" / "pkg" / "mod.py").write_text("x = 1\n")
    (tmp_path / "src" / "pkg" / "new.py").write_text("")
    assert images_tool.inputs_hash(paths, tmp_path) != first
