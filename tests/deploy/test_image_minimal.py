"""The role images' final stage is minimal: no shell and no package manager (the
Dockerfile removes them; docs/operations/deployment.md says why), yet the role still
runs — its CLI, its healthcheck command and `docker exec python3` diagnostics need none
of them. Sizes are printed for the docs."""

from __future__ import annotations

import json

import pytest

from .conftest import Docker

pytestmark = pytest.mark.timeout(1800)

GONE = ("/bin/sh", "/usr/bin/sh", "/usr/bin/bash", "/usr/bin/dash", "/usr/bin/apt-get",
        "/usr/bin/dpkg", "/usr/bin/perl")
PROBE = f"""
import json, os, shutil
names = ("sh", "bash", "dash", "apt", "dpkg")
print(json.dumps({{"present": [p for p in {GONE!r} if os.path.lexists(p)],
                   "which": [n for n in names if shutil.which(n)]}}))
"""


@pytest.mark.parametrize("role", ["sentry", "relayer"])
def test_no_shell_or_package_manager_in_the_final_stage(
        docker: Docker, images: dict[str, str], role: str) -> None:
    ref = images[role]
    out = docker.run("run", "--rm", "--read-only", "--entrypoint", "python3", ref, "-c", PROBE)
    assert json.loads(out.stdout) == {"present": [], "which": []}, out.stdout
    # a shell cannot even be started as the entrypoint
    res = docker.run("run", "--rm", "--entrypoint", "/bin/sh", ref, "-c", "true", check=False)
    assert res.returncode != 0
    # the role's CLI still works without them
    assert docker.run("run", "--rm", ref, "--help").returncode == 0
    size = int(docker.run("image", "inspect", "--format", "{{.Size}}", ref).stdout)
    print(f"{ref}: {size / 1e6:.1f} MB")
