"""The ledger façade: one object that opens the store, builds, anchors and reads.

:class:`Ledger` is what every other package uses. It composes the parts that each
own one concern, and keeps only the write path that ties them together:

* :mod:`~pqcnet.qsdag.rules` — the anchoring rules, in order, as pure checks;
  :meth:`Ledger.verify_and_anchor` applies them and writes nothing unless all pass;
* :mod:`~pqcnet.qsdag.orphans` — the bounded pool of vertices waiting for their
  ancestry, released as it arrives;
* :mod:`~pqcnet.qsdag.sync` — what a peer lacks, export, import in any order;
* :mod:`~pqcnet.qsdag.audit` — ``verify()``: the replay that checks stored vertices
  without trusting the views;
* :mod:`~pqcnet.qsdag.store` / :mod:`~pqcnet.qsdag.views` — RocksDB and the views
  updated in the same atomic batch as each vertex.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pqcnet.crypto.pqc import SigningKey, VerifyKey
from pqcnet.qsdag import audit, orphans, parallel, rules, sync
from pqcnet.qsdag.errors import (
    CorruptRecord,
    InvalidPayload,
    LedgerStateError,
    MalformedVertex,
    NotFound,
    UnknownAuthor,
    VertexParked,
)
from pqcnet.qsdag.evidence import SlashingEvidence
from pqcnet.qsdag.payloads import Genesis, KeyRecord, decode_payload, encode_payload
from pqcnet.qsdag.receipts import AnchorReceipt, ImportReport, VerifyReport
from pqcnet.qsdag.slashing import SlashNotice
from pqcnet.qsdag.store import U64, VIEW_FAMILIES, VMETA, Batch, Store
from pqcnet.qsdag.vertex import (
    MAX_PARENTS,
    Vertex,
    VertexKind,
    check_node_id,
    decode,
    sign_vertex,
)
from pqcnet.qsdag.views import Views

__all__ = ["DEFAULT_SKEW", "AnchorReceipt", "ImportReport", "Ledger", "VerifyReport"]

log = logging.getLogger("pqcnet.qsdag")

#: Default allowed clock skew between authors and this ledger, seconds.
DEFAULT_SKEW = 30.0


def _key(author: str, counter: int) -> bytes:
    return author.encode() + b"\x00" + U64.pack(counter)


class Ledger:
    """A QS-DAG ledger on RocksDB. Not thread-safe: one owner drives it."""

    def __init__(self, store: Store, *, clock: Callable[[], float], max_orphans: int,
                 skew: float,
                 max_orphans_per_author: int = orphans.DEFAULT_MAX_ORPHANS_PER_AUTHOR,
                 max_unverified_orphans: int = orphans.DEFAULT_MAX_UNVERIFIED_ORPHANS,
                 verifier: parallel.ParallelVerifier | None = None) -> None:
        self._store = store
        self._verifier = verifier
        self._clock = clock
        self.skew_ms = int(skew * 1000)
        self.views = Views(store)
        self._genesis: Genesis | None = None
        self._orphans = orphans.OrphanPool(store, self, max_orphans=max_orphans,
                                           max_per_author=max_orphans_per_author,
                                           max_unverified=max_unverified_orphans)
        # Write-through caches of hot per-vertex reads (updated after each commit;
        # the store stays the source of truth on reopen).
        self._heads: dict[str, int] = {}
        self._next_position = 0
        self._load_state()

    def _load_state(self) -> None:
        """(Re)read what the ledger keeps in memory from the store: on open, and after
        a failed grouped write left the caches ahead of what was written."""
        self._heads.clear()
        self.views.forget_caches()
        raw = self._store.get("meta", b"next_position")
        self._next_position = 0 if raw is None else int(U64.unpack(raw)[0])
        gid = self._store.get("meta", b"genesis")
        self._genesis = (None if gid is None
                         else decode_payload(VertexKind.GENESIS, self.get(gid).payload))
        self._orphans.load()

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def open(cls, path: str | Path, *, clock: Callable[[], float] = time.time,
             max_orphans: int = orphans.DEFAULT_MAX_ORPHANS, skew: float = DEFAULT_SKEW,
             sync: bool = False,
             max_orphans_per_author: int = orphans.DEFAULT_MAX_ORPHANS_PER_AUTHOR,
             max_unverified_orphans: int = orphans.DEFAULT_MAX_UNVERIFIED_ORPHANS,
             verifier: parallel.ParallelVerifier | None = None) -> Ledger:
        """Open (creating if needed) the ledger at ``path``.

        ``clock`` returns seconds since the epoch; ``sync=True`` fsyncs every write.
        Orphan bounds: ``max_orphans`` in all, ``max_orphans_per_author`` per author
        whose signature could be checked, ``max_unverified_orphans`` (at most half of
        ``max_orphans``) for vertices whose key is not known yet.
        ``verifier`` (the switch; None = serial): a
        :class:`~pqcnet.qsdag.parallel.ParallelVerifier` that :meth:`import_` and
        :meth:`verify` use to check signatures on other cores. The caller owns it.
        """
        return cls(Store(path, sync=sync), clock=clock, max_orphans=max_orphans, skew=skew,
                   max_orphans_per_author=max_orphans_per_author,
                   max_unverified_orphans=max_unverified_orphans, verifier=verifier)

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def network(self) -> str | None:
        return self._genesis.network if self._genesis else None

    @property
    def genesis(self) -> Genesis | None:
        """The anchored genesis payload (None before :meth:`init_genesis`)."""
        return self._genesis

    @property
    def genesis_id(self) -> bytes | None:
        return self._store.get("meta", b"genesis")

    def is_authority(self, node: str) -> bool:
        """Is ``node`` one of the genesis registrar authorities?"""
        return self._genesis is not None and any(
            a.node_id == node for a in self._genesis.authorities)

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    @property
    def max_orphans(self) -> int:
        return self._orphans.max_orphans

    @property
    def max_orphans_per_author(self) -> int:
        return self._orphans.max_per_author

    @property
    def max_unverified_orphans(self) -> int:
        return self._orphans.max_unverified

    # ------------------------------------------------------------------ building

    def init_genesis(self, network: str, authority: str, signer: SigningKey, *,
                     open_enrolment: bool = False,
                     other_authorities: Iterable[KeyRecord] = ()) -> AnchorReceipt:
        """Create the genesis vertex, signed by ``authority`` (a registrar)."""
        check_node_id(authority, "authority")
        if self._genesis is not None:
            raise LedgerStateError(f"ledger already initialised for {self.network!r}")
        me = KeyRecord(authority, 1, signer.algorithm, signer.public_key.raw)
        payload = Genesis(network, (me, *other_authorities), open_enrolment)
        v = sign_vertex(signer, kind=VertexKind.GENESIS, author=authority, counter=0,
                        timestamp_ms=self.now_ms(), key_version=1, parents=(),
                        payload=encode_payload(payload))
        return self.verify_and_anchor(v)

    def next_counter(self, author: str) -> int:
        check_node_id(author, "author")
        return self._next_counter(author)

    def _next_counter(self, author: str) -> int:
        last = self._heads.get(author)
        if last is None:
            raw = self._store.get("heads", author.encode())
            if raw is None:
                return 0
            last = self._heads[author] = int(U64.unpack(raw)[0])
        return last + 1

    def build_vertex(self, author: str, signer: SigningKey, kind: VertexKind,
                     payload: Any, *, key_version: int | None = None,
                     parents: Iterable[bytes] | None = None,
                     timestamp_ms: int | None = None, counter: int | None = None) -> Vertex:
        """Sign a vertex by ``author`` on the current tips with the author's next counter.

        ``payload`` is a payload dataclass (see :mod:`pqcnet.qsdag.payloads`) or its bytes.
        """
        check_node_id(author, "author")
        if self._genesis is None:
            raise LedgerStateError("ledger has no genesis; run init_genesis first")
        if parents is None:
            parents = self._pick_parents()
        version = key_version or self.views.key_versions.current(author) or 1
        return sign_vertex(
            signer, kind=VertexKind(kind), author=author,
            counter=self.next_counter(author) if counter is None else counter,
            timestamp_ms=self.now_ms() if timestamp_ms is None else timestamp_ms,
            key_version=version, parents=tuple(parents), payload=encode_payload(payload),
        )

    def _pick_parents(self) -> list[bytes]:
        tips = self.tips()
        if len(tips) <= MAX_PARENTS:
            return tips
        tips.sort(key=lambda t: self._meta(t)[1], reverse=True)
        return tips[:MAX_PARENTS]

    def append(self, kind: VertexKind, payload: Any, author: str,
               signer: SigningKey) -> AnchorReceipt:
        """Build, sign and anchor one vertex."""
        return self.verify_and_anchor(self.build_vertex(author, signer, kind, payload))

    def register_author(self, node_id: str, verify_key: VerifyKey, key_version: int | None = None,
                        *, registrar: str, signer: SigningKey) -> AnchorReceipt:
        """A genesis authority registers (or rotates) ``node_id``'s key as a KEY_VERSION vertex."""
        check_node_id(node_id)
        check_node_id(registrar, "registrar")
        version = key_version or (self.views.key_versions.current(node_id) or 0) + 1
        rec = KeyRecord(node_id, version, verify_key.algorithm, verify_key.raw)
        return self.append(VertexKind.KEY_VERSION, rec, registrar, signer)

    def rotate_key(self, node_id: str, old_signer: SigningKey,
                   new_key: VerifyKey) -> AnchorReceipt:
        """The node announces its next key version, signed with its current key."""
        check_node_id(node_id)
        version = (self.views.key_versions.current(node_id) or 0) + 1
        rec = KeyRecord(node_id, version, new_key.algorithm, new_key.raw)
        return self.append(VertexKind.KEY_VERSION, rec, node_id, old_signer)

    def enrol(self, node_id: str, signer: SigningKey) -> AnchorReceipt:
        """Self-register a first key (only when genesis allows open enrolment)."""
        check_node_id(node_id)
        rec = KeyRecord(node_id, 1, signer.algorithm, signer.public_key.raw)
        v = self.build_vertex(node_id, signer, VertexKind.KEY_VERSION, rec, key_version=1)
        return self.verify_and_anchor(v)

    def report_evidence(self, evidence: SlashingEvidence, reporter: str,
                        signer: SigningKey) -> AnchorReceipt:
        """Anchor slashing evidence as a SLASHING_EVIDENCE vertex signed by ``reporter``."""
        return self.append(VertexKind.SLASHING_EVIDENCE, evidence, reporter, signer)

    def slash(self, target: str, reason: str, authority: str,
              signer: SigningKey) -> AnchorReceipt:
        """A registrar ``authority`` disables ``target``'s current key version.

        Anchored as a GOVERNANCE_DIRECTIVE vertex (content type
        :data:`~pqcnet.qsdag.slashing.SLASH_CONTENT_TYPE`). From then on every vertex of
        ``target`` that descends from it is refused with :class:`AuthorSlashed`
        until a registrar registers a new key for ``target`` and ``target``
        re-attests with it (see :mod:`pqcnet.qsdag.slashing` for the exact rule).
        """
        check_node_id(target, "slash target")
        check_node_id(authority, "authority")
        version = self.views.key_versions.current(target)
        if version is None:
            raise UnknownAuthor(f"cannot slash {target!r}: no key registered")
        if not self.is_authority(authority):
            raise InvalidPayload(f"{authority} is not a registrar authority; only genesis "
                                 "authorities may slash")
        notice = SlashNotice(target, reason, version)
        return self.append(VertexKind.GOVERNANCE_DIRECTIVE, notice.to_record(), authority,
                           signer)

    def is_slashed(self, node_id: str) -> bool:
        """True while an anchored slash of ``node_id`` has not been lifted."""
        return self.views.slashes.is_slashed(node_id)

    # ------------------------------------------------------------------ reading

    def has(self, vid: bytes) -> bool:
        # vmeta is written in the same batch as the vertex and is 24 bytes, not ~3 KiB
        return self._store.has("vmeta", vid)

    def get(self, vid: bytes) -> Vertex:
        """The anchored vertex ``vid``; :class:`NotFound`, or :class:`CorruptRecord` if damaged."""
        raw = self._store.get("vertices", vid)
        if raw is None:
            raise NotFound(f"no vertex {vid.hex()}")
        try:
            v = decode(raw)
        except MalformedVertex as exc:
            raise CorruptRecord(f"stored vertex {vid.hex()} does not decode: {exc}") from None
        if v.id != vid:
            raise CorruptRecord(f"stored vertex under {vid.hex()} has id {v.id.hex()}")
        return v

    def receipt(self, vid: bytes) -> AnchorReceipt:
        depth, position, _ = self._meta(vid)
        return AnchorReceipt(vid, depth, position)

    def _meta(self, vid: bytes, batch: Batch | None = None) -> tuple[int, int, int]:
        if batch is not None and ("vmeta", vid) in batch.pending:
            raw = batch.pending[("vmeta", vid)]
        else:
            raw = self._store.get("vmeta", vid)
        if raw is None:
            raise NotFound(f"no vertex {vid.hex()}")
        d, p, t = VMETA.unpack(raw)
        return int(d), int(p), int(t)

    def payload(self, vid: bytes) -> Any:
        """The decoded payload dataclass of an anchored vertex."""
        v = self.get(vid)
        return decode_payload(v.kind, v.payload)

    def tips(self) -> list[bytes]:
        return list(self._store.keys("tips"))

    def children(self, vid: bytes) -> list[bytes]:
        return [k[32:] for k in self._store.keys("children", vid)]

    def by_author(self, author: str, counter: int) -> bytes | None:
        check_node_id(author, "author")
        return self._store.get("by_author", _key(author, counter))

    def __len__(self) -> int:
        return self._next_position

    def ids(self) -> list[bytes]:
        """Every anchored id, in anchoring order."""
        return [v for _, v in self._store.items("positions")]

    def ids_range(self, start: int, stop: int) -> list[bytes]:
        """Ids anchored at positions ``start <= p < stop`` (what Layer-0 batches)."""
        out = []
        for key, vid in self._store.items("positions", start=U64.pack(start)):
            if U64.unpack(key)[0] >= stop:
                break
            out.append(vid)
        return out

    def evidence(self) -> list[SlashingEvidence]:
        from pqcnet.proto import qsdag_pb2

        out = []
        for _, raw in self._store.items("evidence"):
            msg = qsdag_pb2.SlashingEvidence()
            msg.ParseFromString(raw)
            out.append(SlashingEvidence.from_proto(msg))
        return out

    def key_for(self, node: str, version: int) -> VerifyKey | None:
        return self.views.key_versions.key(node, version)

    @property
    def orphan_count(self) -> int:
        return len(self._orphans)

    def is_parked(self, vid: bytes) -> bool:
        """Is ``vid`` waiting in the orphan pool?"""
        return vid in self._orphans

    # ------------------------------------------------------------------ anchoring

    def verify_and_anchor(self, v: Vertex) -> AnchorReceipt:
        """Verify ``v`` and anchor it (the rules: :mod:`pqcnet.qsdag.rules`).

        Returns the receipt (idempotent for an already anchored vertex). Raises a
        :class:`Rejection` subclass, or :class:`VertexParked` when it must wait.
        """
        receipt = self._anchor_one(v)
        released = self._orphans.release(v, receipt.id, self._anchor_one)
        if released:
            return AnchorReceipt(receipt.id, receipt.depth, receipt.position, tuple(released))
        return receipt

    def _anchor_one(self, v: Vertex) -> AnchorReceipt:
        """The rules of :mod:`pqcnet.qsdag.rules`, in their order (numbered as there),
        then the write."""
        vid = v.id  # 1: an unencodable vertex raises MalformedVertex here
        if self.has(vid):
            return self.receipt(vid)
        try:
            payload = decode_payload(v.kind, v.payload)
        except InvalidPayload as exc:
            exc.vertex_id = vid
            raise
        rules.check_not_future(v, vid, now_ms=self.now_ms(), skew_ms=self.skew_ms)  # 2
        if v.kind == VertexKind.GENESIS:
            return self._anchor_genesis(v, vid, payload)
        next_counter = self._next_counter(v.author)
        if v.counter < next_counter:  # 3
            refusal = rules.equivocation(self, v, vid, next_counter)
            self._store_evidence(refusal.evidence)
            log.warning("equivocation", extra={"author": v.author, "counter": v.counter})
            raise refusal
        raw_metas = [self._store.get("vmeta", p) for p in v.parents]
        missing = tuple(p for p, m in zip(v.parents, raw_metas, strict=True) if m is None)
        if missing or v.counter > next_counter:  # 4
            self._orphans.park(v, vid)
            raise VertexParked(
                f"vertex {vid.hex()[:16]} waits for {len(missing)} parents"
                + (f" and counters {next_counter}..{v.counter - 1}"
                   if v.counter > next_counter else ""),
                vertex_id=vid, missing_parents=missing,
                waiting_counter=next_counter if v.counter > next_counter else None)
        rules.check_not_slashed(self, v, vid)  # 5
        rules.check_author(self, v, vid, payload)  # 6
        metas = [VMETA.unpack(m) for m in raw_metas if m is not None]
        rules.check_causality(v, vid, (m[2] for m in metas), skew_ms=self.skew_ms)  # 7
        rules.check_kind(self, v, vid, payload)  # 8
        return self._write(self._store.batch(), v, vid, payload, 1 + max(m[0] for m in metas))

    def _anchor_genesis(self, v: Vertex, vid: bytes, payload: Genesis) -> AnchorReceipt:
        rules.check_genesis(self, v, vid, payload)
        batch = self._store.batch()
        batch.put("meta", b"genesis", vid)
        receipt = self._write(batch, v, vid, payload, 0)
        self._genesis = payload
        return receipt

    def _write(self, batch: Batch, v: Vertex, vid: bytes, payload: object,
               depth: int) -> AnchorReceipt:
        position = self._next_position
        batch.put("vertices", vid, v.encode())
        batch.put("vmeta", vid, VMETA.pack(depth, position, v.timestamp_ms))
        batch.put("positions", U64.pack(position), vid)
        batch.put("meta", b"next_position", U64.pack(position + 1))
        for p in v.parents:
            batch.put("children", p + vid, b"")
            batch.delete("tips", p)
        batch.put("tips", vid, b"")
        batch.put("heads", v.author.encode(), U64.pack(v.counter))
        batch.put("by_author", _key(v.author, v.counter), vid)
        self._orphans.remove_in(batch, vid)
        if isinstance(payload, SlashingEvidence):
            batch.put("evidence", payload.digest,
                      payload.to_proto().SerializeToString(deterministic=True))
        self.views.apply(batch, v, vid, payload)
        self._store.commit(batch)
        self._next_position = position + 1
        self._heads[v.author] = v.counter
        return AnchorReceipt(vid, depth, position)

    def _store_evidence(self, ev: SlashingEvidence) -> None:
        batch = self._store.batch()
        batch.put("evidence", ev.digest, ev.to_proto().SerializeToString(deterministic=True))
        self._store.commit(batch)

    # ------------------------------------------------------------------ sync

    def missing(self, have_ids: Iterable[bytes]) -> list[bytes]:
        """Of ``have_ids`` (e.g. a peer's tips), those this ledger has not anchored."""
        return sync.missing(self, have_ids)

    def ancestors(self, ids: Iterable[bytes], *, stop: set[bytes] | None = None) -> set[bytes]:
        """``ids`` and all their anchored ancestors, not descending below ``stop``."""
        return sync.ancestors(self, ids, stop=stop)

    def export(self, ids: Iterable[bytes], *, ancestors: bool = True,
               known_tips: Iterable[bytes] = ()) -> list[Vertex]:
        """Vertices for ``ids`` (and, by default, their ancestors that a peer whose
        tips are ``known_tips`` lacks), in this ledger's anchoring order
        (:func:`pqcnet.qsdag.sync.export`)."""
        return sync.export(self, ids, ancestors=ancestors, known_tips=known_tips)

    def lacking(self, ids: Iterable[bytes], known: Iterable[bytes]) -> set[bytes]:
        """``ancestors(ids) - ancestors(known)`` without walking either to genesis
        (:func:`pqcnet.qsdag.sync.lacking`)."""
        return sync.lacking(self, ids, known)

    def import_(self, vertices: Iterable[Vertex | bytes]) -> ImportReport:
        """Verify and anchor vertices from a peer, in any order
        (:func:`pqcnet.qsdag.sync.import_`); with a verifier, signatures are checked
        on other cores ahead of the (still sequential) anchoring.

        Writes are grouped (:meth:`Store.grouped <pqcnet.qsdag.store.Store.grouped>`):
        everything reported anchored is written when this returns (or raises); a
        process killed during the call leaves a prefix of its anchoring order, each
        vertex complete or absent. If a grouped write fails, the ledger re-reads its
        state from the store and the :class:`LedgerStateError` propagates.
        """
        try:
            with self._store.grouped():
                if self._verifier is None:
                    return sync.import_(self, vertices)
                with self._verifier.ahead(vertices, parallel.prepare_import,
                                          self.key_for) as stream:
                    return sync.import_(self, stream)
        except LedgerStateError:
            self._load_state()
            raise

    # ------------------------------------------------------------------ audit

    def verify(self, progress: Callable[[int], None] | None = None) -> VerifyReport:
        """Re-check every stored vertex in anchoring order; report every invalid one
        (:mod:`pqcnet.qsdag.audit`: replays keys and slashes, not the views; with a
        verifier, signatures are checked on other cores ahead of the replay)."""
        return audit.audit(self._store, self.get, progress, self._verifier)

    # ------------------------------------------------------------------ views

    def rebuild_views(self, progress: Callable[[int], None] | None = None) -> int:
        """Wipe all views and replay every vertex into them; returns vertices replayed."""
        for cf in VIEW_FAMILIES:
            self._store.clear(cf)
        self.views.forget_caches()
        n = 0
        for vid in self.ids():
            v = self.get(vid)
            batch = self._store.batch()
            self.views.apply(batch, v, vid, decode_payload(v.kind, v.payload))
            self._store.commit(batch)
            n += 1
            if progress:
                progress(1)
        return n
