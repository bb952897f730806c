"""Child processes that end with the process that started them — also when it is
SIGKILLed (the OOM killer, a CI job's timeout), where no clean-up of its own runs.

A benchmark starts servers (relayers, sentries, sidecars, nginx, backends); stopped
by SIGINT/SIGTERM it stops them itself (:mod:`pqcnet._util.signals`), but killed
outright it left them running — busy, holding ports, skewing whatever ran next.
Linux's ``PR_SET_PDEATHSIG`` makes the kernel send a process a signal when its parent
dies; it survives ``exec``. Two ways in:

* :func:`die_with_parent` — first thing in a ``multiprocessing`` child (or a
  ``--workers`` worker): the call is made by the child itself;
* :func:`ending_with_us` — for a command: it is started through a three-line Python
  guard that sets the flag and ``exec``\\ s it (same pid). Not ``preexec_fn``: that runs
  between ``fork`` and ``exec`` of a parent that may have threads, where CPython warns
  it can deadlock.

Either way a parent already gone when the flag is set (a race the kernel does not
cover) stops the child at once. The signal is SIGTERM, so the child's own graceful
stop runs — except where the child may be stopped (``chaos run`` pauses processes with
SIGSTOP): there it is SIGKILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
from collections.abc import Sequence

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

#: argv[1] the parent's pid, argv[2] the signal, argv[3:] the command
_GUARD = ("import ctypes, os, sys\n"
          "ctypes.CDLL(None).prctl(1, int(sys.argv[2]), 0, 0, 0)\n"
          "os.getppid() == int(sys.argv[1]) or os._exit(128 + int(sys.argv[2]))\n"
          "os.execvp(sys.argv[3], sys.argv[3:])\n")


def die_with_parent() -> None:
    """This process gets SIGTERM when its parent dies; at once if it already has (a
    ``multiprocessing`` child: its parent process is known). Linux only; elsewhere a
    no-op."""
    parent = multiprocessing.parent_process()
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if parent is not None and os.getppid() != parent.pid:
        os.kill(os.getpid(), signal.SIGTERM)


def ending_with_us(cmd: Sequence[str], sig: signal.Signals = signal.SIGTERM) -> list[str]:
    """``cmd`` as an argv that runs it with ``sig`` due when this process dies (SIGKILL
    for a child that may be stopped then: SIGTERM would wait for a SIGCONT)."""
    if not sys.platform.startswith("linux"):
        return list(cmd)
    return [sys.executable, "-c", _GUARD, str(os.getpid()), str(int(sig)), *cmd]


__all__ = ["die_with_parent", "ending_with_us"]
