"""Generated protobuf code must match the .proto sources (``make proto`` regenerates)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.conftest import ROOT


@pytest.mark.timeout(120)
def test_generated_protobuf_code_is_fresh() -> None:
    script = ROOT / "tools" / "protogen.py"
    result = subprocess.run([sys.executable, str(script), "--check"], cwd=ROOT,
                            capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dependency_floors_admit_no_runtime_the_generated_code_refuses() -> None:
    """The generated stubs check their runtime at import: ``*_pb2_grpc.py`` refuses a
    grpcio older than the generator that wrote it, ``*_pb2.py`` a protobuf older than
    its gencode. The floors in pyproject.toml must not promise older ones (they said
    grpcio>=1.66 and protobuf>=5.28 while the stubs needed 1.85.1 and 7.35.1), and the
    generator must be pinned to the version written into the stubs — a fresh install
    took a newer grpcio-tools and the freshness check above failed on a clean clone."""
    proto = ROOT / "src" / "pqcnet" / "proto"
    grpc_gen = {m.group(1) for f in proto.glob("*_pb2_grpc.py")
                if (m := re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", f.read_text()))}
    pb_gen = {m.groups() for f in proto.glob("*_pb2.py")
              if (m := re.search(r"Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),", f.read_text()))}
    assert len(grpc_gen) == 1 and len(pb_gen) == 1, (grpc_gen, pb_gen)
    grpc_version = Version(grpc_gen.pop())
    pb_version = Version(".".join(pb_gen.pop()))
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in meta["dependencies"]]
    reqs += [Requirement(r) for extra in meta["optional-dependencies"].values() for r in extra]

    def floors(name: str) -> list[Version]:
        return [Version(s.version) for r in reqs if r.name == name for s in r.specifier
                if s.operator in (">=", "==")]

    assert floors("grpcio") and all(v >= grpc_version for v in floors("grpcio"))
    assert floors("protobuf") and all(v >= pb_version for v in floors("protobuf"))
    tools = [r for r in reqs if r.name == "grpcio-tools"]
    assert [str(r.specifier) for r in tools] == [f"=={grpc_version}"], tools
