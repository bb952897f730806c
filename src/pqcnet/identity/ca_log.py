"""The CA's issued log on disk: ``ca-issued.jsonl``, one line per issued certificate,
appended as certificates are issued.

Why a journal: the log lived inside ``ca-state.json``, which a CA service rewrote and
fsynced whole after every issuance — 10 MB and ~40 ms per certificate at the
100,000-entry bound, 4 ms at 10,000 (benchmarks/README.md). Now an issuance appends
its line (one small write and fsync), and an entry that leaves the log (pruned at the
bound, forgotten after a lost race) appends a tombstone,
``{"forget": hex}``. The file is rewritten (atomically) only when it holds more than
twice the live entries (plus a margin), or cannot simply be extended (first write, an
earlier version's log inside the state file, a last line torn by a crash): each
rewrite is paid for by as many appends as it removes lines.

A line is ``{"serial": hex, "spiffe_id": ..., "not_after": iso}`` or a tombstone; a
serial seen twice (an append repeated after a failed write) keeps its last line.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pqcnet.identity.errors import IdentityError
from pqcnet.identity.keystore import atomic_write, read_bounded

CA_ISSUED_FILE = "ca-issued.jsonl"


@dataclass(frozen=True, slots=True)
class IssuedRecord:
    """One entry of the issued log (serial, SPIFFE ID, expiry), kept for rotation."""

    serial: int
    spiffe_id: str
    not_after: dt.datetime


def issued_line(rec: IssuedRecord) -> str:
    """One issued-log entry as a JSON line (no newline)."""
    return json.dumps({"serial": format(rec.serial, "x"), "spiffe_id": rec.spiffe_id,
                       "not_after": rec.not_after.isoformat()})


def parse_issued(d: Any) -> IssuedRecord:
    """An entry from its JSON object (``KeyError``/``ValueError``/``TypeError`` if off)."""
    return IssuedRecord(int(d["serial"], 16), str(d["spiffe_id"]),
                        dt.datetime.fromisoformat(d["not_after"]))


@dataclass(frozen=True, slots=True)
class LogWrite:
    """What one save does to the journal: append ``lines``, or (``rewrite``) replace the
    file with them; ``serials`` are the entries it makes durable, ``forgotten`` the
    entries whose removal it makes durable."""

    lines: tuple[str, ...]
    rewrite: bool
    serials: tuple[int, ...]
    forgotten: tuple[int, ...]


#: Lines a journal may hold beyond twice its live entries before it is rewritten.
SLACK_LINES = 1024


@dataclass
class IssuedJournal:
    """Which entries of a CA's issued log are on disk, and what a save must write."""

    #: serials live in the file
    saved: set[int] = field(default_factory=set)
    #: serials issued since the last save, in issue order
    unsaved: list[int] = field(default_factory=list)
    #: serials dropped from the file's live entries, tombstones not written yet
    forgotten: list[int] = field(default_factory=list)
    #: lines in the file (entries and tombstones)
    lines: int = 0
    #: the next save replaces the file (it cannot be extended as it is)
    rewrite: bool = True

    def issued(self, serial: int) -> None:
        self.unsaved.append(serial)

    def dropped(self, serial: int) -> None:
        """``serial`` left the log (pruned, forgotten)."""
        if serial in self.saved:
            self.saved.discard(serial)
            self.forgotten.append(serial)
        elif serial in self.unsaved:
            self.unsaved.remove(serial)

    def pending(self, issued: dict[int, IssuedRecord]) -> LogWrite | None:
        """The write that brings the file to ``issued`` (None: it is there already).
        Any mismatch between the counts (the log changed behind the journal's back)
        makes it a rewrite."""
        appended = len(self.unsaved) + len(self.forgotten)
        if (not self.rewrite and len(issued) == len(self.saved) + len(self.unsaved)
                and all(s in issued for s in self.unsaved)
                and self.lines + appended <= 2 * len(issued) + SLACK_LINES):
            if not appended:
                return None
            return LogWrite(
                tuple([*(issued_line(issued[s]) for s in self.unsaved),
                       *(json.dumps({"forget": format(s, "x")}) for s in self.forgotten)]),
                False, tuple(self.unsaved), tuple(self.forgotten))
        return LogWrite(tuple(issued_line(r) for r in issued.values()), True,
                        tuple(issued), tuple(self.forgotten))

    def written(self, w: LogWrite) -> None:
        """``w`` is durable."""
        if w.rewrite:
            self.saved, self.lines, self.rewrite = set(w.serials), len(w.lines), False
        else:
            self.saved.update(w.serials)
            self.lines += len(w.lines)
        done, gone = set(w.serials), set(w.forgotten)
        self.unsaved = [s for s in self.unsaved if s not in done]
        self.forgotten = [s for s in self.forgotten if s not in gone]


def write_log(directory: Path, w: LogWrite) -> None:
    """Apply ``w`` to ``directory``'s journal, durably (0600)."""
    path = Path(directory) / CA_ISSUED_FILE
    data = "".join(line + "\n" for line in w.lines).encode()
    if w.rewrite:
        atomic_write(path, data, mode=0o600)
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_log(directory: Path, limit: int, into: dict[int, IssuedRecord]
             ) -> IssuedJournal | None:
    """Apply the journal's lines to ``into`` (entries added, tombstones removing); the
    journal as the file stands — to be rewritten if its last line is torn (a crash
    mid-append). None when there is no journal."""
    path = Path(directory) / CA_ISSUED_FILE
    if not path.exists():
        return None
    lines = read_bounded(path, limit, "CA issued log").split(b"\n")
    torn = lines.pop() != b""  # after the last newline: empty unless torn
    saved: set[int] = set()
    for n, line in enumerate(lines, 1):
        try:
            d = json.loads(line)
            if "forget" in d:
                serial = int(d["forget"], 16)
                into.pop(serial, None)
                saved.discard(serial)
            else:
                rec = parse_issued(d)
                into.pop(rec.serial, None)  # a repeated line moves the entry to the end
                into[rec.serial] = rec
                saved.add(rec.serial)
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise IdentityError(f"corrupt CA issued log {path} line {n}: {exc}") from None
    return IssuedJournal(saved=saved, lines=len(lines), rewrite=torn)


__all__ = ["CA_ISSUED_FILE", "SLACK_LINES", "IssuedJournal", "IssuedRecord", "LogWrite",
           "issued_line", "parse_issued", "read_log", "write_log"]
