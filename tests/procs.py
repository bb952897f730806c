"""What the tests read about processes from ``/proc`` (no psutil here): whether a pid
still runs, a process's children — for the ``--workers`` supervisors, whose workers
must not outlive them — and which process listens on a port (which worker to kill);
and the ``pqcnet`` command the tests start (the one installed beside this Python)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

#: The ``pqcnet`` console script of the environment running the tests.
PQCNET = str(Path(sys.executable).parent / "pqcnet")


def _stat_fields(pid: int | str) -> list[str] | None:
    """``/proc/<pid>/stat`` after the command name (state is [0], ppid [1])."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def stopped(pid: int) -> bool:
    """``pid`` is stopped by a signal (SIGSTOP: state ``T``)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] == "T"


def running(pid: int) -> bool:
    """``pid`` exists and is not a zombie (an orphan's new parent may never reap it)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid``."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(entry.name)
            if fields is not None and int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def descendants(pid: int) -> set[int]:
    """Every live process under ``pid``: its children, theirs, and so on."""
    out: set[int] = set()
    todo = [pid]
    while todo:
        kids = set(children(todo.pop())) - out
        out |= kids
        todo += kids
    return {p for p in out if running(p)}


def listener_pid(port: int) -> int | None:
    """The process listening on TCP ``port`` (IPv4), or None: the socket's inode from
    ``/proc/net/tcp``, then the process holding a descriptor to it."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "0A":  # LISTEN
            inodes.add(f"socket:[{cols[9]}]")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:  # gone, or not ours to read
            continue
        for fd in fds:
            try:
                if str(fd.readlink()) in inodes:
                    return int(entry.name)
            except OSError:  # closed meanwhile
                continue
    return None


def terminate(proc: subprocess.Popen[Any], timeout: float = 20.0) -> None:
    """Stop a child the way an operator would (SIGTERM), SIGKILL it if it has not
    exited within ``timeout`` seconds, and close its stdout and stderr pipes."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        if pipe:
            pipe.close()
