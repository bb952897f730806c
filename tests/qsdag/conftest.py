"""A small real ledger on RocksDB in a temp dir: a governance authority and two nodes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pqcnet.crypto.pqc import SigningKey
from pqcnet.qsdag import Ledger

# Deterministic keys keep the tests fast and reproducible.
GOV = SigningKey.from_seed(b"g" * 32)
ALICE = SigningKey.from_seed(b"a" * 32)
BOB = SigningKey.from_seed(b"b" * 32)


@dataclass
class World:
    ledger: Ledger
    path: Path


def make_ledger(path: Path, **kw: object) -> Ledger:
    ledger = Ledger.open(path, **kw)  # type: ignore[arg-type]
    ledger.init_genesis("testnet", "gov", GOV)
    ledger.register_author("alice", ALICE.public_key, registrar="gov", signer=GOV)
    ledger.register_author("bob", BOB.public_key, registrar="gov", signer=GOV)
    return ledger


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    ledger = make_ledger(tmp_path / "ledger")
    yield World(ledger, tmp_path / "ledger")
    ledger.close()
