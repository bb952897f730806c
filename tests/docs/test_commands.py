"""Every command the README and the docs show as runnable does run, as a user would run it.

Each page's ``run`` blocks (see :mod:`tests.docs.markdown`) are joined, in page order,
into one bash session — ``set -eo pipefail``, so any failing command fails the page — and
executed in a fresh temporary directory that holds a copy of ``examples/`` (what a
checkout's root offers), with the venv's ``bin`` first on ``PATH`` (what
``. .venv/bin/activate`` gives). Variables, the working directory and shell functions
carry over from one block to the next, exactly like a terminal; a block that starts a
background process stops it itself. Whatever is still running when the page ends is
killed with the session's process group.

Blocks marked ``needs=<service>`` get a ``.services/env`` in that directory with the
addresses of the real services; when a service is not running the page is skipped —
or fails under ``PQCNET_REQUIRE_SERVICES=1`` — by the rules of ``tests/conftest.py``.
``<!-- expect: TEXT -->`` after a block asserts that TEXT appears in the page's output.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, require_service
from tests.docs.markdown import (
    EXECUTABLE_LANGUAGES,
    RUNNABLE_LANGUAGES,
    SERVICE_EXTRAS,
    SERVICES,
    Block,
    blocks,
    doc_pages,
)

#: Wall-clock bound for one page (all its blocks); the whole set stays well under a minute.
PAGE_TIMEOUT_S = 90.0
#: How long leftover background processes get after SIGTERM before SIGKILL.
KILL_GRACE_S = 3.0
#: Marks the start of each block in the combined output, so a failure names its block.
MARK = "@@pqcnet-docs "
_PY_END = "__PQCNET_DOCS_PYTHON__"


def _pages_with_runnable_blocks() -> list[Path]:
    return [p for p in doc_pages() if any(b.runnable for b in blocks(p))]


def _script(page_blocks: list[Block]) -> str:
    parts = ["set -eo pipefail"]
    for n, block in enumerate(page_blocks):
        parts.append(f"printf '\\n{MARK}block {n} {block.where}\\n'")
        if block.language == "python":
            parts.append(f"python - <<'{_PY_END}'\n{block.text}\n{_PY_END}")
        else:
            parts.append(block.text)
    parts.append(f"printf '\\n{MARK}end\\n'")
    return "\n".join(parts) + "\n"


def _environment(workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME") and not k.startswith("PQCNET_")}
    venv_bin = Path(sys.executable).parent
    env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv_bin.parent)
    env["HOME"] = str(workdir / "home")
    return env


def _stop_group(proc: subprocess.Popen[str]) -> None:
    """End whatever the page left running: its whole session, by the session's id."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + KILL_GRACE_S
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


def _failed_block(output: str) -> str:
    marks = [line for line in output.split("\n") if line.startswith(MARK)]
    return marks[-1][len(MARK):] if marks else "before the first block"


def _logs(workdir: Path) -> str:
    """The tails of the log files a page's commands wrote (servers run in the background)."""
    parts = []
    for path in sorted([*workdir.glob("*.log"), *workdir.glob("*.err")]):
        tail = path.read_text(errors="replace").splitlines()[-15:]
        parts.append(f"--- {path.name}\n" + "\n".join(tail))
    return "\n".join(parts)


@pytest.mark.parametrize("page", _pages_with_runnable_blocks(),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_runnable_blocks(page: Path, tmp_path: Path) -> None:
    page_blocks = [b for b in blocks(page) if b.runnable]
    workdir = tmp_path / "work"
    shutil.copytree(ROOT / "examples", workdir / "examples")
    (workdir / "home").mkdir()
    needed = sorted({s for b in page_blocks for s in b.needs})
    if needed:
        lines = []
        for service in needed:
            var, what = SERVICES[service]
            lines.append(f"export {var}={require_service(var, what)}")
            lines += [f"export {x}={os.environ[x]}" for x in SERVICE_EXTRAS.get(service, ())
                      if x in os.environ]
        (workdir / ".services").mkdir()
        (workdir / ".services" / "env").write_text("\n".join(lines) + "\n")
    log = tmp_path / "output.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["bash", "-c", _script(page_blocks)], cwd=workdir, env=_environment(workdir),
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)
        try:
            # wait for bash itself, not for EOF: a background server inherits the output
            proc.wait(timeout=PAGE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            proc.wait()
            output = log.read_text(errors="replace")
            pytest.fail(f"{page.name}: still running after {PAGE_TIMEOUT_S:.0f}s in "
                        f"{_failed_block(output)}\n{output[-4000:]}\n{_logs(workdir)}")
        finally:
            _stop_group(proc)
    output = log.read_text(errors="replace")
    assert proc.returncode == 0, (
        f"exit {proc.returncode} in {_failed_block(output)}\n{output[-4000:]}\n{_logs(workdir)}")
    assert f"{MARK}end" in output
    for block in page_blocks:
        for text in block.expect:
            assert text in output, f"{block.where}: expected {text!r} in the output"


def test_every_shell_and_python_block_is_marked() -> None:
    """A block nobody decided about is a command nobody tests: say ``run`` or ``norun``."""
    unmarked = [b.where for p in doc_pages() for b in blocks(p)
                if b.language in EXECUTABLE_LANGUAGES and not b.flags & {"run", "norun"}]
    assert not unmarked, f"mark these blocks `run` or `norun`: {unmarked}"


def test_runnable_blocks_are_known_languages_and_services() -> None:
    bad = [f"{b.where} ({b.language}, needs={','.join(b.needs)})"
           for p in doc_pages() for b in blocks(p) if b.runnable
           and (b.language not in RUNNABLE_LANGUAGES or not set(b.needs) <= set(SERVICES))]
    assert not bad, f"cannot run: {bad}"

