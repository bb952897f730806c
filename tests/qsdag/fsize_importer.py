"""Subprocess for the failed-grouped-write test: import a peer's vertices under an
RLIMIT_FSIZE so that RocksDB's WAL write fails mid-import (a real IO error, EFBIG),
then print the ledger's in-memory state as JSON for the test to compare with disk."""

from __future__ import annotations

import json
import resource
import signal
import sys
from pathlib import Path

from pqcnet.qsdag import Ledger, LedgerStateError
from tests.qsdag.crash_importer import frames


def main(ledger_path: str, frames_path: str, limit: str) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails: EFBIG
    ledger = Ledger.open(ledger_path)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), resource.RLIM_INFINITY))
    try:
        ledger.import_(frames(Path(frames_path)))
        error = None
    except LedgerStateError as exc:
        error = str(exc)
    state = {"error": error, "ids": [v.hex() for v in ledger.ids()],
             "tips": sorted(t.hex() for t in ledger.tips()), "len": len(ledger),
             "alice": ledger.next_counter("alice"), "bob": ledger.next_counter("bob"),
             "orphans": ledger.orphan_count}
    sys.stdout.write(json.dumps(state) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main(*sys.argv[1:4])
