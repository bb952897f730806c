"""Subprocess for the grouped-import crash test: import a peer's vertices from a
file of length-prefixed wire frames, printing the index of each one before it is
taken. Before frame ``stall`` the stream stalls (like a peer that stops sending)
until stdin has a line, so the test can kill the import at a known point."""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterator
from pathlib import Path

from pqcnet.qsdag import Ledger


def frames(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    at = 0
    while at < len(data):
        (n,) = struct.unpack_from(">I", data, at)
        yield data[at + 4:at + 4 + n]
        at += 4 + n


def main(ledger_path: str, frames_path: str, stall: str = "-1") -> None:
    ledger = Ledger.open(ledger_path)

    def stream() -> Iterator[bytes]:
        for i, frame in enumerate(frames(Path(frames_path))):
            sys.stdout.write(f"{i}\n")
            sys.stdout.flush()
            if i == int(stall):
                sys.stdin.readline()
            yield frame

    ledger.import_(stream())
    sys.stdout.write("done\n")
    sys.stdout.flush()
    ledger.close()


if __name__ == "__main__":
    main(*sys.argv[1:4])
