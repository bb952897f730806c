"""The token store in SQLite: a token is spent once across processes, an earlier
version's ``tokens.json`` is carried over, the files stay private, and spending one
token no longer rewrites all of them."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import multiprocessing
import os
import sqlite3
from pathlib import Path

import pytest

from pqcnet.identity import SpiffeId
from pqcnet.identity.certs import utcnow
from pqcnet.identity.errors import IdentityError
from pqcnet.identity.tokens import TokenError, TokenRecord, TokenStore, hash_token

TD = "example.org"
R1 = SpiffeId.parse(f"spiffe://{TD}/acme/relayer/r1")


def _race(ca_dir: str, secret: str, start: multiprocessing.synchronize.Event,
          out: multiprocessing.Queue[str]) -> None:
    store = TokenStore(Path(ca_dir))
    start.wait()
    try:
        store.redeem(secret, R1, key_digest=f"{os.getpid():x}")
        out.put("spent")
    except TokenError as exc:
        out.put(exc.code)


def test_a_token_is_spent_once_by_racing_processes(tmp_path: Path) -> None:
    """Eight processes (eight CA services on one directory, or a replay racing the
    first use) redeem the same token at once: exactly one spends it, the seven others
    are refused ``used`` — the check and the spend are one transaction."""
    secret, _ = TokenStore(tmp_path).create(str(R1), "relayer", dt.timedelta(minutes=5))
    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path), secret, start, out))
             for _ in range(8)]
    for p in procs:
        p.start()
    start.set()
    results = sorted(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(30)
    assert results == ["spent"] + ["used"] * 7
    (rec,) = TokenStore(tmp_path).records()
    assert rec.used_by == str(R1) and rec.used_at is not None


def test_an_earlier_versions_json_store_is_imported_once(tmp_path: Path) -> None:
    """A CA directory of an earlier version holds ``tokens.json``: its live token can
    still be redeemed, its spent one is still a replay (not "unknown"), and the file is
    renamed so a later open does not import it again over newer state."""
    now = utcnow()
    live = "pqcnet-et1." + "A" * 43
    spent = "pqcnet-et1." + "B" * 43
    records = [TokenRecord(hash_token(live), str(R1), "relayer", now, now + dt.timedelta(
        minutes=5)), TokenRecord(hash_token(spent), str(R1), "relayer", now,
                                 now + dt.timedelta(minutes=5), now, str(R1), "ab")]
    (tmp_path / "tokens.json").write_text(json.dumps(
        {"v": 1, "tokens": [r.to_json() for r in records]}, indent=1))
    store = TokenStore(tmp_path)
    assert store.check(live).pattern == str(R1)
    with pytest.raises(TokenError, match="already used"):
        store.check(spent)
    assert store.records() == sorted(records, key=lambda r: r.token_hash)
    assert not (tmp_path / "tokens.json").exists()
    assert (tmp_path / "tokens.json.imported").exists()
    store.redeem(live, R1)
    assert TokenStore(tmp_path).records()[0 if records[0].token_hash < records[1].token_hash
                                          else 1].used_at is not None


def test_a_corrupt_legacy_store_is_a_clear_error_and_nothing_is_lost(tmp_path: Path) -> None:
    (tmp_path / "tokens.json").write_text('{"v": 1, "tokens": [{"token_hash": ')
    with pytest.raises(IdentityError, match=r"corrupt token store .*tokens\.json"):
        TokenStore(tmp_path).check("pqcnet-et1." + "A" * 43)
    assert (tmp_path / "tokens.json").exists()  # left for the operator to look at


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "tokens.db").write_bytes(b"not sqlite " * 100)
    with pytest.raises(IdentityError, match=r"corrupt token store .*tokens\.db"):
        TokenStore(tmp_path).create(str(R1), "relayer", dt.timedelta(minutes=5))


def test_the_store_files_are_private_and_hold_no_secret(tmp_path: Path) -> None:
    os.umask(0o022)
    store = TokenStore(tmp_path)
    secrets = [store.create(str(R1), "relayer", dt.timedelta(minutes=5))[0]
               for _ in range(3)]
    store.redeem(secrets[0], R1)
    files = sorted(p for p in tmp_path.iterdir() if p.name.startswith("tokens.db"))
    assert [p.name for p in files] == ["tokens.db", "tokens.db-shm", "tokens.db-wal"]
    for p in files:
        assert p.stat().st_mode & 0o777 == 0o600, p
        assert not any(s.encode() in p.read_bytes() for s in secrets)


def test_spending_a_token_writes_its_row_not_the_store(tmp_path: Path) -> None:
    """Before, every redeem rewrote (and fsynced) every token: O(tokens) per
    enrollment. Now the WAL grows by about one page per redeem, whatever the number of
    tokens — read from the file sizes, not from pqcnet."""
    store = TokenStore(tmp_path)
    many = [store.create(str(R1), "relayer", dt.timedelta(minutes=5))[0]
            for _ in range(2000)]
    with contextlib.closing(sqlite3.connect(tmp_path / "tokens.db")) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        (page,) = con.execute("PRAGMA page_size").fetchone()
    db_size = (tmp_path / "tokens.db").stat().st_size
    assert db_size > 100 * page  # 2,000 tokens: far more than a redeem may write
    store.redeem(many[0], R1)
    wal = (tmp_path / "tokens.db-wal").stat().st_size
    assert 0 < wal <= 6 * (page + 24) + 32, (wal, page)  # header + a few frames


def test_counts_agree_with_each_records_state_as_time_passes(tmp_path: Path) -> None:
    """``counts`` (what the ``pqcnet_ca_tokens`` gauge shows) is one SQL pass; it must
    name the same state as each record's own (what ``ca token list`` shows) for a
    mixed store, at several moments — tokens expire between them, a spent one stays
    ``used`` after its expiry, an expiry exactly at ``now`` is expired."""
    import random

    rng = random.Random(15)
    store = TokenStore(tmp_path)
    t0 = utcnow()
    for i in range(60):
        created = t0 - dt.timedelta(minutes=rng.randrange(0, 30))
        secret, rec = store.create(f"spiffe://{TD}/acme/relayer/*", "relayer",
                                   dt.timedelta(minutes=rng.randrange(1, 40)), now=created)
        if i % 3 == 0 and t0 < rec.expires_at:
            store.redeem(secret, SpiffeId.parse(f"spiffe://{TD}/acme/relayer/n{i}"), now=t0)
    records = store.records()
    moments = [t0, t0 + dt.timedelta(minutes=5), t0 + dt.timedelta(minutes=20),
               records[7].expires_at, t0 + dt.timedelta(hours=2)]
    seen = set()
    for now in moments:
        expected = {state: 0 for state in ("live", "used", "expired")}
        for rec in records:
            expected[rec.state(now)] += 1
        assert store.counts(now) == expected, now
        seen |= {s for s, n in expected.items() if n}
    assert seen == {"live", "used", "expired"}  # every state met at least once
    assert store.counts(t0 + dt.timedelta(hours=2))["live"] == 0
