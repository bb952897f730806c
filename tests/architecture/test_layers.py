"""The layer order of ARCHITECTURE.md holds, and the checker really refuses a breach.

``lint-imports`` (import-linter) reads the ``layers`` contract from ``pyproject.toml`` and
checks the import graph grimp builds from the *installed* package — module-level,
function-level and ``TYPE_CHECKING`` imports alike. The breach tests copy ``src/pqcnet``
to a temporary directory, plant one forbidden import in the copy and run the same
command with the copy first on ``PYTHONPATH``: a contract that cannot fail proves
nothing, so each kind of breach (upward, between independent siblings, an unplaced new
package) must break it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
CONTRACT_NAME = "pqcnet layers (ARCHITECTURE.md)"


def _lint(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo", str(ROOT / "pyproject.toml")],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_repository_keeps_the_layers_contract() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{CONTRACT_NAME} KEPT" in result.stdout


@pytest.fixture
def src_copy(tmp_path: Path) -> Path:
    """A private copy of the package tree; grimp reads it instead of the checkout."""
    shutil.copytree(ROOT / "src" / "pqcnet", tmp_path / "src" / "pqcnet",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path / "src"


def _plant(src: Path, module: str, line: str) -> None:
    path = src / module
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(f"\n{line}  # planted by tests/architecture\n")


def test_the_copy_alone_keeps_the_contract(src_copy: Path) -> None:
    """The breach tests below start from this: lint-imports reads the copy, and it is clean."""
    _plant(src_copy, "pqcnet/qstp/__init__.py", "import pqcnet.errors")   # downward: fine
    result = _lint(src_copy.parent, pythonpath=src_copy)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("module", "line", "expected"), [
    # upward: the tunnel core reaching for a service built on it
    ("pqcnet/qstp/__init__.py", "import pqcnet.relayer", "pqcnet.qstp -> pqcnet.relayer"),
    # upward across several layers: the error root importing anything
    ("pqcnet/errors.py", "import pqcnet.crypto", "pqcnet.errors -> pqcnet.crypto"),
    # independent siblings: a relayer must not reach into the sentry
    ("pqcnet/relayer/__init__.py", "import pqcnet.sentry", "pqcnet.relayer -> pqcnet.sentry"),
    # a lazy import inside a function counts as well
    ("pqcnet/qsdag/__init__.py", "def _lazy() -> None:\n    import pqcnet.mesh",
     "pqcnet.qsdag -> pqcnet.mesh"),
])
def test_forbidden_import_breaks_the_contract(
        src_copy: Path, module: str, line: str, expected: str) -> None:
    _plant(src_copy, module, line)
    result = _lint(src_copy.parent, pythonpath=src_copy)
    assert result.returncode != 0
    assert f"{CONTRACT_NAME} BROKEN" in result.stdout
    assert expected in result.stdout, result.stdout


def test_unplaced_package_breaks_the_contract(src_copy: Path) -> None:
    """``exhaustive``: a new top-level package must be given its place in the order."""
    _plant(src_copy, "pqcnet/newpkg/__init__.py", '"""Not yet in the layers contract."""')
    result = _lint(src_copy.parent, pythonpath=src_copy)
    assert result.returncode != 0
    assert "pqcnet.newpkg" in result.stdout + result.stderr, result.stdout + result.stderr
