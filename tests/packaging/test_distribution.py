"""The distribution installs one import root, `pqcnet`, and coexists with proto-plus.

Two distributions installing the same top-level folder silently overwrite each other
(proto-plus installs `proto`, getsentry installs `sentry`), so the wheel must hold
`pqcnet/` and its dist-info and nothing else.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(300)


def test_wheel_contains_only_the_pqcnet_package(tmp_path: Path) -> None:
    src = tmp_path / "checkout"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path / "dist"
    result = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out)],
        cwd=src, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (wheel,) = out.glob("pqcnet-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert tops - dist_info == {"pqcnet"}, sorted(tops)
    assert len(dist_info) == 1
    # generated protobuf code and its stubs ship inside the package, typed
    assert "pqcnet/proto/relayer_pb2.py" in names
    assert "pqcnet/proto/relayer_pb2.pyi" in names
    assert "pqcnet/py.typed" in names
    # every subpackage the architecture names is there
    for sub in ("crypto", "identity", "qstp", "qsdag", "layer0", "mesh", "relayer", "sentry",
                "runtime", "cli", "bench", "_util"):
        assert f"pqcnet/{sub}/__init__.py" in names, sub
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "pqcnet = pqcnet.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_pqcnet_coexists_with_proto_plus() -> None:
    """proto-plus (import name `proto`) and pqcnet's generated code load side by side."""
    code = textwrap.dedent("""
        import importlib.metadata as md
        import proto                        # proto-plus
        from pqcnet.proto import relayer_pb2, qsdag_pb2
        from pqcnet.relayer import frame    # a role that uses the generated code
        assert hasattr(proto, "Message") and hasattr(proto, "Field"), proto.__file__
        assert "pqcnet" not in proto.__file__, proto.__file__
        assert md.distribution("proto-plus").version
        # a proto-plus message and a pqcnet message in one process, one descriptor pool
        class Note(proto.Message):
            text = proto.Field(proto.STRING, number=1)
        assert Note(text="hi").text == "hi"
        assert relayer_pb2.DESCRIPTOR.package == "pqcnet.relayer"
        assert qsdag_pb2.DESCRIPTOR.name == "pqcnet/proto/qsdag.proto"
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
