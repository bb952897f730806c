"""Generated protobuf code must match the .proto sources (``make proto`` regenerates)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.timeout(120)
def test_generated_protobuf_code_is_fresh() -> None:
    script = ROOT / "tools" / "protogen.py"
    result = subprocess.run([sys.executable, str(script), "--check"], cwd=ROOT,
                            capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stdout + result.stderr
