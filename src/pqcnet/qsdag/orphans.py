"""The orphan pool: vertices that wait for missing parents or earlier counters.

Why a pool at all: peers send vertices in any order, and a vertex whose ancestry
has not arrived yet cannot be checked against the rules that need it. Dropping it
would make sync depend on arrival order; so it is *parked* here (persisted in the
``orphans`` column family, so a restart keeps it) and anchored as soon as what it
waits for is anchored (:meth:`OrphanPool.release`).

Why three bounds: orphans cost memory and disk until their ancestry arrives, and
anyone can send unanchorable vertices. A vertex whose key is known (anchored, or
registered by a *verified* parked KEY_VERSION — a registrar's or the node's own
rotation) has its signature checked before it is parked and counts against its
author's quota (``max_per_author``); any other vertex goes to a small sub-pool of
its own (``max_unverified``, at most half of ``max_orphans``). So junk from unknown
authors takes at most ``max_unverified`` slots and never denies parking to a known
author's out-of-order vertex; an author that floods us fills its own quota only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol, TypeVar

from pqcnet.crypto.errors import CryptoError
from pqcnet.crypto.pqc import VerifyKey
from pqcnet.qsdag.errors import (
    InvalidPayload,
    MalformedVertex,
    OrphanPoolFull,
    Rejection,
    VertexParked,
)
from pqcnet.qsdag.payloads import decode_payload
from pqcnet.qsdag.rules import verify_signature
from pqcnet.qsdag.store import Batch, Store
from pqcnet.qsdag.vertex import Vertex, VertexKind, decode

log = logging.getLogger("pqcnet.qsdag")

#: Default bound on parked vertices: orphans cost memory and disk until their
#: ancestry arrives, and a peer could otherwise flood us with unanchorable vertices.
DEFAULT_MAX_ORPHANS = 10_000
#: Default bound on parked vertices of one (verified) author: an author that floods
#: us with out-of-order vertices fills its own quota, not everybody's pool.
DEFAULT_MAX_ORPHANS_PER_AUTHOR = 1024
#: Default bound on parked vertices whose signature cannot be checked yet (no key
#: anchored or vouched for by a parked KEY_VERSION): anyone can make such junk, so
#: it gets a small sub-pool of its own (also capped at half of ``max_orphans``).
DEFAULT_MAX_UNVERIFIED_ORPHANS = 256

R = TypeVar("R")


class AnchoredKeys(Protocol):
    """What the pool reads from the ledger it parks for (a :class:`Ledger` is one)."""

    def has(self, vid: bytes) -> bool: ...

    def key_for(self, node: str, version: int) -> VerifyKey | None: ...

    def is_authority(self, node: str) -> bool: ...


class OrphanPool:
    """Parked vertices, the indexes of what each waits for, and their bounds."""

    def __init__(self, store: Store, ledger: AnchoredKeys, *,
                 max_orphans: int = DEFAULT_MAX_ORPHANS,
                 max_per_author: int = DEFAULT_MAX_ORPHANS_PER_AUTHOR,
                 max_unverified: int = DEFAULT_MAX_UNVERIFIED_ORPHANS) -> None:
        self._store = store
        self._ledger = ledger
        self.max_orphans = max_orphans
        self.max_per_author = max_per_author
        self.max_unverified = min(max_unverified, max_orphans // 2)
        self._orphans: dict[bytes, Vertex] = {}
        #: missing parent id -> parked vertices naming it
        self._wait_parent: dict[bytes, set[bytes]] = {}
        #: (author, counter) -> parked vertices with that counter
        self._wait_counter: dict[tuple[str, int], set[bytes]] = {}
        #: parked vertices per author whose signature was checked
        self._by_author: dict[str, int] = {}
        #: parked vertices whose signature could not be checked yet
        self._unverified: set[bytes] = set()
        #: keys registered by *verified* parked KEY_VERSION vertices (a registrar's, or
        #: the node's own rotation): lets a node's parked vertices be checked too
        self._parked_keys: dict[tuple[str, int], tuple[bytes, VerifyKey]] = {}

    def __len__(self) -> int:
        return len(self._orphans)

    def __contains__(self, vid: object) -> bool:
        return vid in self._orphans

    def load(self) -> None:
        """Index the persisted orphans (after the ledger knows its genesis).

        They were checked when parked; classify them again without crypto: verified
        iff a key for them is anchored or vouched for by a verified orphan. Anything
        indexed before is forgotten first (a reload after a failed write).
        """
        for index in (self._orphans, self._wait_parent, self._wait_counter,
                      self._by_author, self._unverified, self._parked_keys):
            index.clear()
        pending: dict[bytes, Vertex] = {}
        for oid, raw in self._store.items("orphans"):
            try:
                pending[oid] = decode(raw)
            except MalformedVertex:
                continue
        progress = True
        while progress:
            progress = False
            for oid, v in list(pending.items()):
                if self._key_for(v) is not None:
                    self._index(oid, v, verified=True)
                    del pending[oid]
                    progress = True
        for oid, v in pending.items():
            self._index(oid, v, verified=False)

    def park(self, v: Vertex, vid: bytes) -> None:
        """Park ``v`` under the bounds (see the module docstring); a no-op if parked.

        Raises :class:`BadSignature` for a vertex whose known key did not sign it and
        :class:`OrphanPoolFull` when its share of the pool is full.
        """
        if vid in self._orphans:
            return
        key = self._key_for(v)
        if key is not None:
            verify_signature(key, v, vid)
        if len(self._orphans) >= self.max_orphans:
            raise OrphanPoolFull(f"orphan pool full ({self.max_orphans}); vertex "
                                 f"{vid.hex()[:16]} not kept", vertex_id=vid)
        if key is None and len(self._unverified) >= self.max_unverified:
            raise OrphanPoolFull(f"no key for {v.author!r} v{v.key_version} and the unverified "
                                 f"orphan pool is full ({self.max_unverified})",
                                 vertex_id=vid)
        if key is not None and self._by_author.get(v.author, 0) >= self.max_per_author:
            raise OrphanPoolFull(f"{v.author} has {self.max_per_author} parked "
                                 "vertices already", vertex_id=vid)
        batch = self._store.batch()
        batch.put("orphans", vid, v.encode())
        self._store.commit(batch)
        self._index(vid, v, verified=key is not None)

    def remove_in(self, batch: Batch, vid: bytes) -> None:
        """Being anchored in ``batch``: leave the pool when (and only if) it commits."""
        if vid in self._orphans:
            batch.delete("orphans", vid)
            batch.after_commit(lambda: self._unindex(vid))

    def release(self, first: Vertex, first_id: bytes, anchor: Callable[[Vertex], R]) -> list[R]:
        """Anchor, with ``anchor``, every orphan that the newly anchored ``first`` (and
        what it releases in turn) unblocks; returns what ``anchor`` returned, in order.

        Candidates of one step go in id order, so every replica releases the same way.
        One still waiting (``anchor`` raises :class:`VertexParked`) stays; one refused
        by a rule is dropped from the pool and logged.
        """
        released: list[R] = []
        if not self._orphans:  # the common case: nothing waits for anything
            return released
        work = [(first.author, first.counter, first_id)]
        while work:
            author, counter, vid = work.pop()
            candidates = set(self._wait_parent.get(vid, ())) | set(
                self._wait_counter.get((author, counter + 1), ()))
            for oid in sorted(candidates):
                orphan = self._orphans.get(oid)
                if orphan is None:
                    continue
                try:
                    result = anchor(orphan)
                except VertexParked:
                    continue
                except Rejection as exc:
                    log.info("orphan rejected", extra={"vertex": oid.hex(), "reason": str(exc)})
                    self._drop(oid)
                    continue
                released.append(result)
                work.append((orphan.author, orphan.counter, oid))
        return released

    # ------------------------------------------------------------------ internals

    def _key_for(self, v: Vertex) -> VerifyKey | None:
        key = self._ledger.key_for(v.author, v.key_version)
        if key is None and (v.author, v.key_version) in self._parked_keys:
            key = self._parked_keys[(v.author, v.key_version)][1]
        return key

    def _index(self, vid: bytes, v: Vertex, *, verified: bool) -> None:
        self._orphans[vid] = v
        for p in v.parents:
            if not self._ledger.has(p):
                self._wait_parent.setdefault(p, set()).add(vid)
        self._wait_counter.setdefault((v.author, v.counter), set()).add(vid)
        if not verified:
            self._unverified.add(vid)
            return
        self._by_author[v.author] = self._by_author.get(v.author, 0) + 1
        if v.kind != VertexKind.KEY_VERSION:
            return
        try:
            rec = decode_payload(v.kind, v.payload)
            if rec.node_id == v.author or self._ledger.is_authority(v.author):
                key = VerifyKey.from_raw(rec.algorithm, rec.public_key)
                self._parked_keys[(rec.node_id, rec.key_version)] = (vid, key)
        except (InvalidPayload, CryptoError):
            pass

    def _unindex(self, vid: bytes) -> None:
        v = self._orphans.pop(vid, None)
        if v is None:
            return
        if vid in self._unverified:
            self._unverified.discard(vid)
        else:
            left = self._by_author.get(v.author, 1) - 1
            if left:
                self._by_author[v.author] = left
            else:
                self._by_author.pop(v.author, None)
            for k in [k for k, (kv, _) in self._parked_keys.items() if kv == vid]:
                del self._parked_keys[k]
        for p in v.parents:
            waiting = self._wait_parent.get(p)
            if waiting is not None:
                waiting.discard(vid)
                if not waiting:
                    del self._wait_parent[p]
        waiting = self._wait_counter.get((v.author, v.counter))
        if waiting is not None:
            waiting.discard(vid)
            if not waiting:
                del self._wait_counter[(v.author, v.counter)]

    def _drop(self, vid: bytes) -> None:
        batch = self._store.batch()
        batch.delete("orphans", vid)
        self._store.commit(batch)
        self._unindex(vid)
