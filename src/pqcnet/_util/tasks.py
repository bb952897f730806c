"""Stopping background tasks without losing the stopper's own cancellation.

The usual ``task.cancel(); with suppress(CancelledError): await task`` cannot tell the
task's CancelledError from one aimed at the *caller*: a ``close()`` cancelled while it
waits (a shutdown deadline, a handler whose client went) swallows that cancellation
and carries on as if nobody had asked it to stop. :func:`cancel_and_wait` waits for
the tasks through ``asyncio.wait``, which never raises what a task raised, so every
CancelledError it sees is the caller's own: it still waits until the tasks have
ended (nothing of theirs runs on after a close returned or raised), then raises it.
An error a task raised while ending is raised as before; the caller decides what to
tolerate. Cleanup that must happen even when the caller is cancelled goes in a
``finally`` after the call.
"""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None) -> None:
    """Cancel each of ``tasks`` (None entries skipped) and wait until all have ended.

    Raises the caller's CancelledError if the caller was cancelled meanwhile (after
    the tasks ended), else the first error a task ended with other than its
    cancellation.
    """
    live = [t for t in tasks if t is not None]
    for t in live:
        t.cancel()
    mine: asyncio.CancelledError | None = None
    while pending := [t for t in live if not t.done()]:
        try:
            await asyncio.wait(pending)
        except asyncio.CancelledError as exc:  # ours, never a task's: wait on, then say
            mine = exc.with_traceback(None)  # our frame: no cycle through it
            for t in pending:  # as awaiting a task would: pass the cancel on
                t.cancel()
    errors = [err for t in live if not t.cancelled() and (err := t.exception()) is not None]
    if mine is not None:
        raise mine
    if errors:
        raise errors[0]


__all__ = ["cancel_and_wait"]
