"""The RocksDB bundle store: held across reopen, oldest first, expired never returned,
bounded; and agents on the in-process transport delivering held bundles to a peer that
returns (the same scenario runs over go-waku in ``test_waku``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pqcnet.mesh.dtn import BundleStore
from pqcnet.mesh.errors import BundleStoreError
from pqcnet.mesh.transport import InProcessHub, InProcessTransport

from .dtn_scenarios import offline_peer_gets_bundles_on_return
from .harness import FAST


def test_bundles_survive_reopen_and_come_out_oldest_first(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "b")
    store.put("carol", b"second", created_ms=200, expires_ms=10_000)
    store.put("carol", b"first", created_ms=100, expires_ms=10_000)
    store.put("dave", b"other", created_ms=100, expires_ms=10_000)
    store.put("carol", b"first", created_ms=150, expires_ms=10_000)   # same payload: no copy
    store.close()
    store = BundleStore(tmp_path / "b")
    assert len(store) == 3
    assert [b.payload for b in store.pending("carol", 300)] == [b"first", b"second"]
    assert store.destinations() == {"carol", "dave"}
    for b in store.pending("carol", 300):
        store.remove(b)
    assert store.pending("carol", 300) == [] and len(store) == 1
    store.close()


def test_expired_bundles_are_never_returned_and_get_purged(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "b")
    store.put("carol", b"short", created_ms=0, expires_ms=1000)
    store.put("carol", b"long", created_ms=0, expires_ms=100_000)
    assert {b.payload for b in store.pending("carol", 999)} == {b"short", b"long"}
    assert [b.payload for b in store.pending("carol", 1000)] == [b"long"]
    assert store.expire(1000) == 1
    assert len(store) == 1
    with pytest.raises(BundleStoreError):
        store.put("carol", b"dead on arrival", created_ms=5, expires_ms=5)
    store.close()


def test_full_store_refuses_instead_of_evicting(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "b", max_bundles=2, sync=False)
    store.put("a", b"1", created_ms=0, expires_ms=50)
    store.put("b", b"2", created_ms=0, expires_ms=10_000)
    with pytest.raises(BundleStoreError, match="full"):
        store.put("c", b"3", created_ms=10, expires_ms=10_000)
    # once one expires there is room again
    store.put("c", b"3", created_ms=60, expires_ms=10_000)
    assert store.destinations() == {"b", "c"}
    store.close()


def test_one_absent_peer_cannot_take_the_whole_store(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "b", max_bundles=10, max_per_destination=2, sync=False)
    store.put("gone", b"1", created_ms=0, expires_ms=100)
    store.put("gone", b"2", created_ms=0, expires_ms=10_000)
    with pytest.raises(BundleStoreError, match="gone"):
        store.put("gone", b"3", created_ms=10, expires_ms=10_000)
    store.put("other", b"1", created_ms=10, expires_ms=10_000)   # others still have room
    store.put("gone", b"3", created_ms=200, expires_ms=10_000)   # an expired one frees a slot
    assert [b.payload for b in store.pending("gone", 200)] == [b"2", b"3"]
    store.close()


@pytest.mark.timeout(60)
async def test_offline_peer_gets_bundles_on_return_in_process(tmp_path: Path) -> None:
    hub = InProcessHub()
    await offline_peer_gets_bundles_on_return(lambda i: InProcessTransport(hub), tmp_path,
                                              config=FAST)
