"""Bounded file reads: a file named by a user or a peer may be anything, including a
multi-gigabyte one, so readers take at most ``bound`` bytes and refuse a larger file
with the caller's own typed error instead of reading it whole."""

from __future__ import annotations

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
