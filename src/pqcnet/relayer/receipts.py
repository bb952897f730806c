"""Signed volume receipts: a customer's "what I was billed for", checkable by anyone.

A :class:`VolumeReceipt` covers one customer in one epoch. It carries

* the customer's :class:`~pqcnet.relayer.metering.VolumeRecord` s, each with its RFC 6962
  inclusion proof in the epoch's tree (the tree's ``part`` when the epoch was split);
* the signed :class:`~pqcnet.relayer.proof.VolumeProof` header of every part;
* the encoded QS-DAG vertex that anchors each header (``VOLUME_PROOF``, authored and
  signed by the relayer);

and is itself signed by the relayer (FIPS 204 context ``pqcnet/relayer/receipt/v1``).
:func:`verify_receipt` needs only the relayer's public key: receipt signature, each
header's signature, each vertex's signature, kind, author and payload (exactly the
header), and each record's inclusion under its part's root. Layer-0 — the vertex id
committed by a signed IBC-style envelope — is checked with the anchorer's public key
and its published epoch records (:func:`verify_receipt_layer0`). Every failure is a
:class:`ReceiptInvalid` naming what did not hold.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from google.protobuf.message import DecodeError

from pqcnet.crypto.errors import SignatureInvalid
from pqcnet.crypto.pqc import SigningKey, VerifyKey, length_prefixed
from pqcnet.layer0.anchor import EpochRecord, verify_anchored, verify_record
from pqcnet.layer0.envelope import EpochAnchor
from pqcnet.layer0.errors import Layer0Error
from pqcnet.layer0.merkle import InclusionProof, Tree
from pqcnet.proto import relayer_pb2 as pb
from pqcnet.qsdag.errors import LedgerError
from pqcnet.qsdag.payloads import OpaqueRecord, decode_payload
from pqcnet.qsdag.vertex import DOMAIN as VERTEX_DOMAIN
from pqcnet.qsdag.vertex import Vertex, VertexKind, decode
from pqcnet.relayer.errors import ProofError, ReceiptInvalid
from pqcnet.relayer.metering import VolumeRecord
from pqcnet.relayer.proof import (
    PROOF_CONTENT_TYPE,
    VolumeProof,
    proof_from_pb,
    proof_to_pb,
    record_from_pb,
    record_to_pb,
    verify_inclusion,
    verify_volume_proof,
)

RECEIPT_CONTEXT = b"pqcnet/relayer/receipt/v1"
#: Largest receipt file or message read (records of one customer in one epoch).
MAX_RECEIPT = 8 << 20


@dataclass(frozen=True, slots=True)
class ReceiptEntry:
    """One billed record, the tree part it is in, and its audit path there."""

    record: VolumeRecord
    part: int
    inclusion: InclusionProof


@dataclass(frozen=True, slots=True)
class VolumeReceipt:
    """A relayer's signed statement of one customer's volume in one epoch."""

    relayer_id: str
    customer: str
    epoch: int
    entries: tuple[ReceiptEntry, ...]
    proofs: tuple[VolumeProof, ...]
    """the epoch's proof headers, one per part, part order"""
    anchor_vertices: tuple[bytes, ...]
    """encoded QS-DAG vertex anchoring each header, same order"""
    signer_key_id: bytes = b""
    signature: bytes = b""

    def signed_bytes(self) -> bytes:
        """What the relayer signs (an entry's tree size is its part's ``record_count``)."""
        entries = [length_prefixed(e.record.canonical(), e.part.to_bytes(4, "big"),
                                   e.inclusion.index.to_bytes(8, "big"), *e.inclusion.path)
                   for e in self.entries]
        return length_prefixed(
            self.relayer_id.encode(), self.customer.encode(), self.epoch.to_bytes(8, "big"),
            length_prefixed(*entries),
            length_prefixed(*(p.signed_bytes() + p.signature for p in self.proofs)),
            length_prefixed(*self.anchor_vertices), self.signer_key_id)

    @property
    def total_bytes(self) -> int:
        return sum(e.record.bytes for e in self.entries)

    @property
    def total_frames(self) -> int:
        return sum(e.record.frames for e in self.entries)

    # ------------------------------------------------------------ protobuf boundary
    def to_pb(self) -> pb.VolumeReceipt:
        return pb.VolumeReceipt(
            relayer_id=self.relayer_id, customer=self.customer, epoch=self.epoch,
            entries=[entry_to_pb(e) for e in self.entries],
            proofs=[proof_to_pb(p.header()) for p in self.proofs],
            anchor_vertices=list(self.anchor_vertices), signer_key_id=self.signer_key_id,
            signature=self.signature)

    @classmethod
    def from_pb(cls, m: pb.VolumeReceipt) -> VolumeReceipt:
        return cls(m.relayer_id, m.customer, m.epoch,
                   tuple(entry_from_pb(e) for e in m.entries),
                   tuple(proof_from_pb(p) for p in m.proofs), tuple(m.anchor_vertices),
                   m.signer_key_id, m.signature)

    def encode(self) -> bytes:
        return self.to_pb().SerializeToString()

    @classmethod
    def decode(cls, data: bytes) -> VolumeReceipt:
        if len(data) > MAX_RECEIPT:
            raise ReceiptInvalid(f"receipt is {len(data)} bytes; at most {MAX_RECEIPT}")
        m = pb.VolumeReceipt()
        try:
            m.ParseFromString(data)
        except DecodeError:
            raise ReceiptInvalid("receipt does not decode") from None
        return cls.from_pb(m)


def entry_to_pb(e: ReceiptEntry) -> pb.ReceiptEntry:
    return pb.ReceiptEntry(record=record_to_pb(e.record), part=e.part, index=e.inclusion.index,
                           path=list(e.inclusion.path))


def entry_from_pb(m: pb.ReceiptEntry, size: int = 0) -> ReceiptEntry:
    """``size`` is filled in from the part's header by :func:`verify_receipt`."""
    return ReceiptEntry(record_from_pb(m.record), m.part,
                        InclusionProof(m.index, size, tuple(m.path)))


def build_receipt(relayer_id: str, customer: str, epoch: int,
                  parts: Sequence[VolumeProof], anchor_vertices: Sequence[bytes],
                  signer: SigningKey) -> VolumeReceipt:
    """The signed receipt of ``customer`` from the epoch's proofs (with records)."""
    if not parts or len(parts) != len(anchor_vertices):
        raise ProofError(f"epoch {epoch}: {len(parts)} proofs, {len(anchor_vertices)} anchors")
    entries = []
    for p in parts:
        mine = [i for i, r in enumerate(p.records) if r.customer == customer]
        if mine:  # one tree per part, then O(log n) per path
            tree = Tree([r.canonical() for r in p.records])
            entries += [ReceiptEntry(p.records[i], p.part, tree.proof(i)) for i in mine]
    unsigned = VolumeReceipt(relayer_id, customer, epoch, tuple(entries),
                             tuple(p.header() for p in parts), tuple(anchor_vertices),
                             signer.key_id)
    return replace(unsigned, signature=signer.sign(unsigned.signed_bytes(),
                                                   context=RECEIPT_CONTEXT))


def check_anchor_vertex(encoded: bytes, header: VolumeProof, key: VerifyKey) -> Vertex:
    """The vertex anchors exactly ``header``, authored by its relayer, signed by ``key``."""
    try:
        v = decode(encoded)
        payload = decode_payload(v.kind, v.payload)
    except LedgerError as exc:
        raise ReceiptInvalid(f"anchor vertex of part {header.part}: {exc}") from None
    if v.kind != VertexKind.VOLUME_PROOF or v.author != header.relayer_id:
        raise ReceiptInvalid(f"anchor vertex of part {header.part} is not a volume proof "
                             f"by {header.relayer_id}")
    try:
        key.verify(v.signature, v.canonical(), context=VERTEX_DOMAIN)
    except SignatureInvalid:
        raise ReceiptInvalid(f"anchor vertex of part {header.part}: bad signature") from None
    if (not isinstance(payload, OpaqueRecord) or payload.content_type != PROOF_CONTENT_TYPE
            or payload.body != proof_to_pb(header.header()).SerializeToString()):
        raise ReceiptInvalid(f"anchor vertex of part {header.part} anchors another proof")
    return v


def verify_receipt(receipt: VolumeReceipt, key: VerifyKey) -> list[bytes]:
    """Check everything the receipt says with the relayer's public key ``key``; returns
    the anchoring vertex ids (one per part) for a Layer-0 check."""
    if receipt.signer_key_id != key.key_id:
        raise ReceiptInvalid("receipt was signed by a different key")
    try:
        key.verify(receipt.signature, receipt.signed_bytes(), context=RECEIPT_CONTEXT)
    except SignatureInvalid:
        raise ReceiptInvalid("receipt signature does not verify") from None
    parts = {p.part: p for p in receipt.proofs}
    if (not receipt.proofs or len(parts) != len(receipt.proofs)
            or sorted(parts) != list(range(receipt.proofs[0].parts))
            or len(receipt.anchor_vertices) != len(receipt.proofs)):
        raise ReceiptInvalid("receipt does not carry every part of the epoch with its anchor")
    vids = []
    for header, encoded in zip(receipt.proofs, receipt.anchor_vertices, strict=True):
        if header.epoch != receipt.epoch or header.relayer_id != receipt.relayer_id:
            raise ReceiptInvalid(f"proof part {header.part} is for another epoch or relayer")
        try:
            verify_volume_proof(header, key)
        except ProofError as exc:
            raise ReceiptInvalid(str(exc)) from None
        vids.append(check_anchor_vertex(encoded, header, key).id)
    for e in receipt.entries:
        if e.record.customer != receipt.customer or e.part not in parts:
            raise ReceiptInvalid(f"entry {e.record.channel} is not the customer's or has no part")
        header = parts[e.part]
        try:
            verify_inclusion(e.record, replace(e.inclusion, size=header.record_count), header)
        except ProofError as exc:
            raise ReceiptInvalid(f"record {e.record.customer}/{e.record.channel}: {exc}") from None
    return vids


def verify_receipt_layer0(vertex_ids: Iterable[bytes], records: Iterable[EpochRecord],
                          key: VerifyKey) -> list[EpochAnchor]:
    """Each vertex id is committed by a Layer-0 envelope in ``records`` signed by ``key``."""
    want = list(vertex_ids)
    found: dict[bytes, EpochAnchor] = {}
    for rec in records:
        hits = [v for v in want if v not in found and v in rec.ids]
        if not hits:
            continue
        try:
            verify_record(rec, key)
            for vid in hits:
                found[vid] = verify_anchored(vid, rec.proof(vid), rec.envelope, key)
        except Layer0Error as exc:
            raise ReceiptInvalid(f"layer-0 envelope: {exc}") from None
    missing = [v.hex()[:16] for v in want if v not in found]
    if missing:
        raise ReceiptInvalid(f"no layer-0 envelope commits vertex {', '.join(missing)}")
    return [found[v] for v in want]


__all__ = ["MAX_RECEIPT", "RECEIPT_CONTEXT", "ReceiptEntry", "ReceiptInvalid", "VolumeReceipt",
           "build_receipt", "check_anchor_vertex", "verify_receipt", "verify_receipt_layer0"]
