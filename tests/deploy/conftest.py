"""Fixtures of the deployment tests: the tools ``scripts/deploy-tools`` installs and
starts (dockerd, docker-compose, helm, kubeconform + schemas, promtool), read from
``.services/deploy-env``. A missing tool skips — unless ``PQCNET_REQUIRE_SERVICES=1``
(CI), where it fails.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import ROOT
from tools.images import deploy_env


def load_dashboards() -> ModuleType:
    """dashboards/build.py as a module (loaded by path under its own name: a bare
    ``import build`` could find the PyPA ``build`` package instead)."""
    import importlib.util
    import sys

    name = "pqcnet_dashboards_build"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "dashboards" / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")


def metric_exported(name: str) -> bool:
    """Whether src/pqcnet registers metric ``name`` (a series name as PromQL sees it; the
    ``_total``/``_bucket``/... suffixes prometheus_client adds are stripped): as a string
    literal ``"pqcnet_…"``, or through an f-string template ``f"pqcnet_relayer_{name}_frames"``
    whose placeholder value (``gaps``) is a string literal of the same module."""
    import re

    bases = {name} | {name.removesuffix(s) for s in _SUFFIXES if name.endswith(s)}
    for path in (ROOT / "src" / "pqcnet").rglob("*.py"):
        text = path.read_text()
        for base in bases:
            if f'"{base}"' in text:
                return True
            for tmpl in re.findall(r'f"(pqcnet_[a-z0-9_{}]+)"', text):
                rx = re.sub(r"\\\{[a-z_]+\\\}", "([a-z0-9_]+)", re.escape(tmpl))
                m = re.fullmatch(rx, base)
                if m and all(f'"{v}"' in text for v in m.groups()):
                    return True
    return False


def require_tool(var: str, what: str) -> str:
    value = deploy_env().get(var, "")
    if value:
        return value
    msg = f"{what} not available ({var} unset; run `scripts/deploy-tools install && " \
          "scripts/deploy-tools start`)"
    if os.environ.get("PQCNET_REQUIRE_SERVICES") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


@dataclass(frozen=True)
class Docker:
    """The docker CLI bound to our daemon."""

    cli: str
    env: dict[str, str]

    def run(self, *args: str, check: bool = True, timeout: float = 600,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.cli, *args], env=self.env, capture_output=True, text=True,
                              check=check, timeout=timeout, input=input)


@pytest.fixture(scope="session")
def docker() -> Docker:
    host = require_tool("PQCNET_DOCKER_HOST", "dockerd")
    cli = require_tool("PQCNET_DOCKER_CLI", "docker CLI")
    env = dict(os.environ, DOCKER_HOST=host, DOCKER_BUILDKIT="1")
    return Docker(cli, env)


@pytest.fixture(scope="session")
def base_image() -> str:
    return require_tool("PQCNET_BASE_IMAGE", "local base image")


@pytest.fixture(scope="session")
def helm() -> str:
    return require_tool("PQCNET_HELM", "helm")


@pytest.fixture(scope="session")
def kubeconform() -> tuple[str, Path, str]:
    """(binary, schema dir, kubernetes version)."""
    binary = require_tool("PQCNET_KUBECONFORM", "kubeconform")
    schemas = Path(require_tool("PQCNET_K8S_SCHEMAS", "kubernetes JSON schemas"))
    return binary, schemas, require_tool("PQCNET_K8S_VERSION", "kubernetes version")


@pytest.fixture(scope="session")
def promtool() -> str:
    return require_tool("PQCNET_PROMTOOL", "promtool")


@pytest.fixture(scope="session")
def images(docker: Docker, base_image: str) -> Iterator[dict[str, str]]:
    """Build both role images once per session (tools/images.py); ``{role: ref}``."""
    import json
    import sys

    out = subprocess.run([sys.executable, str(ROOT / "tools" / "images.py"),
                          "--base-image", base_image, "--tag", "test"],
                         env=dict(docker.env, PQCNET_DOCKER_HOST=docker.env["DOCKER_HOST"],
                                  PQCNET_DOCKER_CLI=docker.cli),
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-4000:]
    built = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    yield {b["image"].split(":")[0].removeprefix("pqcnet-"): b["image"] for b in built}
