"""CA service fixtures: a real CA, a real ledger, the service on a real socket."""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pqcnet.identity import MeshCA
from pqcnet.identity.tokens import TokenBundle, TokenStore
from pqcnet.qsdag.ledger import Ledger
from pqcnet.runtime.ca_service import CaService, CaServiceConfig

TD = "example.org"


@dataclass
class Service:
    """A running CA service and what the tests poke at."""

    ca: MeshCA
    dir: Path
    tokens: TokenStore
    ledger: Ledger
    service: CaService
    url: str

    def token(self, pattern: str = f"spiffe://{TD}/acme/relayer/*", role: str = "relayer",
              ttl: dt.timedelta = dt.timedelta(minutes=5), *,
              now: dt.datetime | None = None) -> TokenBundle:
        secret, rec = self.tokens.create(pattern, role, ttl, now=now)
        return TokenBundle(secret, pattern, role, rec.expires_at, self.ca.trust_bundle_pem(),
                           self.url)

    def vertices(self) -> int:
        """CA vertices after genesis (issuances + revocations)."""
        return self.ledger.next_counter("mesh-ca") - 1

    def state(self) -> tuple[list[tuple[object, ...]], int, int]:
        """What a refused request must leave unchanged: token rows, issued, vertices."""
        return token_rows(self.dir), len(self.ca.issued), self.vertices()


def token_rows(ca_dir: Path) -> list[tuple[object, ...]]:
    """The token store's rows, read with SQLite itself (not through pqcnet's store)."""
    path = ca_dir / "tokens.db"
    if not path.exists():
        return []
    with contextlib.closing(sqlite3.connect(path)) as con:
        return con.execute("SELECT * FROM tokens ORDER BY token_hash").fetchall()


async def start_service(tmp_path: Path, config: CaServiceConfig | None = None) -> Service:
    ca = MeshCA.create(TD)
    tokens = TokenStore(tmp_path)
    ledger = Ledger.open(tmp_path / "ledger")
    ca.save(tmp_path, b"pw")
    svc = CaService(ca, tmp_path, tokens, config or CaServiceConfig(), ledger=ledger)
    port = await svc.start()
    return Service(ca, tmp_path, tokens, ledger, svc, f"https://127.0.0.1:{port}")


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    svc = await start_service(tmp_path)
    try:
        yield svc
    finally:
        await svc.service.close()
        svc.ledger.close()
