"""History files: one JSON line per client operation.

Publisher lines: ``{"op": "publish" | "ack" | "refused", "customer", "channel", "seq",
"digest", "bytes", "t"}`` — ``publish`` before a frame is sent, ``ack`` once the relayer
accepted it (durable), ``refused`` for a final refusal. The subscriber's history is its
:class:`~pqcnet.relayer.cursor.JournalCursor` file: one line per frame the application
took (op ``app_ack`` implied), written and fsynced before the relayer gets the ack —
so it is both the application's record and its cursor.

Payloads are a pure function of ``(seed, customer, channel, seq, size)``, so a publisher
restarted after SIGKILL republishes byte-identical frames and a phantom (delivered, never
published, or altered) shows as a digest mismatch.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from pqcnet.relayer.cursor import payload_digest
from pqcnet.relayer.frame import Frame

__all__ = ["HistoryWriter", "payload_digest", "payload_for", "read_history"]

#: bytes of one history line read back; a longer line is corrupt
MAX_HISTORY_LINE = 4096


def payload_for(seed: int, customer: str, channel: str, seq: int, size: int) -> bytes:
    """The deterministic payload of one frame."""
    out = b""
    block = 0
    while len(out) < size:
        out += hashlib.blake2b(f"{seed}|{customer}|{channel}|{seq}|{block}".encode(),
                               digest_size=64).digest()
        block += 1
    return out[:size]


class HistoryWriter:
    """Appends operations to a history file (flushed per call: survives SIGKILL)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: IO[str] = path.open("a")

    def record(self, op: str, frames: list[Frame]) -> None:
        """One line per frame for ``op``."""
        now = round(time.time(), 4)
        self._fh.write("".join(
            json.dumps({"op": op, "customer": f.customer, "channel": f.channel, "seq": f.seq,
                        "digest": payload_digest(f.payload), "bytes": len(f.payload),
                        "t": now}) + "\n" for f in frames))
        self._fh.flush()

    def close(self) -> None:
        """Close the file."""
        self._fh.close()


def read_history(path: Path) -> Iterator[dict[str, Any]]:
    """The complete lines of ``path`` (a torn last line from a SIGKILL is skipped);
    lines without ``op`` are application acks (a subscriber journal)."""
    with path.open("rb") as fh:
        for raw in fh:
            if not raw.endswith(b"\n") or len(raw) > MAX_HISTORY_LINE:
                continue
            try:
                row = json.loads(raw)
            except ValueError:
                continue
            if isinstance(row, dict) and "seq" in row:
                row.setdefault("op", "app_ack")
                yield row
