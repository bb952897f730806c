"""Layer-0 anchoring: commit QS-DAG epochs to an external chain, IBC style.

Per epoch of ledger vertices: an RFC 6962 Merkle root over their ids
(:mod:`pqcnet.layer0.merkle`), carried as ``EpochAnchor`` data in an
:class:`IBCEnvelope` whose ``payload_hash`` is the ICS-04 packet commitment and
whose ML-DSA signature is the anchoring node's (:mod:`pqcnet.layer0.envelope`),
submitted with strictly increasing sequence per channel to a sink
(:mod:`pqcnet.layer0.anchor`: JSONL file by default, or a chain client).

    anchorer = Anchorer(ledger, JsonlSink("anchors.jsonl"), channel="channel-0",
                        signer_id="gov-1", signer=key)
    record = anchorer.anchor_next()
    verify_anchored(vid, record.proof(vid), record.envelope, key.public_key)
"""

from __future__ import annotations

from pqcnet.layer0.anchor import (
    DEFAULT_EPOCH_SIZE,
    Anchorer,
    AnchorSink,
    AnchorSource,
    EpochRecord,
    JsonlSink,
    verify_anchored,
    verify_record,
)
from pqcnet.layer0.envelope import (
    EpochAnchor,
    IBCEnvelope,
    make_envelope,
    packet_commitment,
    verify_envelope,
)
from pqcnet.layer0.errors import EnvelopeInvalid, Layer0Error, ProofInvalid, SequenceError
from pqcnet.layer0.merkle import InclusionProof, inclusion_proof, merkle_root, verify_inclusion

__all__ = [
    "DEFAULT_EPOCH_SIZE", "AnchorSink", "AnchorSource", "Anchorer", "EnvelopeInvalid",
    "EpochAnchor", "EpochRecord", "IBCEnvelope", "InclusionProof", "JsonlSink", "Layer0Error",
    "ProofInvalid", "SequenceError", "inclusion_proof", "make_envelope", "merkle_root",
    "packet_commitment", "verify_anchored", "verify_envelope", "verify_inclusion",
    "verify_record",
]
