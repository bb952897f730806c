"""Which event loop the long-running sentry and sidecar processes use (the CLI runner
asks for it with ``fast_loop=True``).

uvloop (the optional ``pqcnet[fast]`` extra) runs the same asyncio code with the loop,
transports and timers in C; on the per-RPC path of a proxy most of the Python-level
overhead outside our own code is exactly that machinery. It is never required:
without it, or with ``PQCNET_NO_UVLOOP=1`` in the environment (A/B benchmarks,
debugging), the stdlib loop runs. Tests run the code on whatever loop pytest gives
them, so both loops are exercised.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
#: Set to a non-empty value other than "0" to force the stdlib event loop.
NO_UVLOOP_ENV = "PQCNET_NO_UVLOOP"


def loop_factory() -> Any:
    """uvloop's loop factory when it is installed and not disabled, else None."""
    if os.environ.get(NO_UVLOOP_ENV, "0") not in ("", "0"):
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on the fastest loop available."""
    factory = loop_factory()
    if factory is None:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def loop_name() -> str:
    """"uvloop" or "asyncio": what :func:`run` would use (logged at start)."""
    return "asyncio" if loop_factory() is None else "uvloop"
