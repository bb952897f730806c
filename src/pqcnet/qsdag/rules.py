"""The anchoring rules of :meth:`Ledger.verify_and_anchor`, as pure checks.

A vertex must pass, in this order (the first failure is the typed
:class:`~pqcnet.qsdag.errors.Rejection` raised, and nothing is written):

1. well-formed (:mod:`pqcnet.qsdag.vertex` bounds), payload valid for its kind;
2. timestamp not more than ``skew`` in the future of the ledger clock
   (:func:`check_not_future`);
3. an author counter below the author's next one that names a *different* vertex
   is equivocation (:func:`equivocation`) → :class:`Equivocation` with
   :class:`SlashingEvidence` (stored, and anchorable by anyone with
   :meth:`Ledger.report_evidence`);
4. missing parents or a counter gap (counter above the next one) → the vertex is
   parked as an orphan (:class:`~pqcnet.qsdag.orphans.OrphanPool`) and
   :class:`VertexParked` is raised; it is anchored automatically once what it waits
   for arrives;
5. author not disabled by a slash in the vertex's ancestry (:func:`check_not_slashed`,
   ordering by DAG ancestry; see :mod:`pqcnet.qsdag.slashing`);
6. author registered (genesis authority, KEY_VERSION vertex, or open self-enrolment),
   ``key_version`` equal to the author's version in force, ML-DSA signature valid
   (:func:`check_author`);
7. timestamp not earlier than its latest parent minus ``skew`` (:func:`check_causality`);
8. kind-specific rules needing ledger state (:func:`check_kind`: key registration
   rights, attestation signature and increasing counter, slashing evidence that
   verifies, slash notices only from genesis authorities).

The genesis vertex has its own rule (:func:`check_genesis`).

Why they live apart from the ledger: every check here only *reads* — the ledger
state through :class:`LedgerState` — and raises; writing (parking, storing
evidence, anchoring) stays in :class:`~pqcnet.qsdag.ledger.Ledger`. So each rule
can be read, and tested, on its own, and the order above is the one place that
decides what a replica accepts.

Because every author's counter must be exactly its next one, each author's vertices
are anchored in one order on every ledger, so "key version in force" is the same
everywhere — that is what makes sync deterministic.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from pqcnet.crypto.errors import CryptoError, SignatureInvalid
from pqcnet.crypto.pqc import VerifyKey
from pqcnet.qsdag import attestation, parallel
from pqcnet.qsdag.attestation import AttestationEvent
from pqcnet.qsdag.errors import (
    AttestationRejected,
    AuthorSlashed,
    BadSignature,
    Equivocation,
    InvalidEvidence,
    InvalidPayload,
    KeyVersionMismatch,
    MalformedVertex,
    TimestampSkew,
    UnknownAuthor,
)
from pqcnet.qsdag.evidence import SlashingEvidence, verify_evidence
from pqcnet.qsdag.payloads import Genesis, KeyRecord
from pqcnet.qsdag.slashing import slash_notice
from pqcnet.qsdag.vertex import DOMAIN, Vertex, VertexKind
from pqcnet.qsdag.views import Views


class LedgerState(Protocol):
    """The read-only view of a ledger the rules decide on (a :class:`Ledger` is one)."""

    @property
    def genesis(self) -> Genesis | None: ...

    @property
    def genesis_id(self) -> bytes | None: ...

    @property
    def views(self) -> Views: ...

    def get(self, vid: bytes) -> Vertex: ...

    def by_author(self, author: str, counter: int) -> bytes | None: ...

    def key_for(self, node: str, version: int) -> VerifyKey | None: ...

    def is_authority(self, node: str) -> bool: ...


def verify_signature(key: VerifyKey, v: Vertex, vid: bytes) -> None:
    """:class:`BadSignature` unless ``key`` signed ``v`` (a check already done by a
    :class:`~pqcnet.qsdag.parallel.ParallelVerifier` worker is not repeated)."""
    if parallel.proven(key, v):
        return
    try:
        key.verify(v.signature, v.canonical(), context=DOMAIN)
    except SignatureInvalid as exc:
        raise BadSignature(f"vertex {vid.hex()[:16]} by {v.author}: {exc}",
                           vertex_id=vid) from None


def verify_key(rec: KeyRecord, vid: bytes) -> VerifyKey:
    """The key a :class:`KeyRecord` registers; :class:`InvalidPayload` if it is not one."""
    try:
        return VerifyKey.from_raw(rec.algorithm, rec.public_key)
    except CryptoError as exc:
        raise InvalidPayload(f"key record for {rec.node_id}: {exc}", vertex_id=vid) from None


def check_not_future(v: Vertex, vid: bytes, *, now_ms: int, skew_ms: int) -> None:
    """Rule 2: not more than ``skew_ms`` ahead of the ledger clock."""
    if v.timestamp_ms > now_ms + skew_ms:
        raise TimestampSkew(f"vertex {vid.hex()[:16]} is {v.timestamp_ms - now_ms} ms "
                            "in the future", vertex_id=vid)


def check_genesis(state: LedgerState, v: Vertex, vid: bytes, payload: Genesis) -> None:
    """The genesis rule: the first and only genesis, signed by one of its authorities."""
    if state.genesis is not None:
        raise MalformedVertex("ledger already has a different genesis", vertex_id=vid)
    auth = next((a for a in payload.authorities if a.node_id == v.author), None)
    if auth is None or auth.key_version != v.key_version:
        raise UnknownAuthor("genesis must be signed by one of its authorities", vertex_id=vid)
    verify_signature(verify_key(auth, vid), v, vid)


def equivocation(state: LedgerState, v: Vertex, vid: bytes, next_counter: int) -> Equivocation:
    """Rule 3, for a vertex whose counter is below ``next_counter``: the error to raise,
    carrying evidence signed by the author (its signature is checked first, so nobody
    can frame an author with a forged second vertex)."""
    existing = state.by_author(v.author, v.counter)
    check_signature(state, v, vid)
    assert existing is not None and existing != vid
    ev = SlashingEvidence.of(state.get(existing), v,
                             "equivocation" if v.counter == next_counter - 1
                             else "counter went backwards")
    return Equivocation(f"{v.author} signed two vertices with counter {v.counter}",
                        vertex_id=vid, evidence=ev)


def check_not_slashed(state: LedgerState, v: Vertex, vid: bytes) -> None:
    """Rule 5: no active slash of the author among the vertex's ancestors."""
    slashes = state.views.slashes
    if not slashes.active():
        return
    may_lift = (v.kind == VertexKind.ATTESTATION
                and registered_by_authority(state, v.author, v.key_version))
    blocking = slashes.blocking(v, may_lift=may_lift)
    if blocking:
        raise AuthorSlashed(
            f"{v.author} is slashed by {blocking[0].vertex_id.hex()[:16]} (an ancestor "
            "of this vertex); it must be re-registered by a registrar and re-attest",
            vertex_id=vid, author=v.author,
            slash_ids=tuple(s.vertex_id for s in blocking))


def registered_by_authority(state: LedgerState, node: str, version: int) -> bool:
    """Was ``node``'s key ``version`` registered by a genesis authority (not itself)?"""
    entry = state.views.key_versions.entry(node, version)
    if entry is None or state.genesis is None:
        return False
    if entry.vertex_id == state.genesis_id:
        return True
    registrar = state.get(entry.vertex_id).author
    return registrar != node and state.is_authority(registrar)


def check_author(state: LedgerState, v: Vertex, vid: bytes, payload: object) -> None:
    """Rule 6: a registered author (or an allowed self-enrolment), signing with the
    key version in force."""
    current = state.views.key_versions.current(v.author)
    if current is None:
        genesis = state.genesis
        if (isinstance(payload, KeyRecord) and payload.node_id == v.author
                and genesis is not None and genesis.open_enrolment
                and payload.key_version == 1 == v.key_version):
            verify_signature(verify_key(payload, vid), v, vid)
            return
        raise UnknownAuthor(f"unknown author {v.author!r}", vertex_id=vid)
    if v.key_version != current:
        raise KeyVersionMismatch(f"{v.author} signs with key version {current}, "
                                 f"vertex names {v.key_version}", vertex_id=vid)
    check_signature(state, v, vid)


def check_signature(state: LedgerState, v: Vertex, vid: bytes) -> None:
    """The signature under the anchored key ``v.author`` / ``v.key_version``."""
    key = state.key_for(v.author, v.key_version)
    if key is None:
        raise (KeyVersionMismatch if state.views.key_versions.current(v.author)
               else UnknownAuthor)(f"no key {v.author} v{v.key_version}", vertex_id=vid)
    verify_signature(key, v, vid)


def check_causality(v: Vertex, vid: bytes, parent_timestamps: Iterable[int], *,
                    skew_ms: int) -> None:
    """Rule 7: not older than its latest parent, give or take ``skew_ms``."""
    if v.timestamp_ms + skew_ms < max(parent_timestamps):
        raise TimestampSkew(f"vertex {vid.hex()[:16]} is older than its parents",
                            vertex_id=vid)


def check_kind(state: LedgerState, v: Vertex, vid: bytes, payload: object) -> None:
    """Rule 8: what the payload's kind demands of the ledger state."""
    if isinstance(payload, KeyRecord):
        current = state.views.key_versions.current(payload.node_id) or 0
        if not state.is_authority(v.author) and v.author != payload.node_id:
            raise InvalidPayload(f"{v.author} may not register keys for "
                                 f"{payload.node_id}", vertex_id=vid)
        if payload.key_version != current + 1:
            raise InvalidPayload(f"{payload.node_id} key version must be {current + 1}",
                                 vertex_id=vid)
        verify_key(payload, vid)
    elif isinstance(payload, AttestationEvent):
        if payload.node_id != v.author or payload.key_version != v.key_version:
            raise AttestationRejected("attestation must be by the vertex author and key",
                                      vertex_id=vid)
        key = state.key_for(v.author, v.key_version)
        assert key is not None
        attestation.check_signature(payload, key)
        last = state.views.attestations.last_counter(payload.node_id)
        if last is not None and payload.counter <= last:
            raise AttestationRejected(f"attestation counter {payload.counter} not above "
                                      f"{last}", vertex_id=vid)
    elif isinstance(payload, SlashingEvidence):
        try:
            verify_evidence(payload, state.key_for)
        except InvalidEvidence as exc:
            raise InvalidPayload(f"slashing evidence: {exc}", vertex_id=vid) from None
    else:
        try:
            notice = slash_notice(v, payload)
        except InvalidPayload as exc:
            exc.vertex_id = vid
            raise
        if notice is not None and not state.is_authority(v.author):
            raise InvalidPayload(f"{v.author} is not a registrar authority; only genesis "
                                 "authorities may slash", vertex_id=vid)

