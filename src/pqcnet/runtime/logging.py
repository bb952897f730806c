"""Structured logging for every pqcnet process: key=value or JSON lines on stderr.

Call sites use the standard library: ``log.info("tunnel up", extra={"peer": spiffe})``;
everything in ``extra`` becomes a field.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import json
import logging
import logging.handlers
import queue
import sys
import time

#: Records waiting for the writer thread. Bounds memory when stderr is slow or blocked
#: (a reader that stopped draining our pipe): past it records are dropped and counted,
#: instead of the event loop blocking in write(2) and stalling every tunnel.
MAX_PENDING_RECORDS = 10_000

_RESERVED = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _RESERVED}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and all ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(_fields(record))
        exc = _exception_text(self, record)
        if exc:
            out["exc"] = exc
        return json.dumps(out, default=str)


class KeyValueFormatter(logging.Formatter):
    """Human-readable ``time level logger msg k=v ...``."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%H:%M:%S", time.localtime(record.created))
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        line = f"{ts} {record.levelname.lower():7} {record.name}: {record.getMessage()}"
        line = f"{line} {extra}" if extra else line
        exc = _exception_text(self, record)
        return f"{line}\n{exc}" if exc else line


def _exception_text(fmt: logging.Formatter, record: logging.LogRecord) -> str:
    """The traceback, whether still attached or already rendered by the queue handler."""
    if record.exc_info:
        return fmt.formatException(record.exc_info)
    return record.exc_text or ""


class BoundedQueueHandler(logging.handlers.QueueHandler):
    """Hands records to the writer thread; never blocks the caller (drops when full)."""

    def __init__(self, q: queue.Queue[logging.LogRecord | None]) -> None:
        super().__init__(q)
        self.dropped = 0

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        """Freeze the message and render the traceback now (the writer runs later),
        keeping ``extra`` fields and leaving the layout to the writer's formatter."""
        record = copy.copy(record)
        record.msg = record.getMessage()
        record.args = None
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


#: Longest wait at exit (or reconfigure) for queued records to reach stderr; a stderr
#: nobody reads must not keep a stopping process alive.
STOP_TIMEOUT_S = 5.0


class _Writer(logging.handlers.QueueListener):
    """The writer thread; stopping waits a bounded time even if stderr is stuck."""

    def __init__(self, pending: queue.Queue[logging.LogRecord | None],
                 writer: logging.Handler) -> None:
        super().__init__(pending, writer)
        self._pending = pending

    def enqueue_sentinel(self) -> None:
        # if the writer is stuck the sentinel cannot go in; its daemon thread dies with
        # the process
        with contextlib.suppress(queue.Full):
            self._pending.put(None, timeout=STOP_TIMEOUT_S)  # None: QueueListener's sentinel

    def stop(self) -> None:
        self.enqueue_sentinel()
        thread = self._thread
        if thread is not None:
            thread.join(STOP_TIMEOUT_S)
            self._thread = None


_listener: _Writer | None = None


def _stop_listener() -> None:
    """Flush what is queued (at exit, or before reconfiguring)."""
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None


def configure(level: str = "warning", *, json_lines: bool = False) -> None:
    """Install one non-blocking stderr handler on the root logger (idempotent).

    Formatting and the write to stderr happen on a writer thread fed by a bounded
    queue, so a slow or stuck stderr can never block the asyncio loop.
    """
    global _listener
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_pqcnet", False):
            root.removeHandler(handler)
    _stop_listener()
    writer = logging.StreamHandler(sys.stderr)
    writer.setFormatter(JsonFormatter() if json_lines else KeyValueFormatter())
    pending: queue.Queue[logging.LogRecord | None] = queue.Queue(MAX_PENDING_RECORDS)
    handler = BoundedQueueHandler(pending)
    handler._pqcnet = True  # type: ignore[attr-defined]
    _listener = _Writer(pending, writer)
    _listener.start()
    root.addHandler(handler)
    root.setLevel(level.upper())


atexit.register(_stop_listener)
