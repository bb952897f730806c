"""Signed volume proofs and performance reports, and their anchoring in the QS-DAG.

At epoch end the relayer builds a :class:`VolumeProof`: the Merkle root over the
epoch's :class:`~pqcnet.relayer.metering.VolumeRecord` leaves plus totals, signed with the
node's ML-DSA key under its own FIPS 204 context (so it can never verify as another
object type). The *header* (records stripped: a vertex payload is bounded) is
anchored as a ``VOLUME_PROOF`` vertex; any single record is then proven against the
anchored root with an inclusion proof (:func:`verify_inclusion`). The tree is the
house one, :mod:`pqcnet.layer0.merkle` (RFC 6962/9162, SHA-256), so any CT-style verifier can
check a record; an epoch holds one leaf per active (customer, channel, QoS). One tree
holds at most ``pqcnet.layer0.merkle.MAX_LEAVES`` leaves: a bigger epoch is split by
:func:`build_volume_proofs` into ``parts`` consecutive slices of the canonical order,
each a proof of its own (``part`` 0..parts-1, both covered by the signature). A
:class:`PerformanceReport` bundles a range of proofs, the anchor receipts and
uptime, signed the same way and anchored as ``PERFORMANCE_REPORT``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from google.protobuf.message import DecodeError

from pqcnet.crypto.errors import SignatureInvalid
from pqcnet.crypto.pqc import SigningKey, VerifyKey, length_prefixed
from pqcnet.layer0.errors import ProofInvalid
from pqcnet.layer0.merkle import MAX_LEAVES, InclusionProof, leaf_hash, root_of_leaf_hashes
from pqcnet.layer0.merkle import inclusion_proof as _tree_proof
from pqcnet.layer0.merkle import verify_inclusion as _tree_verify
from pqcnet.proto import relayer_pb2 as pb
from pqcnet.qsdag import Ledger, OpaqueRecord, VertexKind
from pqcnet.relayer.errors import ProofError
from pqcnet.relayer.metering import VolumeRecord

#: Encoded records one proof part may carry (a part is also at most ``MAX_LEAVES``
#: records): keeps every proof file well under ``proofstore.MAX_PROOF_FILE``, which a
#: restarted relayer must read back.
MAX_PART_BYTES = 32 << 20

PROOF_CONTEXT = b"pqcnet/relayer/volume-proof/v1"
REPORT_CONTEXT = b"pqcnet/relayer/performance-report/v1"
PROOF_CONTENT_TYPE = "pqcnet.relayer.VolumeProof"
REPORT_CONTENT_TYPE = "pqcnet.relayer.RelayerPerformanceReport"


def _u64(n: int) -> bytes:
    return n.to_bytes(8, "big")


@dataclass(frozen=True, slots=True)
class VolumeProof:
    """One epoch's signed volume commitment (``records`` may be omitted)."""

    relayer_id: str
    epoch: int
    root: bytes
    record_count: int
    total_bytes: int
    total_frames: int
    signer_key_id: bytes = b""
    signature: bytes = b""
    records: tuple[VolumeRecord, ...] = ()
    part: int = 0
    """Which slice of a split epoch this is (0 when the epoch fits one tree)."""
    parts: int = 1
    """How many proofs the epoch was split into."""

    def signed_bytes(self) -> bytes:
        """What the signature covers (everything but the records and the signature).

        An unsplit epoch's bytes are unchanged from v1 (part/parts not appended), so
        proofs signed before splitting existed still verify."""
        split = () if (self.part, self.parts) == (0, 1) else (_u64(self.part), _u64(self.parts))
        return length_prefixed(self.relayer_id.encode(), _u64(self.epoch), self.root,
                               _u64(self.record_count), _u64(self.total_bytes),
                               _u64(self.total_frames), self.signer_key_id, *split)

    def header(self) -> VolumeProof:
        """The proof without its records (what is anchored)."""
        return replace(self, records=())


def build_volume_proof(relayer_id: str, epoch: int, records: Sequence[VolumeRecord],
                       signer: SigningKey, *, part: int = 0, parts: int = 1) -> VolumeProof:
    """Commit to ``records`` (canonical order, at most one tree) and sign."""
    unsigned = VolumeProof(relayer_id, epoch, _root(records), len(records),
                           sum(r.bytes for r in records), sum(r.frames for r in records),
                           signer.key_id, b"", tuple(records), part, parts)
    return replace(unsigned, signature=signer.sign(unsigned.signed_bytes(),
                                                   context=PROOF_CONTEXT))


def split_records(records: Sequence[VolumeRecord]) -> list[Sequence[VolumeRecord]]:
    """Consecutive slices of at most ``MAX_LEAVES`` records and ``MAX_PART_BYTES``
    encoded bytes each (deterministic: the same records always split the same way)."""
    slices: list[Sequence[VolumeRecord]] = []
    start, size = 0, 0
    for i, r in enumerate(records):
        est = len(r.customer) + len(r.channel) + 48  # protobuf overhead, generous
        if i > start and (i - start >= MAX_LEAVES or size + est > MAX_PART_BYTES):
            slices.append(records[start:i])
            start, size = i, 0
        size += est
    slices.append(records[start:])
    return slices


def build_volume_proofs(relayer_id: str, epoch: int, records: Sequence[VolumeRecord],
                        signer: SigningKey) -> list[VolumeProof]:
    """One signed proof per slice of :func:`split_records` (one for a normal epoch)."""
    slices = split_records(records)
    return [build_volume_proof(relayer_id, epoch, s, signer, part=i, parts=len(slices))
            for i, s in enumerate(slices)]


def _root(records: Sequence[VolumeRecord]) -> bytes:
    if len(records) > MAX_LEAVES:  # before encoding a million records for nothing
        raise ProofError(f"volume proof: {len(records)} records; at most {MAX_LEAVES} per tree")
    try:
        return root_of_leaf_hashes([leaf_hash(r.canonical()) for r in records])
    except ProofInvalid as exc:
        raise ProofError(f"volume proof: {exc}") from None


def verify_volume_proof(proof: VolumeProof, key: VerifyKey) -> None:
    """Signature, and — when records are present — root and totals recomputed."""
    if proof.signer_key_id != key.key_id:
        raise ProofError("volume proof was signed by a different key")
    if not 0 <= proof.part < proof.parts:
        raise ProofError(f"volume proof part {proof.part} of {proof.parts}")
    try:
        key.verify(proof.signature, proof.signed_bytes(), context=PROOF_CONTEXT)
    except SignatureInvalid as exc:
        raise ProofError(f"volume proof signature: {exc}") from None
    if proof.records:
        check_records(proof)


def check_records(proof: VolumeProof) -> None:
    """Raise :class:`ProofError` unless ``proof.records`` give its root and totals."""
    if (_root(proof.records) != proof.root or len(proof.records) != proof.record_count
            or sum(r.bytes for r in proof.records) != proof.total_bytes
            or sum(r.frames for r in proof.records) != proof.total_frames):
        raise ProofError("volume proof records do not match its root or totals")


def inclusion_proof(proof: VolumeProof, index: int) -> InclusionProof:
    """RFC 6962 audit path for ``proof.records[index]`` (needs the records)."""
    try:
        return _tree_proof([r.canonical() for r in proof.records], index)
    except ProofInvalid as exc:
        raise ProofError(str(exc)) from None


def verify_inclusion(record: VolumeRecord, inc: InclusionProof, anchored: VolumeProof) -> None:
    """Raise :class:`ProofError` unless ``record`` is committed under ``anchored.root``."""
    if record.epoch != anchored.epoch:
        raise ProofError(f"record is for epoch {record.epoch}, proof for {anchored.epoch}")
    if inc.size != anchored.record_count:
        raise ProofError(f"inclusion proof is for {inc.size} records, "
                         f"the anchored proof has {anchored.record_count}")
    try:
        _tree_verify(record.canonical(), inc, anchored.root)
    except ProofInvalid as exc:
        raise ProofError(f"inclusion proof: {exc}") from None


# ------------------------------------------------------------------ protobuf boundary


def record_to_pb(r: VolumeRecord) -> pb.VolumeRecord:
    return pb.VolumeRecord(customer=r.customer, channel=r.channel, bytes=r.bytes,
                           frames=r.frames, qos=r.qos, epoch=r.epoch)


def record_from_pb(m: pb.VolumeRecord) -> VolumeRecord:
    return VolumeRecord(m.customer, m.channel, m.bytes, m.frames, m.qos, m.epoch)


def proof_to_pb(p: VolumeProof) -> pb.VolumeProof:
    return pb.VolumeProof(relayer_id=p.relayer_id, epoch=p.epoch, merkle_root=p.root,
                          records=[record_to_pb(r) for r in p.records],
                          total_bytes=p.total_bytes, total_frames=p.total_frames,
                          signer_key_id=p.signer_key_id, signature=p.signature,
                          record_count=p.record_count, part=p.part,
                          parts=0 if p.parts == 1 else p.parts)


def proof_from_pb(m: pb.VolumeProof) -> VolumeProof:
    return VolumeProof(m.relayer_id, m.epoch, m.merkle_root, m.record_count, m.total_bytes,
                       m.total_frames, m.signer_key_id, m.signature,
                       tuple(record_from_pb(r) for r in m.records), m.part, m.parts or 1)


# ------------------------------------------------------------------ performance report


@dataclass(frozen=True, slots=True)
class PerformanceReport:
    """A relayer's signed summary over an epoch range."""

    relayer_id: str
    epoch_from: int
    epoch_to: int
    proofs: tuple[VolumeProof, ...]
    receipts: tuple[bytes, ...]
    uptime_seconds: float
    signer_key_id: bytes = b""
    signature: bytes = b""

    def signed_bytes(self) -> bytes:
        """Canonical bytes covered by the signature (proof headers by their signatures)."""
        return length_prefixed(
            self.relayer_id.encode(), _u64(self.epoch_from), _u64(self.epoch_to),
            length_prefixed(*(p.signed_bytes() + p.signature for p in self.proofs)),
            length_prefixed(*self.receipts), repr(float(self.uptime_seconds)).encode(),
            self.signer_key_id)

    def to_pb(self) -> pb.RelayerPerformanceReport:
        return pb.RelayerPerformanceReport(
            relayer_id=self.relayer_id, epoch_from=self.epoch_from, epoch_to=self.epoch_to,
            volume_proofs=[proof_to_pb(p) for p in self.proofs],
            attestation_receipts=list(self.receipts), uptime_seconds=self.uptime_seconds,
            signer_key_id=self.signer_key_id, signature=self.signature)

    @classmethod
    def from_pb(cls, m: pb.RelayerPerformanceReport) -> PerformanceReport:
        return cls(m.relayer_id, m.epoch_from, m.epoch_to,
                   tuple(proof_from_pb(p) for p in m.volume_proofs),
                   tuple(m.attestation_receipts), m.uptime_seconds, m.signer_key_id,
                   m.signature)


def sign_report(report: PerformanceReport, signer: SigningKey) -> PerformanceReport:
    """``report`` signed by ``signer``."""
    unsigned = replace(report, signer_key_id=signer.key_id, signature=b"")
    return replace(unsigned, signature=signer.sign(unsigned.signed_bytes(),
                                                   context=REPORT_CONTEXT))


def verify_report(report: PerformanceReport, key: VerifyKey) -> None:
    """Report signature and every contained proof's signature."""
    try:
        key.verify(report.signature, report.signed_bytes(), context=REPORT_CONTEXT)
    except SignatureInvalid as exc:
        raise ProofError(f"performance report signature: {exc}") from None
    for p in report.proofs:
        verify_volume_proof(p, key)


# ------------------------------------------------------------------ QS-DAG anchoring


@dataclass
class LedgerAnchor:
    """Anchors proofs and reports into a :class:`pqcnet.qsdag.Ledger` as the relayer's vertices."""

    ledger: Ledger
    author: str
    signer: SigningKey
    receipts: dict[int, bytes] = field(default_factory=dict)
    """epoch -> vertex id of its (first) proof"""
    part_receipts: dict[tuple[int, int], bytes] = field(default_factory=dict)
    """(epoch, part) -> vertex id, for every part of every anchored epoch"""

    def anchor_proof(self, proof: VolumeProof) -> bytes:
        """Append the proof header as a VOLUME_PROOF vertex; returns the vertex id."""
        body = proof_to_pb(proof.header()).SerializeToString()
        receipt = self.ledger.append(VertexKind.VOLUME_PROOF,
                                     OpaqueRecord(PROOF_CONTENT_TYPE, self.author, body),
                                     self.author, self.signer)
        self.remember(proof, receipt.id)
        return receipt.id

    def remember(self, proof: VolumeProof, vertex_id: bytes) -> None:
        """Record that ``proof`` is anchored at ``vertex_id``."""
        if proof.part == 0:
            self.receipts[proof.epoch] = vertex_id
        self.part_receipts[(proof.epoch, proof.part)] = vertex_id

    def forget(self, epoch: int) -> None:
        self.receipts.pop(epoch, None)
        for key in [k for k in self.part_receipts if k[0] == epoch]:
            del self.part_receipts[key]

    def part_receipt(self, epoch: int, part: int) -> bytes:
        """The vertex id anchoring part ``part`` of ``epoch`` (KeyError if none)."""
        return self.part_receipts[(epoch, part)]

    def next_counter(self) -> int:
        """The author counter the next anchor will take (recorded in anchoring intents)."""
        return self.ledger.next_counter(self.author)

    def find_anchored(self, proof: VolumeProof, from_counter: int) -> bytes | None:
        """The vertex id of an already anchored ``proof`` among this author's vertices
        from ``from_counter`` on (a crash after the anchor, before the proof file)."""
        for counter in range(from_counter, self.ledger.next_counter(self.author)):
            vid = self.ledger.by_author(self.author, counter)
            if vid is None:
                continue
            try:
                anchored = anchored_proof(self.ledger, vid)
            except ProofError:
                continue
            if anchored.signed_bytes() == proof.signed_bytes():
                self.remember(proof, vid)
                return vid
        return None

    def anchor_report(self, report: PerformanceReport) -> bytes:
        """Append a report (proof headers only) as a PERFORMANCE_REPORT vertex."""
        slim = replace(report, proofs=tuple(p.header() for p in report.proofs))
        body = slim.to_pb().SerializeToString()
        receipt = self.ledger.append(VertexKind.PERFORMANCE_REPORT,
                                     OpaqueRecord(REPORT_CONTENT_TYPE, self.author, body),
                                     self.author, self.signer)
        return receipt.id


def anchored_proof(ledger: Ledger, vertex_id: bytes) -> VolumeProof:
    """The proof header anchored at ``vertex_id`` (the ledger verified the vertex)."""
    vertex = ledger.get(vertex_id)
    if vertex.kind != VertexKind.VOLUME_PROOF:
        raise ProofError(f"vertex {vertex_id.hex()[:16]} is not a volume proof")
    payload = ledger.payload(vertex_id)
    if not isinstance(payload, OpaqueRecord) or payload.content_type != PROOF_CONTENT_TYPE:
        raise ProofError("anchored payload is not a relayer volume proof")
    m = pb.VolumeProof()
    try:
        m.ParseFromString(payload.body)
    except DecodeError:
        raise ProofError("anchored volume proof does not decode") from None
    return proof_from_pb(m)
