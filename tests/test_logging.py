"""Structured logs: fields and tracebacks survive the writer thread, and a stuck
stderr never blocks the caller (records beyond the bound are dropped and counted)."""

from __future__ import annotations

import io
import json
import logging
import threading

import pytest

import pqcnet.runtime.logging as plog


class _BlockingStream(io.StringIO):
    """A stderr whose reader stopped draining: every write waits for ``release``."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def write(self, s: str) -> int:
        self.release.wait(30)
        return super().write(s)


@pytest.fixture(autouse=True)
def _restore_root() -> object:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    plog._stop_listener()
    for h in list(root.handlers):
        if getattr(h, "_pqcnet", False):
            root.removeHandler(h)
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_extra_fields_and_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr("sys.stderr", out)
    plog.configure("info", json_lines=True)
    log = logging.getLogger("pqcnet.test")
    log.info("tunnel up %s", "t1", extra={"peer": "spiffe://td/a/relayer/r1"})
    try:
        raise ValueError("bad frame")
    except ValueError:
        log.exception("refused")
    plog._stop_listener()  # flush the writer thread
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["msg"] == "tunnel up t1" and first["peer"] == "spiffe://td/a/relayer/r1"
    assert second["level"] == "error" and "ValueError: bad frame" in second["exc"]


def test_a_stuck_stderr_never_blocks_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    stuck = _BlockingStream()
    monkeypatch.setattr("sys.stderr", stuck)
    monkeypatch.setattr(plog, "MAX_PENDING_RECORDS", 10)
    plog.configure("info")
    [handler] = [h for h in logging.getLogger().handlers if getattr(h, "_pqcnet", False)]
    assert isinstance(handler, plog.BoundedQueueHandler)
    log = logging.getLogger("pqcnet.test")
    for i in range(200):  # would hang here if logging wrote to the stuck stream inline
        log.info("record %d", i)
    assert handler.dropped >= 200 - 10 - 1  # the bound held; the writer holds at most one
    stuck.release.set()
    plog._stop_listener()
    written = stuck.getvalue().splitlines()
    assert 0 < len(written) <= 11 and written[0].endswith("record 0")
