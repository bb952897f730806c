"""QS-DAG: pqcnet's append-only, signed, content-addressed ledger on RocksDB.

Every durable fact of the network is a *vertex*: attestation events, volume proofs,
performance reports, policy hashes, key versions, routes, governance directives,
slashing evidence, relay records. Vertices are ML-DSA-signed over a canonical
encoding (:mod:`pqcnet.qsdag.vertex`), named by SHA3-256 of that encoding, and reference
≥ 1 parent (the ledger's tips when built), forming a DAG rooted at one genesis.
The package does no network I/O: sync over the control plane calls
:meth:`Ledger.tips` / :meth:`Ledger.missing` / :meth:`Ledger.export` /
:meth:`Ledger.import_`.

Where things are: ``ledger`` — :class:`Ledger`, the façade everything uses;
``rules`` — the anchoring rules, in order, as pure checks; ``orphans`` — the
bounded pool of vertices waiting for their ancestry; ``sync`` — missing / export /
import; ``audit`` — ``verify()``; ``vertex``, ``payloads``, ``evidence``,
``attestation``, ``slashing`` — what vertices carry and mean; ``store``, ``views`` —
RocksDB and the views kept with it; ``receipts`` — what the ledger hands back.

Quick tour::

    from pqcnet.qsdag import Ledger, VertexKind, PolicyAnchor, OpaqueRecord
    from pqcnet.crypto.pqc import SigningKey

    gov = SigningKey.generate()
    ledger = Ledger.open("/var/lib/pqcnet/ledger")     # clock=, skew=, sync=, max_orphans=,
                                    # max_orphans_per_author=, max_unverified_orphans=
    ledger.init_genesis("pqcnet-dev", "gov-1", gov)    # once; gov-1 becomes a registrar
    relayer = SigningKey.generate()
    ledger.register_author("relayer-1", relayer.public_key, registrar="gov-1", signer=gov)
    r = ledger.append(VertexKind.VOLUME_PROOF,
                      OpaqueRecord("pqcnet.relayer.VolumeRecord", "relayer-1", body),
                      "relayer-1", relayer)            # -> AnchorReceipt(id, depth, position)
    v = ledger.build_vertex("relayer-1", relayer, VertexKind.ROUTE, Route("t", "relayer-1"))
    ledger.verify_and_anchor(v)     # peers' vertices: receipt, or a Rejection subclass
    ledger.views.relay.get("relayer-1"); ledger.views.routing.table(); ledger.rebuild_views()

    # governance disables a node: its vertices descending from the slash are refused
    ledger.slash("relayer-1", "equivocation", authority="gov-1", signer=gov)
    ledger.is_slashed("relayer-1")              # True; ledger.views.slashes.get("relayer-1")
    ledger.append(..., "relayer-1", relayer)    # -> AuthorSlashed (a Rejection)
    new = SigningKey.generate()                 # lift: registrar re-registers, node re-attests
    ledger.register_author("relayer-1", new.public_key, registrar="gov-1", signer=gov)
    ledger.append(VertexKind.ATTESTATION,
                  build_attestation("relayer-1", "relayer", new, 1, cfg, key_version=2),
                  "relayer-1", new)             # ledger.is_slashed("relayer-1") -> False

Who may sign what: genesis names registrar *authorities*; an authority registers
other nodes' keys (:meth:`Ledger.register_author`); a node rotates its own key
(:meth:`Ledger.rotate_key`, signed by the current key); with ``open_enrolment`` in
genesis a node may self-register its first key (:meth:`Ledger.enrol`). Every
registration is itself a KEY_VERSION vertex, so any ledger replaying the DAG
derives the same key history. An authority may *slash* a node
(:meth:`Ledger.slash`, a GOVERNANCE_DIRECTIVE vertex): the node's vertices that
descend from the slash are refused with :class:`AuthorSlashed` — ordered by DAG
ancestry, not wall clock, so every replica agrees — until a registrar registers a
new key for it and it re-attests with that key (:mod:`pqcnet.qsdag.slashing`).

Payloads per kind (:mod:`pqcnet.qsdag.payloads`): GENESIS→:class:`Genesis`,
KEY_VERSION→:class:`KeyRecord`, ATTESTATION→:class:`AttestationEvent`,
POLICY_ANCHOR→:class:`PolicyAnchor`, ROUTE→:class:`Route`,
RELAY_RECORD→:class:`RelayRecord`, SLASHING_EVIDENCE→:class:`SlashingEvidence`;
VOLUME_PROOF, PERFORMANCE_REPORT and GOVERNANCE_DIRECTIVE (messages owned by
relayer / mesh) → :class:`OpaqueRecord` (content type + subject node + bounded body).
"""

from __future__ import annotations

from pqcnet.qsdag.attestation import (
    AttestationEvent,
    MeasurementPolicy,
    Measurements,
    build_attestation,
    measure,
    package_hash,
    verify_attestation,
)
from pqcnet.qsdag.errors import (
    AttestationRejected,
    AuthorSlashed,
    BadSignature,
    CorruptRecord,
    Equivocation,
    InvalidEvidence,
    InvalidNodeId,
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
from pqcnet.qsdag.ledger import DEFAULT_SKEW, Ledger
from pqcnet.qsdag.orphans import (
    DEFAULT_MAX_ORPHANS,
    DEFAULT_MAX_ORPHANS_PER_AUTHOR,
    DEFAULT_MAX_UNVERIFIED_ORPHANS,
    OrphanPool,
)
from pqcnet.qsdag.payloads import (
    Genesis,
    KeyRecord,
    OpaqueRecord,
    PolicyAnchor,
    RelayRecord,
    Route,
    decode_payload,
    encode_payload,
)
from pqcnet.qsdag.receipts import AnchorReceipt, ImportReport, VerifyReport
from pqcnet.qsdag.slashing import SLASH_CONTENT_TYPE, SlashNotice
from pqcnet.qsdag.vertex import (
    DOMAIN,
    MAX_PARENTS,
    MAX_PAYLOAD,
    Vertex,
    VertexKind,
    decode,
    sign_vertex,
)

__all__ = [
    "DEFAULT_MAX_ORPHANS", "DEFAULT_MAX_ORPHANS_PER_AUTHOR", "DEFAULT_MAX_UNVERIFIED_ORPHANS",
    "DEFAULT_SKEW", "DOMAIN", "MAX_PARENTS", "MAX_PAYLOAD",
    "SLASH_CONTENT_TYPE", "AnchorReceipt", "AttestationEvent", "AttestationRejected",
    "AuthorSlashed", "BadSignature", "CorruptRecord", "Equivocation", "Genesis",
    "ImportReport", "InvalidEvidence", "InvalidNodeId", "InvalidPayload", "KeyRecord",
    "KeyVersionMismatch", "Ledger", "LedgerError",
    "LedgerStateError", "MalformedVertex", "MeasurementPolicy", "Measurements", "NotFound",
    "OpaqueRecord", "OrphanPool", "OrphanPoolFull", "PolicyAnchor", "Rejection", "RelayRecord",
    "Route", "SlashNotice", "SlashingEvidence", "TimestampSkew", "UnknownAuthor", "VerifyReport",
    "Vertex", "VertexKind", "VertexParked", "build_attestation", "decode", "decode_payload",
    "encode_payload", "measure", "package_hash", "sign_vertex", "verify_attestation",
    "verify_evidence",
]
