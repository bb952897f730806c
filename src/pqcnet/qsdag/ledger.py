"""The ledger: ``verify_and_anchor`` and everything around it.

Rules a vertex must pass to be anchored (in this order; the first failure is the
typed :class:`~pqcnet.qsdag.errors.Rejection` raised, and nothing is written):

1. well-formed (:mod:`pqcnet.qsdag.vertex` bounds), payload valid for its kind;
2. timestamp not more than ``skew`` seconds in the future of the ledger clock;
3. an author counter below the author's next one that names a *different* vertex
   is equivocation → :class:`Equivocation` with :class:`SlashingEvidence`
   (stored, and anchorable by anyone with :meth:`Ledger.report_evidence`);
4. missing parents or a counter gap (counter above the next one) → the vertex is
   parked as an orphan (bounded by ``max_orphans``) and :class:`VertexParked` is
   raised; it is anchored automatically once what it waits for arrives;
5. author registered (genesis authority, KEY_VERSION vertex, or open self-enrolment),
   ``key_version`` equal to the author's version in force, ML-DSA signature valid;
6. timestamp not earlier than its latest parent minus ``skew`` (causality);
7. kind-specific rules needing ledger state (key registration rights, attestation
   signature and increasing counter, slashing evidence that verifies, slash notices
   only from genesis authorities).

Between 4 and 5, an author disabled by a slash in the vertex's ancestry is refused
with :class:`AuthorSlashed` (ordering by DAG ancestry; see :mod:`pqcnet.qsdag.slashing`).

Because every author's counter must be exactly its next one, each author's vertices
are anchored in one order on every ledger, so "key version in force" is the same
everywhere — that is what makes sync deterministic.
"""

from __future__ import annotations

import heapq
import logging
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pqcnet.crypto.errors import CryptoError, SignatureInvalid
from pqcnet.crypto.pqc import SigningKey, VerifyKey
from pqcnet.qsdag.attestation import AttestationEvent, check_signature
from pqcnet.qsdag.errors import (
    AttestationRejected,
    AuthorSlashed,
    BadSignature,
    CorruptRecord,
    Equivocation,
    InvalidEvidence,
    InvalidPayload,
    KeyVersionMismatch,
    LedgerError,
    LedgerStateError,
    MalformedVertex,
    NotFound,
    OrphanPoolFull,
    Rejection,
    TimestampSkew,
    UnknownAuthor,
    VertexParked,
)
from pqcnet.qsdag.evidence import SlashingEvidence, verify_evidence
from pqcnet.qsdag.payloads import Genesis, KeyRecord, decode_payload, encode_payload
from pqcnet.qsdag.slashing import SlashAudit, SlashNotice, slash_notice
from pqcnet.qsdag.store import VIEW_FAMILIES, Batch, Store
from pqcnet.qsdag.vertex import (
    DOMAIN,
    MAX_PARENTS,
    Vertex,
    VertexKind,
    check_node_id,
    decode,
    sign_vertex,
)
from pqcnet.qsdag.views import Views

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
#: Default allowed clock skew between authors and this ledger, seconds.
DEFAULT_SKEW = 30.0
_Q = struct.Struct(">Q")
_META = struct.Struct(">QQQ")


@dataclass(frozen=True, slots=True)
class AnchorReceipt:
    """Proof of anchoring in *this* ledger."""

    #: vertex id (SHA3-256 of its canonical encoding)
    id: bytes
    #: longest path from genesis (genesis: 0)
    depth: int
    #: anchoring order in this ledger (genesis: 0); differs between ledgers
    position: int
    #: orphans that this vertex released and that were anchored with it
    released: tuple[AnchorReceipt, ...] = ()


@dataclass(slots=True)
class ImportReport:
    """Outcome of :meth:`Ledger.import_`."""

    anchored: list[bytes] = field(default_factory=list)
    duplicates: list[bytes] = field(default_factory=list)
    parked: list[bytes] = field(default_factory=list)
    rejected: list[tuple[bytes | None, Rejection]] = field(default_factory=list)


@dataclass(slots=True)
class VerifyReport:
    """Outcome of :meth:`Ledger.verify`: every invalid vertex with its reason."""

    checked: int = 0
    invalid: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.invalid


def _key(author: str, counter: int) -> bytes:
    return author.encode() + b"\x00" + _Q.pack(counter)


class Ledger:
    """A QS-DAG ledger on RocksDB. Not thread-safe: one owner drives it."""

    def __init__(self, store: Store, *, clock: Callable[[], float], max_orphans: int,
                 skew: float, max_orphans_per_author: int = DEFAULT_MAX_ORPHANS_PER_AUTHOR,
                 max_unverified_orphans: int = DEFAULT_MAX_UNVERIFIED_ORPHANS) -> None:
        self._store = store
        self._clock = clock
        self.max_orphans = max_orphans
        self.max_orphans_per_author = max_orphans_per_author
        self.max_unverified_orphans = min(max_unverified_orphans, max_orphans // 2)
        self.skew_ms = int(skew * 1000)
        self.views = Views(store)
        self._genesis: Genesis | None = None
        self._orphans: dict[bytes, Vertex] = {}
        self._wait_parent: dict[bytes, set[bytes]] = {}
        self._wait_counter: dict[tuple[str, int], set[bytes]] = {}
        #: parked vertices per author whose signature was checked
        self._orphans_by_author: dict[str, int] = {}
        #: parked vertices whose signature could not be checked yet
        self._unverified: set[bytes] = set()
        #: keys registered by *verified* parked KEY_VERSION vertices (a registrar's, or
        #: the node's own rotation): lets a node's parked vertices be checked too
        self._parked_keys: dict[tuple[str, int], tuple[bytes, VerifyKey]] = {}
        # Write-through caches of hot per-vertex reads (updated after each commit;
        # the store stays the source of truth on reopen).
        self._heads: dict[str, int] = {}
        raw = self._store.get("meta", b"next_position")
        self._next_position = 0 if raw is None else int(_Q.unpack(raw)[0])
        self._load()

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def open(cls, path: str | Path, *, clock: Callable[[], float] = time.time,
             max_orphans: int = DEFAULT_MAX_ORPHANS, skew: float = DEFAULT_SKEW,
             sync: bool = False,
             max_orphans_per_author: int = DEFAULT_MAX_ORPHANS_PER_AUTHOR,
             max_unverified_orphans: int = DEFAULT_MAX_UNVERIFIED_ORPHANS) -> Ledger:
        """Open (creating if needed) the ledger at ``path``.

        ``clock`` returns seconds since the epoch; ``sync=True`` fsyncs every write.
        Orphan bounds: ``max_orphans`` in all, ``max_orphans_per_author`` per author
        whose signature could be checked, ``max_unverified_orphans`` (at most half of
        ``max_orphans``) for vertices whose key is not known yet.
        """
        return cls(Store(path, sync=sync), clock=clock, max_orphans=max_orphans, skew=skew,
                   max_orphans_per_author=max_orphans_per_author,
                   max_unverified_orphans=max_unverified_orphans)

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _load(self) -> None:
        gid = self._store.get("meta", b"genesis")
        if gid is not None:
            self._genesis = decode_payload(VertexKind.GENESIS, self.get(gid).payload)
        # Orphans were checked when parked; classify them again without crypto:
        # verified iff a key for them is anchored or vouched for by a verified orphan.
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
                if self._key_for_orphan(v) is not None:
                    self._index_orphan(oid, v, verified=True)
                    del pending[oid]
                    progress = True
        for oid, v in pending.items():
            self._index_orphan(oid, v, verified=False)

    @property
    def network(self) -> str | None:
        return self._genesis.network if self._genesis else None

    @property
    def genesis_id(self) -> bytes | None:
        return self._store.get("meta", b"genesis")

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

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
            last = self._heads[author] = int(_Q.unpack(raw)[0])
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
        if not self._is_authority(authority):
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
        d, p, t = _META.unpack(raw)
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
        for key, vid in self._store.items("positions", start=_Q.pack(start)):
            if _Q.unpack(key)[0] >= stop:
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

    # ------------------------------------------------------------------ anchoring

    def verify_and_anchor(self, v: Vertex) -> AnchorReceipt:
        """Verify ``v`` and anchor it (see the module docstring for the rules).

        Returns the receipt (idempotent for an already anchored vertex). Raises a
        :class:`Rejection` subclass, or :class:`VertexParked` when it must wait.
        """
        receipt = self._anchor_one(v)
        released = self._release(v, receipt.id)
        if released:
            return AnchorReceipt(receipt.id, receipt.depth, receipt.position, tuple(released))
        return receipt

    def _anchor_one(self, v: Vertex) -> AnchorReceipt:
        try:
            vid = v.id
        except MalformedVertex:
            raise
        if self.has(vid):
            return self.receipt(vid)
        try:
            payload = decode_payload(v.kind, v.payload)
        except InvalidPayload as exc:
            exc.vertex_id = vid
            raise
        if v.timestamp_ms > self.now_ms() + self.skew_ms:
            raise TimestampSkew(f"vertex {vid.hex()[:16]} is {v.timestamp_ms - self.now_ms()} ms "
                                "in the future", vertex_id=vid)
        if v.kind == VertexKind.GENESIS:
            return self._anchor_genesis(v, vid, payload)
        next_counter = self._next_counter(v.author)
        if v.counter < next_counter:
            existing = self.by_author(v.author, v.counter)
            self._check_signature(v, vid, history=True)
            assert existing is not None and existing != vid
            ev = SlashingEvidence.of(self.get(existing), v,
                                     "equivocation" if v.counter == next_counter - 1
                                     else "counter went backwards")
            self._store_evidence(ev)
            log.warning("equivocation", extra={"author": v.author, "counter": v.counter})
            raise Equivocation(f"{v.author} signed two vertices with counter {v.counter}",
                               vertex_id=vid, evidence=ev)
        raw_metas = [self._store.get("vmeta", p) for p in v.parents]
        missing = tuple(p for p, m in zip(v.parents, raw_metas, strict=True) if m is None)
        if missing or v.counter > next_counter:
            self._park(v, vid)
            raise VertexParked(
                f"vertex {vid.hex()[:16]} waits for {len(missing)} parents"
                + (f" and counters {next_counter}..{v.counter - 1}"
                   if v.counter > next_counter else ""),
                vertex_id=vid, missing_parents=missing,
                waiting_counter=next_counter if v.counter > next_counter else None)
        self._check_slashed(v, vid)
        self._check_author(v, vid, payload)
        metas = [_META.unpack(m) for m in raw_metas if m is not None]
        if v.timestamp_ms + self.skew_ms < max(m[2] for m in metas):
            raise TimestampSkew(f"vertex {vid.hex()[:16]} is older than its parents",
                                vertex_id=vid)
        batch = self._store.batch()
        self._check_kind(v, vid, payload, batch)
        return self._write(batch, v, vid, payload, 1 + max(m[0] for m in metas))

    def _anchor_genesis(self, v: Vertex, vid: bytes, payload: Genesis) -> AnchorReceipt:
        if self._genesis is not None:
            raise MalformedVertex("ledger already has a different genesis", vertex_id=vid)
        auth = next((a for a in payload.authorities if a.node_id == v.author), None)
        if auth is None or auth.key_version != v.key_version:
            raise UnknownAuthor("genesis must be signed by one of its authorities", vertex_id=vid)
        self._verify_with(_verify_key(auth, vid), v, vid)
        batch = self._store.batch()
        batch.put("meta", b"genesis", vid)
        receipt = self._write(batch, v, vid, payload, 0)
        self._genesis = payload
        return receipt

    def _check_slashed(self, v: Vertex, vid: bytes) -> None:
        slashes = self.views.slashes
        if not slashes.active():
            return
        may_lift = (v.kind == VertexKind.ATTESTATION
                    and self._registered_by_authority(v.author, v.key_version))
        blocking = slashes.blocking(v, may_lift=may_lift)
        if blocking:
            raise AuthorSlashed(
                f"{v.author} is slashed by {blocking[0].vertex_id.hex()[:16]} (an ancestor "
                "of this vertex); it must be re-registered by a registrar and re-attest",
                vertex_id=vid, author=v.author,
                slash_ids=tuple(s.vertex_id for s in blocking))

    def _registered_by_authority(self, node: str, version: int) -> bool:
        """Was ``node``'s key ``version`` registered by a genesis authority (not itself)?"""
        entry = self.views.key_versions.entry(node, version)
        if entry is None or self._genesis is None:
            return False
        if entry.vertex_id == self.genesis_id:
            return True
        registrar = self.get(entry.vertex_id).author
        return registrar != node and registrar in {a.node_id for a in self._genesis.authorities}

    def _check_author(self, v: Vertex, vid: bytes, payload: object) -> None:
        current = self.views.key_versions.current(v.author)
        if current is None:
            if (isinstance(payload, KeyRecord) and payload.node_id == v.author
                    and self._genesis is not None and self._genesis.open_enrolment
                    and payload.key_version == 1 == v.key_version):
                self._verify_with(_verify_key(payload, vid), v, vid)
                return
            raise UnknownAuthor(f"unknown author {v.author!r}", vertex_id=vid)
        if v.key_version != current:
            raise KeyVersionMismatch(f"{v.author} signs with key version {current}, "
                                     f"vertex names {v.key_version}", vertex_id=vid)
        self._check_signature(v, vid, history=False)

    def _check_signature(self, v: Vertex, vid: bytes, *, history: bool) -> None:
        key = self.key_for(v.author, v.key_version)
        if key is None:
            raise (KeyVersionMismatch if self.views.key_versions.current(v.author)
                   else UnknownAuthor)(f"no key {v.author} v{v.key_version}", vertex_id=vid)
        self._verify_with(key, v, vid)

    @staticmethod
    def _verify_with(key: VerifyKey, v: Vertex, vid: bytes) -> None:
        try:
            key.verify(v.signature, v.canonical(), context=DOMAIN)
        except SignatureInvalid as exc:
            raise BadSignature(f"vertex {vid.hex()[:16]} by {v.author}: {exc}",
                               vertex_id=vid) from None

    def _check_kind(self, v: Vertex, vid: bytes, payload: object, batch: Batch) -> None:
        if isinstance(payload, KeyRecord):
            auth = {a.node_id for a in self._genesis.authorities} if self._genesis else set()
            current = self.views.key_versions.current(payload.node_id) or 0
            if v.author not in auth and v.author != payload.node_id:
                raise InvalidPayload(f"{v.author} may not register keys for "
                                     f"{payload.node_id}", vertex_id=vid)
            if payload.key_version != current + 1:
                raise InvalidPayload(f"{payload.node_id} key version must be {current + 1}",
                                     vertex_id=vid)
            _verify_key(payload, vid)
        elif isinstance(payload, AttestationEvent):
            if payload.node_id != v.author or payload.key_version != v.key_version:
                raise AttestationRejected("attestation must be by the vertex author and key",
                                          vertex_id=vid)
            key = self.key_for(v.author, v.key_version)
            assert key is not None
            check_signature(payload, key)
            last = self.views.attestations.last_counter(payload.node_id)
            if last is not None and payload.counter <= last:
                raise AttestationRejected(f"attestation counter {payload.counter} not above "
                                          f"{last}", vertex_id=vid)
        elif isinstance(payload, SlashingEvidence):
            try:
                verify_evidence(payload, self.key_for)
            except InvalidEvidence as exc:
                raise InvalidPayload(f"slashing evidence: {exc}", vertex_id=vid) from None
        else:
            try:
                notice = slash_notice(v, payload)
            except InvalidPayload as exc:
                exc.vertex_id = vid
                raise
            if notice is not None and not self._is_authority(v.author):
                raise InvalidPayload(f"{v.author} is not a registrar authority; only genesis "
                                     "authorities may slash", vertex_id=vid)

    def _is_authority(self, node: str) -> bool:
        return self._genesis is not None and any(
            a.node_id == node for a in self._genesis.authorities)

    def _write(self, batch: Batch, v: Vertex, vid: bytes, payload: object,
               depth: int) -> AnchorReceipt:
        position = self._next_position
        batch.put("vertices", vid, v.encode())
        batch.put("vmeta", vid, _META.pack(depth, position, v.timestamp_ms))
        batch.put("positions", _Q.pack(position), vid)
        batch.put("meta", b"next_position", _Q.pack(position + 1))
        for p in v.parents:
            batch.put("children", p + vid, b"")
            batch.delete("tips", p)
        batch.put("tips", vid, b"")
        batch.put("heads", v.author.encode(), _Q.pack(v.counter))
        batch.put("by_author", _key(v.author, v.counter), vid)
        if vid in self._orphans:
            batch.delete("orphans", vid)
        if isinstance(payload, SlashingEvidence):
            batch.put("evidence", payload.digest,
                      payload.to_proto().SerializeToString(deterministic=True))
        self.views.apply(batch, v, vid, payload)
        self._store.commit(batch)
        self._next_position = position + 1
        self._heads[v.author] = v.counter
        self._unindex_orphan(vid)
        return AnchorReceipt(vid, depth, position)

    def _store_evidence(self, ev: SlashingEvidence) -> None:
        batch = self._store.batch()
        batch.put("evidence", ev.digest, ev.to_proto().SerializeToString(deterministic=True))
        self._store.commit(batch)

    # ------------------------------------------------------------------ orphans

    def _key_for_orphan(self, v: Vertex) -> VerifyKey | None:
        key = self.key_for(v.author, v.key_version)
        if key is None and (v.author, v.key_version) in self._parked_keys:
            key = self._parked_keys[(v.author, v.key_version)][1]
        return key

    def _park(self, v: Vertex, vid: bytes) -> None:
        """Park ``v`` under the orphan bounds.

        A vertex whose key is known (anchored, or registered by a verified parked
        KEY_VERSION) has its signature checked and counts against its author's quota;
        any other vertex goes to the small unverified sub-pool. So junk from unknown
        authors can take at most ``max_unverified_orphans`` slots and never denies
        parking to a known author's out-of-order vertex.
        """
        if vid in self._orphans:
            return
        key = self._key_for_orphan(v)
        if key is not None:
            self._verify_with(key, v, vid)
        if len(self._orphans) >= self.max_orphans:
            raise OrphanPoolFull(f"orphan pool full ({self.max_orphans}); vertex "
                                 f"{vid.hex()[:16]} not kept", vertex_id=vid)
        if key is None and len(self._unverified) >= self.max_unverified_orphans:
            raise OrphanPoolFull(f"no key for {v.author!r} v{v.key_version} and the unverified "
                                 f"orphan pool is full ({self.max_unverified_orphans})",
                                 vertex_id=vid)
        if key is not None and (self._orphans_by_author.get(v.author, 0)
                                >= self.max_orphans_per_author):
            raise OrphanPoolFull(f"{v.author} has {self.max_orphans_per_author} parked "
                                 "vertices already", vertex_id=vid)
        batch = self._store.batch()
        batch.put("orphans", vid, v.encode())
        self._store.commit(batch)
        self._index_orphan(vid, v, verified=key is not None)

    def _index_orphan(self, vid: bytes, v: Vertex, *, verified: bool) -> None:
        self._orphans[vid] = v
        for p in v.parents:
            if not self.has(p):
                self._wait_parent.setdefault(p, set()).add(vid)
        self._wait_counter.setdefault((v.author, v.counter), set()).add(vid)
        if not verified:
            self._unverified.add(vid)
            return
        self._orphans_by_author[v.author] = self._orphans_by_author.get(v.author, 0) + 1
        if v.kind != VertexKind.KEY_VERSION:
            return
        try:
            rec = decode_payload(v.kind, v.payload)
            if rec.node_id == v.author or self._is_authority(v.author):
                key = VerifyKey.from_raw(rec.algorithm, rec.public_key)
                self._parked_keys[(rec.node_id, rec.key_version)] = (vid, key)
        except (InvalidPayload, CryptoError):
            pass

    def _unindex_orphan(self, vid: bytes) -> None:
        v = self._orphans.pop(vid, None)
        if v is None:
            return
        if vid in self._unverified:
            self._unverified.discard(vid)
        else:
            left = self._orphans_by_author.get(v.author, 1) - 1
            if left:
                self._orphans_by_author[v.author] = left
            else:
                self._orphans_by_author.pop(v.author, None)
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

    def _release(self, first: Vertex, first_id: bytes) -> list[AnchorReceipt]:
        """Anchor every orphan that ``first`` (and what it releases) unblocks."""
        released: list[AnchorReceipt] = []
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
                    receipt = self._anchor_one(orphan)
                except VertexParked:
                    continue
                except Rejection as exc:
                    log.info("orphan rejected", extra={"vertex": oid.hex(), "reason": str(exc)})
                    self._drop_orphan(oid)
                    continue
                released.append(receipt)
                work.append((orphan.author, orphan.counter, oid))
        return released

    def _drop_orphan(self, vid: bytes) -> None:
        batch = self._store.batch()
        batch.delete("orphans", vid)
        self._store.commit(batch)
        self._unindex_orphan(vid)

    # ------------------------------------------------------------------ sync

    def missing(self, have_ids: Iterable[bytes]) -> list[bytes]:
        """Of ``have_ids`` (e.g. a peer's tips), those this ledger has not anchored."""
        return [i for i in dict.fromkeys(have_ids) if not self.has(i)]

    def ancestors(self, ids: Iterable[bytes], *, stop: set[bytes] | None = None) -> set[bytes]:
        """``ids`` and all their anchored ancestors, not descending below ``stop``."""
        seen: set[bytes] = set()
        stack = [i for i in ids if self.has(i)]
        stop = stop or set()
        while stack:
            vid = stack.pop()
            if vid in seen or vid in stop:
                continue
            seen.add(vid)
            stack.extend(p for p in self.get(vid).parents if p not in seen)
        return seen

    def export(self, ids: Iterable[bytes], *, ancestors: bool = True,
               known_tips: Iterable[bytes] = ()) -> list[Vertex]:
        """Vertices for ``ids`` (and, by default, their ancestors that a peer whose
        tips are ``known_tips`` lacks), in this ledger's anchoring order.

        Cost is proportional to the vertices between ``ids`` and ``known_tips``, not
        to the ledger (see :meth:`lacking`); ``known_tips`` we do not have are
        ignored, so a peer that is ahead of us on other branches gets more than it
        needs, never less.
        """
        wanted = (self.lacking(ids, known_tips) if ancestors
                  else {i for i in ids if self.has(i)})
        order = sorted(wanted, key=lambda i: self._meta(i)[1])
        return [self.get(i) for i in order]

    def lacking(self, ids: Iterable[bytes], known: Iterable[bytes]) -> set[bytes]:
        """``ancestors(ids) - ancestors(known)`` without walking either to genesis.

        Both sets are painted down the DAG together in decreasing depth order (a
        parent is strictly shallower than its child), so when a vertex is popped
        every path from above has already reached it and its colour is final; the
        walk stops as soon as nothing "wanted" is left in the frontier.
        """
        want, have = 1, 2
        colour: dict[bytes, int] = {}
        heap: list[tuple[int, bytes]] = []
        pending = 0  # frontier entries currently coloured "want"

        def push(vid: bytes, c: int) -> None:
            nonlocal pending
            prev = colour.get(vid)
            if prev is None:
                raw = self._store.get("vmeta", vid)
                if raw is None:
                    return
                colour[vid] = c
                heapq.heappush(heap, (-_META.unpack(raw)[0], vid))
                pending += c == want
            elif prev == want and c == have:
                colour[vid] = have
                pending -= 1

        for vid in known:
            push(vid, have)
        for vid in ids:
            push(vid, want)
        out: set[bytes] = set()
        while heap and pending:
            _, vid = heapq.heappop(heap)
            c = colour[vid]
            if c == want:
                out.add(vid)
                pending -= 1
            for p in self.get(vid).parents:
                push(p, c)
        return out

    def import_(self, vertices: Iterable[Vertex | bytes]) -> ImportReport:
        """Verify and anchor vertices from a peer; nothing is lost to ordering.

        Vertices may arrive in any order: those waiting for ancestry are parked and
        released as the rest arrives. Bytes are decoded first (bad bytes are reported).
        """
        report = ImportReport()
        for item in vertices:
            try:
                v = decode(item) if isinstance(item, bytes) else item
                vid = v.id
            except MalformedVertex as exc:
                report.rejected.append((None, exc))
                continue
            if self.has(vid):
                report.duplicates.append(vid)
                continue
            try:
                receipt = self.verify_and_anchor(v)
            except VertexParked:
                report.parked.append(vid)
                continue
            except Rejection as exc:
                report.rejected.append((vid, exc))
                continue
            report.anchored.append(vid)
            report.anchored.extend(r.id for r in receipt.released)
        report.parked = [p for p in report.parked if p in self._orphans]
        return report

    # ------------------------------------------------------------------ audit

    def verify(self, progress: Callable[[int], None] | None = None) -> VerifyReport:
        """Re-check every stored vertex in anchoring order; report every invalid one.

        Replays the key registry and the slash rule from the vertices themselves
        (not from the views), so a damaged view cannot hide a bad signature or a
        vertex a slash should have refused.
        """
        report = VerifyReport()
        keys: dict[tuple[str, int], VerifyKey] = {}
        current: dict[str, int] = {}
        counters: dict[str, int] = {}
        seen_pos: dict[bytes, int] = {}
        slash_audit = SlashAudit(())
        for pos_key in self._store.keys("positions"):
            position = _Q.unpack(pos_key)[0]
            report.checked += 1
            if progress:
                progress(1)
            vid_hex = "?"
            try:
                vid = self._store.get("positions", pos_key)
                assert vid is not None
                vid_hex = vid.hex()
                v = self.get(vid)
                self._audit_one(v, vid, position, seen_pos, keys, current, counters,
                                slash_audit)
            except (LedgerError, CryptoError, AssertionError) as exc:
                report.invalid.append((vid_hex, f"{type(exc).__name__}: {exc}"))
        return report

    def _audit_one(self, v: Vertex, vid: bytes, position: int, seen_pos: dict[bytes, int],
                   keys: dict[tuple[str, int], VerifyKey], current: dict[str, int],
                   counters: dict[str, int], slash_audit: SlashAudit) -> None:
        payload = decode_payload(v.kind, v.payload)
        for p in v.parents:
            if p not in seen_pos:
                raise MalformedVertex(f"parent {p.hex()[:16]} not anchored before it")
        expected = counters.get(v.author, -1) + 1
        if v.counter != expected:
            raise MalformedVertex(f"counter {v.counter}, expected {expected}")
        if isinstance(payload, Genesis):
            slash_audit.authorities = {a.node_id for a in payload.authorities}
            for a in payload.authorities:
                keys[(a.node_id, a.key_version)] = _verify_key(a, vid)
                current[a.node_id] = a.key_version
                slash_audit.registered_by[(a.node_id, a.key_version)] = v.author
        elif (isinstance(payload, KeyRecord) and v.author not in current
              and payload.node_id == v.author):
            keys[(v.author, 1)] = _verify_key(payload, vid)
            current[v.author] = 1
        if current.get(v.author) != v.key_version:
            raise KeyVersionMismatch(f"key version {v.key_version} not in force")
        self._verify_with(keys[(v.author, v.key_version)], v, vid)
        slash_audit.check(v, vid, payload)
        if isinstance(payload, KeyRecord):
            keys[(payload.node_id, payload.key_version)] = _verify_key(payload, vid)
            current[payload.node_id] = payload.key_version
            slash_audit.registered_by[(payload.node_id, payload.key_version)] = v.author
        counters[v.author] = v.counter
        seen_pos[vid] = position

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


def _verify_key(rec: KeyRecord, vid: bytes) -> VerifyKey:
    try:
        return VerifyKey.from_raw(rec.algorithm, rec.public_key)
    except CryptoError as exc:
        raise InvalidPayload(f"key record for {rec.node_id}: {exc}", vertex_id=vid) from None
