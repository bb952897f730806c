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

Where it is raised matters: a signal handler runs between any two bytecodes, also
inside a destructor or a weakref callback, where Python prints an exception and drops
it ("Exception ignored in …": the stop was lost and the run went on). So while an
event loop runs, the handler only schedules the raise as the loop's next callback;
and a :class:`Stopped` that was dropped all the same (``sys.unraisablehook``) is
delivered again, as the signal it came from (decision 0027).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
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
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop in this thread: raise here
            raise Stopped(sig) from None
        loop.call_soon_threadsafe(_raise, sig)

    def unraisable(u: sys.UnraisableHookArgs) -> None:
        if isinstance(u.exc_value, Stopped):  # raised where Python drops it: again
            hits.clear()
            _redeliver(u.exc_value.signum)
        else:
            previous_hook(u)

    old = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield
    except Stopped as exc:
        print(f"{name}: stopped by {signal.Signals(exc.signum).name} (clean-up done)",
              file=sys.stderr)
        raise SystemExit(128 + exc.signum) from None
    finally:
        sys.unraisablehook = previous_hook
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _raise(sig: int) -> None:
    raise Stopped(sig)


#: Seconds before a dropped stop is signalled again (past the hook that saw it drop).
REDELIVER_AFTER_S = 0.01


def _redeliver(sig: int) -> None:
    """Send ``sig`` to the main thread again, from another thread a moment later: sent
    from the main thread itself its handler would run at once, inside the unraisable
    hook — where the exception is dropped again. A real signal (``pthread_kill``), so
    a main thread blocked in a call (a sleep, a ``wait``) is woken for it."""
    main = threading.main_thread().ident
    assert main is not None

    def later() -> None:
        time.sleep(REDELIVER_AFTER_S)
        signal.pthread_kill(main, sig)

    threading.Thread(target=later, name="stop-redeliver", daemon=True).start()


__all__ = ["STOP_SIGNALS", "Stopped", "stopping"]
