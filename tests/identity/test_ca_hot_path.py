"""Enrollment hot path (``pqcnet bench enroll``): what was cut stays correct.

* ``TokenStore.check`` (run on the CA service's event loop) never waits for another
  enrollment's write + fsync; :meth:`redeem` still decides in its write transaction.
* The CA state keeps each issued-log line instead of re-encoding the whole log on every
  write; the file still round-trips and follows every change.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import sqlite3
import threading
from pathlib import Path

import pytest

from pqcnet.identity import MeshCA, SpiffeId
from pqcnet.identity.tokens import TokenError, TokenStore

TD = "example.org"
R1 = SpiffeId.parse(f"spiffe://{TD}/acme/relayer/r1")


def test_token_check_does_not_wait_for_a_writer_holding_the_lock(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    secret, _ = store.create(str(R1), "relayer", dt.timedelta(minutes=5))
    done = threading.Event()
    # another redeem (another process) is in its write transaction, committing
    with contextlib.closing(sqlite3.connect(tmp_path / "tokens.db",
                                            isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        other.execute("UPDATE tokens SET used_by = used_by")
        worker = threading.Thread(target=lambda: (store.check(secret), done.set()),
                                  daemon=True)
        worker.start()
        assert done.wait(10), "check() waited for the store's writer"
        other.execute("COMMIT")
    # redeem still decides in its transaction: the first spends it, a check then sees it
    store.redeem(secret, R1)
    with pytest.raises(TokenError, match="already used"):
        store.check(secret)
    with pytest.raises(TokenError, match="already used"):
        store.redeem(secret, R1)
    # a token created by another process (another TokenStore on the file) is seen
    other_secret, _ = TokenStore(tmp_path).create(str(R1), "relayer", dt.timedelta(minutes=5))
    assert store.check(other_secret).pattern == str(R1)


def test_ca_state_round_trips_and_follows_changes(tmp_path: Path) -> None:
    ca = MeshCA.create(TD)
    for i in range(5):
        ca.issue(f"spiffe://{TD}/acme/relayer/n{i}", dt.timedelta(hours=1))
    ca.save(tmp_path, b"pw")
    back = MeshCA.load(tmp_path, b"pw")
    assert back.issued == ca.issued
    first = next(iter(ca.issued))
    ca.revoke(first, "superseded")
    ca.issue(f"spiffe://{TD}/acme/relayer/n9", dt.timedelta(hours=1))
    del ca.issued[first]  # pruned from the log (as the MAX_ISSUED_LOG bound does)
    ca.save(tmp_path, b"pw")
    back = MeshCA.load(tmp_path, b"pw")
    assert back.issued == ca.issued and first not in back.issued
    assert back.revocations.keys() == {first}
    assert "issued" not in json.loads(MeshCA.create(TD).state_json())  # its own file
    assert MeshCA.load(tmp_path, b"pw").state_json() == ca.state_json()
