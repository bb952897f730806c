"""ARCHITECTURE.md's package table is generated, and stale copies are caught.

``tools/archtable.py`` derives files, line counts, allowed imports (from the layers
contract) and actual imports (grimp) from the tree. The repository's table must be
fresh; a copy of the tree that grew a line must be reported stale, and rewriting it must
make it fresh again.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

TOOL = ROOT / "tools" / "archtable.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True,
                          timeout=120, check=False)


def _copy_tree(tmp: Path) -> Path:
    shutil.copytree(ROOT / "src" / "pqcnet", tmp / "src" / "pqcnet",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "ARCHITECTURE.md"):
        shutil.copy(ROOT / name, tmp / name)
    return tmp


def test_architecture_table_is_fresh() -> None:
    result = _run("--check")
    assert result.returncode == 0, result.stderr + result.stdout


def test_table_lists_every_package_with_its_allowed_imports() -> None:
    table = _run("--print").stdout
    for package in ("cli", "runtime", "bench", "sentry", "relayer", "mesh", "qsdag", "layer0",
                    "qstp", "identity", "crypto", "_util", "proto", "errors"):
        assert f"| `{package}` |" in table
    qstp_row = next(line for line in table.splitlines() if "| `qstp` |" in line)
    allowed = qstp_row.split("|")[5]
    assert "`identity`" in allowed and "`relayer`" not in allowed


def test_a_grown_module_makes_the_table_stale_until_regenerated(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    assert _run("--root", str(root), "--check").returncode == 0
    module = root / "src" / "pqcnet" / "errors.py"
    lines = len(module.read_text().splitlines())
    with module.open("a") as fh:
        fh.write("\n# grown\n")
    stale = _run("--root", str(root), "--check")
    assert stale.returncode == 1
    assert "stale" in stale.stderr
    assert _run("--root", str(root)).returncode == 0
    assert _run("--root", str(root), "--check").returncode == 0
    assert f"| `errors` | 1 | {lines + 2} |" in (root / "ARCHITECTURE.md").read_text()


def test_missing_markers_are_one_clear_error(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    (root / "ARCHITECTURE.md").write_text("# no table here\n")
    result = _run("--root", str(root), "--check")
    assert result.returncode == 2
    assert "generated:archtable" in result.stderr
