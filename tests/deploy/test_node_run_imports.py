"""`pqcnet node run` in the sentry image: the image installs pqcnet[sentry] only (no
redis, no aiokafka), so the node runtime must not import the relayer's bus clients
unless it runs a relayer (the compose network's sentries run `node run`)."""

from __future__ import annotations

import subprocess
import sys

BLOCK = "import sys\nfor m in ('redis', 'aiokafka', 'hiredis'): sys.modules[m] = None\n"


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True,
                          text=True, timeout=120)


def test_node_runtime_imports_without_the_relayer_extra() -> None:
    res = _run("import pqcnet.runtime.node, pqcnet.cli.node\nprint('ok')")
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_the_block_is_real() -> None:
    """The relayer itself does need them: the blocking above would catch a regression."""
    res = _run("import pqcnet.relayer.node")
    assert res.returncode != 0 and "redis" in res.stderr
