"""Stopping a batch command (a benchmark, a chaos run) on SIGINT or SIGTERM with its
clean-up done.

Such a command leaves state outside itself while it runs: server and relayer
processes, a NATS stream, a broker topic or key prefix. Python's defaults clean up on
Ctrl-C only (``KeyboardInterrupt`` runs the ``finally`` blocks); SIGTERM — ``kill``,
``timeout``, a CI job cancelled — ends the process on the spot, its children and its
broker state left behind; and a command started with SIGINT ignored (``cmd &`` in a
script) cannot be stopped by it at all. Under :func:`stopping` both signals raise
:class:`Stopped` in the main thread, wherever it is (a ``subprocess.run``, an
``asyncio.run``), and the command exits ``128 + signal`` once its clean-up ran; a
second signal exits at once.

Why an exception rather than cancelling an asyncio task: a command runs several
event loops one after the other and synchronous phases between them; the exception
reaches all of them the same way. :class:`Stopped` is a ``KeyboardInterrupt``, so
asyncio treats it as Ctrl-C: it leaves the event loop, and ``asyncio.run`` cancels
the remaining tasks and runs their clean-up (awaits included) before re-raising it;
``except Exception`` handlers let it through.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from types import FrameType

#: The signals every long-running pqcnet command stops on.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
    """A stop signal arrived (:func:`stopping`); ``signum`` is which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stopping(name: str) -> Iterator[None]:
    """Run the body with SIGINT/SIGTERM raising :class:`Stopped`; a stopped body exits
    with ``SystemExit(128 + signal)`` (130 for Ctrl-C, as a shell reports it) after a
    line on stderr. The previous handlers are back afterwards."""
    hits: list[int] = []

    def on_signal(sig: int, _frame: FrameType | None) -> None:
        if hits:  # asked twice: no clean-up wanted
            print(f"{name}: {signal.Signals(sig).name} again, exiting now", file=sys.stderr)
            os._exit(128 + sig)
        hits.append(sig)
        raise Stopped(sig)

    old = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    try:
        yield
    except Stopped as exc:
        print(f"{name}: stopped by {signal.Signals(exc.signum).name} (clean-up done)",
              file=sys.stderr)
        raise SystemExit(128 + exc.signum) from None
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


__all__ = ["STOP_SIGNALS", "Stopped", "stopping"]
