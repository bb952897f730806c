"""Subprocess for the crash test: append vertices forever, printing each acked id."""

from __future__ import annotations

import sys

from pqcnet.qsdag import Ledger, OpaqueRecord, VertexKind
from tests.qsdag.conftest import ALICE


def main(path: str) -> None:
    ledger = Ledger.open(path)
    i = 0
    while True:
        body = i.to_bytes(8, "big") * 64
        receipt = ledger.append(VertexKind.VOLUME_PROOF,
                                OpaqueRecord("test.Volume", "alice", body), "alice", ALICE)
        sys.stdout.write(receipt.id.hex() + "\n")
        sys.stdout.flush()
        i += 1


if __name__ == "__main__":
    main(sys.argv[1])
