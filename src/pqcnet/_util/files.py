"""Files read and appended to defensively.

* Bounded reads: a file named by a user or a peer may be anything, including a
  multi-gigabyte one, so readers take at most ``bound`` bytes and refuse a larger file
  with the caller's own typed error instead of reading it whole.
* Append-only line files: a crash mid-append leaves a last line without its newline;
  an append after it would be glued to it (one unreadable or wrong line, the new
  record lost at the next start), so such files are cut back to their last newline
  when opened for appending (:func:`cut_torn_tail`).
"""

from __future__ import annotations

import os
from pathlib import Path

from pqcnet.errors import PqcnetError


def read_bounded(path: Path, bound: int, too_large: type[PqcnetError],
                 unreadable: type[PqcnetError] | None = None) -> bytes:
    """The bytes of ``path`` (at most ``bound``); ``too_large`` when the file is larger,
    ``unreadable`` (default: ``too_large``) when it cannot be opened or read."""
    try:
        with path.open("rb") as fh:
            data = fh.read(bound + 1)
    except OSError as exc:
        raise (unreadable or too_large)(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > bound:
        raise too_large(f"{path} is larger than {bound} bytes")
    return data


def cut_torn_tail(path: Path) -> bool:
    """Truncate ``path`` after its last newline (a line a crash left unfinished);
    whether anything was cut. A missing or empty file is left alone."""
    try:
        with path.open("rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return False
    if not data or data.endswith(b"\n"):
        return False
    os.truncate(path, data.rfind(b"\n") + 1)
    return True
