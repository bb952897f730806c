"""One writer of a CA directory's state at a time (``<dir>/.writer.lock``).

A CA's state (``ca-state.json``, the issued log, the CRL number) is read whole by
whoever changes it and written back after the change. ``pqcnet ca serve`` reads it
once and then writes its in-memory copy after every enrollment; the CLI commands
(``ca issue``, ``sign-csr``, ``revoke --dir``, ``crl``), a renewer on ``--renew-ca-dir``
and a node's forced rekey read, change and write within a second. Two of them at once
lose one's change: a revocation made with ``ca revoke --dir`` beside a running service
was not seen by it and undone by its next write — a revoked node back in the CRL's
blind spot, silently.

So every writer holds an exclusive ``flock`` on the lock file: the service for its
whole life, the others from their read to their write. The holder writes who it is
(``{"holder": ..., "pid": ...}``) into the file; a writer that finds the *service* there
is refused at once with what to do instead (waiting would last until the service
stops), one that finds a short writer waits up to ``wait_s`` for it. ``flock`` locks
end with their process, a ``kill -9`` included, so a crash leaves nothing to clean up;
they are per host, like the token store's SQLite locks (``known-limits.md``: one host
writes a CA directory).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from pqcnet.identity.errors import IdentityError

LOCK_FILE = ".writer.lock"
#: What ``pqcnet ca serve`` writes as the holder (other writers are refused at once).
SERVICE = "pqcnet ca serve"
#: Seconds a short writer waits for another short writer by default.
WAIT_S = 10.0
#: Bytes of the holder record read back (it is a few dozen).
_MAX_HOLDER_BYTES = 4096


class CaDirBusy(IdentityError):
    """Another process is writing (or serving) this CA directory."""

    def __init__(self, message: str, holder: str, pid: int | None) -> None:
        super().__init__(message)
        self.holder = holder
        self.pid = pid


def _holder(fd: int) -> tuple[str, int | None]:
    """Who holds the lock, as its holder wrote it ("" if not written yet)."""
    try:
        raw = os.pread(fd, _MAX_HOLDER_BYTES, 0)
        record = json.loads(raw) if raw else {}
        pid = record.get("pid")
        return str(record.get("holder", "")), pid if isinstance(pid, int) else None
    except (OSError, ValueError, AttributeError):
        return "", None


@contextlib.contextmanager
def ca_writer(directory: Path, holder: str, *, wait_s: float = WAIT_S) -> Iterator[None]:
    """Hold ``directory``'s writer lock as ``holder`` (``SERVICE`` for the service).

    Raises :class:`CaDirBusy` when the service holds it (at once) or another writer
    still does after ``wait_s`` seconds."""
    path = Path(directory) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:  # no such directory, read-only, not ours
        raise IdentityError(f"cannot take the CA writer lock {path}: {exc.strerror}") from None
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                other, pid = _holder(fd)
                if other == SERVICE or time.monotonic() >= deadline:
                    raise _busy(Path(directory), holder, other, pid) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"holder": holder, "pid": os.getpid()}).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # nobody named while nobody holds it
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _busy(directory: Path, wanting: str, holder: str, pid: int | None) -> CaDirBusy:
    who = f"{holder or 'another pqcnet process'}" + (f" (pid {pid})" if pid else "")
    if holder == SERVICE and wanting == SERVICE:
        return CaDirBusy(f"{directory} is already served by {who}", holder, pid)
    if holder == SERVICE:
        return CaDirBusy(
            f"{directory} is served by {who}: a change made here would not be seen by it "
            "and its next state write would undo it. Revoke through the service "
            "(`pqcnet ca revoke --ca URL --identity ADMIN_DIR`), let nodes enroll with "
            "tokens (`pqcnet ca token create`), or stop the service first", holder, pid)
    return CaDirBusy(f"{directory} is being written by {who}; try again when it is done",
                     holder, pid)


__all__ = ["SERVICE", "CaDirBusy", "ca_writer"]
