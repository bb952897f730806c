"""OrphanPool on its own: bounds per sub-pool, persistence, and release order.

The pool gets a real ledger as its view of anchored keys and its own RocksDB store;
``release`` is driven with an ``anchor`` function that does what the ledger does
(anchor, then leave the pool in a batch), recording the order.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pqcnet.crypto.pqc import SigningKey
from pqcnet.qsdag import (
    AnchorReceipt,
    BadSignature,
    Ledger,
    OrphanPool,
    OrphanPoolFull,
    Route,
    Vertex,
    VertexKind,
    sign_vertex,
)
from pqcnet.qsdag.payloads import encode_payload
from pqcnet.qsdag.store import Store
from tests.qsdag.conftest import ALICE, BOB, GOV, World

pytestmark = pytest.mark.timeout(120)

JUNK = SigningKey.from_seed(b"j" * 32)


def junk(i: int) -> Vertex:
    """A vertex from an author nobody registered, on a parent nobody has."""
    return sign_vertex(JUNK, kind=VertexKind.ROUTE, author=f"mallory-{i}", counter=3,
                       timestamp_ms=1, key_version=1, parents=[bytes([i]) * 32],
                       payload=encode_payload(Route(f"j{i}", "m")))


def waiting(ledger: Ledger, author: str, key: SigningKey, topic: str) -> Vertex:
    """A valid vertex by ``author`` on a parent nobody has (so it must wait)."""
    return ledger.build_vertex(author, key, VertexKind.ROUTE, Route(topic, author),
                               parents=[os.urandom(32)])


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "pool")
    yield s
    s.close()


def test_bounds_per_sub_pool(world: World, store: Store) -> None:
    pool = OrphanPool(store, world.ledger, max_orphans=5, max_per_author=2, max_unverified=3)
    assert pool.max_unverified == 2  # never more than half of the pool
    led = world.ledger
    a1, a2, a3 = (waiting(led, "alice", ALICE, f"a{i}") for i in range(3))
    pool.park(a1, a1.id)
    pool.park(a1, a1.id)  # parking twice is a no-op
    pool.park(a2, a2.id)
    with pytest.raises(OrphanPoolFull, match="alice has 2"):
        pool.park(a3, a3.id)
    pool.park(junk(1), junk(1).id)
    pool.park(junk(2), junk(2).id)
    with pytest.raises(OrphanPoolFull, match="unverified"):
        pool.park(junk(3), junk(3).id)
    b1, b2 = waiting(led, "bob", BOB, "b1"), waiting(led, "bob", BOB, "b2")
    pool.park(b1, b1.id)
    with pytest.raises(OrphanPoolFull, match="orphan pool full"):
        pool.park(b2, b2.id)
    forged = waiting(led, "bob", ALICE, "forged")
    with pytest.raises(BadSignature):  # a known author's key did not sign it
        pool.park(forged, forged.id)
    assert len(pool) == 5 and a1.id in pool and a3.id not in pool


def test_reload_keeps_the_classification(world: World, store: Store) -> None:
    pool = OrphanPool(store, world.ledger, max_orphans=10, max_per_author=1, max_unverified=1)
    a = waiting(world.ledger, "alice", ALICE, "a")
    pool.park(a, a.id)
    pool.park(junk(1), junk(1).id)
    again = OrphanPool(store, world.ledger, max_orphans=10, max_per_author=1, max_unverified=1)
    again.load()
    assert len(again) == 2 and a.id in again and junk(1).id in again
    with pytest.raises(OrphanPoolFull, match="unverified"):
        again.park(junk(2), junk(2).id)
    a2 = waiting(world.ledger, "alice", ALICE, "a2")
    with pytest.raises(OrphanPoolFull, match="alice has 1"):
        again.park(a2, a2.id)


def test_release_order_and_what_stays_or_goes(world: World, store: Store) -> None:
    """Orphans are released depth first from what each anchoring unblocks, candidates
    of one step in id order; one still waiting stays; one a rule refuses is dropped."""
    led = world.ledger
    pool = OrphanPool(store, led)
    root = led.build_vertex("alice", ALICE, VertexKind.ROUTE, Route("root", "alice"))
    b = led.build_vertex("alice", ALICE, VertexKind.ROUTE, Route("b", "alice"),
                         parents=[root.id], counter=root.counter + 1)
    c = led.build_vertex("bob", BOB, VertexKind.ROUTE, Route("c", "bob"), parents=[root.id])
    d = led.build_vertex("alice", ALICE, VertexKind.ROUTE, Route("d", "alice"),
                         parents=[b.id], counter=root.counter + 2)
    g = led.build_vertex("bob", BOB, VertexKind.ROUTE, Route("g", "bob"),
                         parents=[c.id], counter=c.counter + 1)
    stays = led.build_vertex("gov", GOV, VertexKind.ROUTE, Route("e", "gov"),
                             parents=[root.id, os.urandom(32)])
    refused = led.build_vertex("gov", GOV, VertexKind.ROUTE, Route("f", "gov"),
                               parents=[c.id], timestamp_ms=1)  # older than its parent
    for v in (g, d, refused, stays, c, b):
        pool.park(v, v.id)
    assert len(pool) == 6
    order: list[bytes] = []

    def anchor(v: Vertex) -> AnchorReceipt:
        receipt = led.verify_and_anchor(v)  # may raise VertexParked / a Rejection
        batch = store.batch()
        pool.remove_in(batch, v.id)
        store.commit(batch)
        order.append(v.id)
        return receipt

    led.verify_and_anchor(root)
    released = pool.release(root, root.id, anchor)
    # root unblocks b and c, anchored in id order; then the work list is followed
    # depth first from the last one anchored: its child before the other's child
    child = {b.id: d.id, c.id: g.id}
    first, second = sorted([b.id, c.id])
    assert order == [first, second, child[second], child[first]]
    assert [r.id for r in released] == order
    assert refused.id not in pool and not led.has(refused.id)
    assert stays.id in pool and len(pool) == 1
    assert [k for k, _ in store.items("orphans")] == [stays.id]
