"""Subscriber cursors: the highest seq per (customer, channel) the application took.

The cursor is what makes delivery exactly-once *to the application*: the relayer and
the bus are at-least-once across crashes, so a subscriber sees redelivered frames
after a reconnect or a relayer restart; it drops every seq at or below its cursor.
The cursor must be committed **with** the application's acknowledgement — after the
application holds the frames, never before (that would lose them on a crash) — and
be durable if the application outlives a process:

* :class:`MemoryCursor` — one process; survives reconnects and relayer restarts.
* :class:`FileCursor` — a small JSON file replaced atomically (write, fsync, rename,
  fsync the directory) on each commit. If the application's own output and the
  cursor are separate files, a crash between them repeats at most the last batch.
* :class:`JournalCursor` — the application's output *is* the cursor: an append-only
  JSON-lines file, one line per frame, fsynced per batch; at start the cursor is the
  highest seq per topic found in it (a torn last line is cut off). Nothing can fall
  between "written" and "committed", so a SIGKILL at any instant neither loses nor
  repeats a frame. ``pqcnet subscribe --output FILE`` uses it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Protocol

from pqcnet.relayer.errors import RelayerError
from pqcnet.relayer.frame import Frame, Topic

#: bytes of a cursor file read at start; bounds memory on a corrupt or hostile file
MAX_CURSOR_FILE = 64 * 1024 * 1024


class CursorError(RelayerError):
    """A cursor file cannot be read or written."""

    code = 60


class Cursor(Protocol):
    """Where a subscriber keeps what the application has taken."""

    def load(self) -> dict[Topic, int]:
        """Highest seq per topic already taken (empty for a new subscriber)."""
        ...

    def commit(self, frames: Sequence[Frame], upto: Mapping[Topic, int]) -> None:
        """The application took ``frames`` (``upto``: their highest seq per topic)."""
        ...


class MemoryCursor:
    """A cursor for the life of one process."""

    def __init__(self) -> None:
        self.upto: dict[Topic, int] = {}

    def load(self) -> dict[Topic, int]:
        return dict(self.upto)

    def commit(self, frames: Sequence[Frame], upto: Mapping[Topic, int]) -> None:
        for topic, seq in upto.items():
            self.upto[topic] = max(self.upto.get(topic, 0), seq)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileCursor(MemoryCursor):
    """A JSON cursor file, replaced atomically on each commit."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        if self.path.exists():
            try:
                if self.path.stat().st_size > MAX_CURSOR_FILE:
                    raise CursorError(f"cursor file {self.path} is over {MAX_CURSOR_FILE} bytes")
                rows = json.loads(self.path.read_text())
                self.upto = {(str(c), str(ch)): int(n) for c, ch, n in rows["topics"]}
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CursorError(f"cursor file {self.path} unreadable: {exc}") from None

    def commit(self, frames: Sequence[Frame], upto: Mapping[Topic, int]) -> None:
        super().commit(frames, upto)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        body = json.dumps({"topics": [[c, ch, n] for (c, ch), n in sorted(self.upto.items())]})
        try:
            with tmp.open("w") as fh:
                fh.write(body)
                fh.flush()
                os.fsync(fh.fileno())
            tmp.replace(self.path)
            _fsync_dir(self.path.parent)
        except OSError as exc:
            raise CursorError(f"cursor file {self.path} not written: {exc}") from None


def frame_line(frame: Frame) -> dict[str, object]:
    """The JSON object a journal (and ``pqcnet subscribe``) writes for one frame."""
    return {"customer": frame.customer, "channel": frame.channel, "seq": frame.seq,
            "bytes": len(frame.payload), "digest": payload_digest(frame.payload)}


def payload_digest(payload: bytes) -> str:
    """Short content digest of a payload (histories compare frames by it)."""
    return hashlib.blake2b(payload, digest_size=8).hexdigest()


class JournalCursor(MemoryCursor):
    """Append-only JSON-lines output that is also the cursor (see the module doc)."""

    def __init__(self, path: str | Path, *, fsync: bool = True) -> None:
        super().__init__()
        self.path = Path(path)
        self.fsync = fsync
        good = 0
        if self.path.exists():
            try:
                with self.path.open("rb") as fh:
                    for raw in fh:
                        if not raw.endswith(b"\n"):
                            break  # torn last line: the batch was never committed
                        try:
                            row = json.loads(raw)
                            topic = (str(row["customer"]), str(row["channel"]))
                            seq = int(row["seq"])
                        except (ValueError, KeyError, TypeError):
                            break
                        self.upto[topic] = max(self.upto.get(topic, 0), seq)
                        good += len(raw)
                if good != self.path.stat().st_size:
                    os.truncate(self.path, good)
            except OSError as exc:
                raise CursorError(f"journal {self.path} unreadable: {exc}") from None
        self._fh: IO[str] = self.path.open("a")

    def commit(self, frames: Sequence[Frame], upto: Mapping[Topic, int]) -> None:
        super().commit(frames, upto)
        try:
            self._fh.write("".join(json.dumps(frame_line(f)) + "\n" for f in frames))
            self._fh.flush()
            if self.fsync:
                os.fsync(self._fh.fileno())
        except OSError as exc:
            raise CursorError(f"journal {self.path} not written: {exc}") from None

    def close(self) -> None:
        """Close the file."""
        self._fh.close()
