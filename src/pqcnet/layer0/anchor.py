"""Batch QS-DAG anchors into signed envelopes and hand them to a sink.

An :class:`Anchorer` takes the ledger's vertex ids in anchoring order, cuts them
into epochs of at most ``epoch_size``, builds an RFC 6962 Merkle root per epoch,
wraps it in an :class:`~pqcnet.layer0.envelope.IBCEnvelope` whose sequence is exactly one
more than the last on that channel, signs it, and submits an :class:`EpochRecord`
(the envelope + the epoch's ids, from which anyone derives inclusion proofs).

The sink is the only seam to the outside (:class:`AnchorSink`): :class:`JsonlSink`
(default, an append-only file, fsynced per record) or a chain client implementing
the same two methods. The sink is also where the channel's last sequence and the
last anchored ledger position are recovered from after a restart, so the anchorer
keeps no state of its own.

Layer-0 does not import :mod:`qsdag`: it needs only :class:`AnchorSource`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pqcnet._util.files import cut_torn_tail
from pqcnet.crypto.pqc import SigningKey, VerifyKey
from pqcnet.layer0.envelope import EpochAnchor, IBCEnvelope, make_envelope, verify_envelope
from pqcnet.layer0.errors import EnvelopeInvalid, ProofInvalid, SequenceError
from pqcnet.layer0.merkle import (
    MAX_LEAVES,
    InclusionProof,
    inclusion_proof,
    merkle_root,
    verify_inclusion,
)

#: Default vertices per epoch: bounds record size (~65 bytes per id in JSONL).
DEFAULT_EPOCH_SIZE = 1024


class AnchorSource(Protocol):
    """What the anchorer reads from a ledger (``pqcnet.qsdag.Ledger`` satisfies it)."""

    @property
    def network(self) -> str | None: ...

    def __len__(self) -> int: ...

    def ids_range(self, start: int, stop: int) -> list[bytes]: ...


@dataclass(frozen=True, slots=True)
class EpochRecord:
    """One submitted epoch: the envelope and the vertex ids it commits to."""

    envelope: IBCEnvelope
    ids: tuple[bytes, ...]

    @property
    def anchor(self) -> EpochAnchor:
        return EpochAnchor.decode(self.envelope.data)

    def proof(self, vertex_id: bytes) -> InclusionProof:
        """Inclusion proof of ``vertex_id`` in this epoch's root."""
        try:
            index = self.ids.index(vertex_id)
        except ValueError:
            raise ProofInvalid(f"vertex {vertex_id.hex()[:16]} is not in epoch "
                               f"{self.anchor.epoch}") from None
        return inclusion_proof(self.ids, index)

    def to_json(self) -> dict[str, object]:
        return {"envelope": self.envelope.to_json(), "ids": [i.hex() for i in self.ids]}

    @classmethod
    def from_json(cls, obj: dict[str, object]) -> EpochRecord:
        try:
            ids = tuple(bytes.fromhex(i) for i in obj["ids"])  # type: ignore[attr-defined]
        except (KeyError, TypeError, ValueError) as exc:
            raise EnvelopeInvalid(f"malformed epoch record: {exc}") from None
        return cls(IBCEnvelope.from_json(obj["envelope"]), ids)  # type: ignore[arg-type]


class AnchorSink(Protocol):
    """Where envelopes go: a file, or a chain client."""

    def last(self, channel: str) -> EpochRecord | None:
        """The last record accepted on ``channel`` (None if none)."""

    def submit(self, record: EpochRecord) -> None:
        """Accept a record; raise :class:`SequenceError` unless its sequence is next."""


class JsonlSink:
    """Append-only JSON Lines file, one :class:`EpochRecord` per line, fsynced."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._last: dict[str, EpochRecord] = {}
        cut_torn_tail(self.path)  # so the next record starts a line of its own
        for record in self.records():
            self._last[record.envelope.channel] = record

    def records(self) -> Iterator[EpochRecord]:
        """Every record in the file; a torn last line (crash mid-write) is skipped."""
        if not self.path.exists():
            return
        with self.path.open() as fh:
            for line in fh:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    continue
                yield EpochRecord.from_json(obj)

    def last(self, channel: str) -> EpochRecord | None:
        return self._last.get(channel)

    def submit(self, record: EpochRecord) -> None:
        env = record.envelope
        prev = self._last.get(env.channel)
        want = 1 if prev is None else prev.envelope.sequence + 1
        if env.sequence != want:
            raise SequenceError(f"channel {env.channel}: sequence {env.sequence}, "
                                f"expected {want}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps(record.to_json(), separators=(",", ":")) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self._last[env.channel] = record


class Anchorer:
    """Cuts a ledger into epochs and submits one signed envelope per epoch."""

    def __init__(self, source: AnchorSource, sink: AnchorSink, *, channel: str,
                 signer_id: str, signer: SigningKey, key_version: int = 1,
                 epoch_size: int = DEFAULT_EPOCH_SIZE, timeout_timestamp: int = 0,
                 timeout_height: tuple[int, int] = (0, 0)) -> None:
        if not 1 <= epoch_size <= MAX_LEAVES:
            raise ValueError(f"epoch_size must be 1..{MAX_LEAVES}")
        self.source, self.sink, self.channel = source, sink, channel
        self.signer_id, self.signer, self.key_version = signer_id, signer, key_version
        self.epoch_size = epoch_size
        self.timeout_timestamp, self.timeout_height = timeout_timestamp, timeout_height

    def next_position(self) -> int:
        last = self.sink.last(self.channel)
        return 0 if last is None else last.anchor.last_position + 1

    def pending(self) -> int:
        """Anchored ledger vertices not yet covered by an epoch."""
        return max(0, len(self.source) - self.next_position())

    def anchor_next(self, *, partial: bool = True) -> EpochRecord | None:
        """Submit the next epoch (a partial one too unless ``partial=False``)."""
        start = self.next_position()
        ids = self.source.ids_range(start, start + self.epoch_size)
        if not ids or (not partial and len(ids) < self.epoch_size):
            return None
        last = self.sink.last(self.channel)
        sequence = 1 if last is None else last.envelope.sequence + 1
        anchor = EpochAnchor(self.source.network or "", sequence - 1, start,
                             start + len(ids) - 1, len(ids), merkle_root(ids))
        env = make_envelope(self.channel, sequence, anchor.encode(), self.signer_id,
                            self.signer, key_version=self.key_version,
                            timeout_timestamp=self.timeout_timestamp,
                            timeout_height=self.timeout_height)
        record = EpochRecord(env, tuple(ids))
        self.sink.submit(record)
        return record

    def anchor_all(self, progress: Callable[[int], None] | None = None) -> list[EpochRecord]:
        """Submit epochs until nothing is pending."""
        out = []
        while (record := self.anchor_next()) is not None:
            out.append(record)
            if progress:
                progress(len(record.ids))
        return out


def verify_record(record: EpochRecord, key: VerifyKey) -> EpochAnchor:
    """Check a stored record: envelope commitment + signature, and that its ids
    produce the committed root and count."""
    anchor = verify_envelope(record.envelope, key)
    if anchor.count != len(record.ids) or merkle_root(record.ids) != anchor.merkle_root:
        raise EnvelopeInvalid("record ids do not match the committed Merkle root")
    return anchor


def verify_anchored(vertex_id: bytes, proof: InclusionProof, envelope: IBCEnvelope,
                    key: VerifyKey) -> EpochAnchor:
    """Check that ``vertex_id`` is committed by ``envelope`` (signed by ``key``)."""
    anchor = verify_envelope(envelope, key)
    if proof.size != anchor.count:
        raise ProofInvalid("proof tree size differs from the anchored count")
    verify_inclusion(vertex_id, proof, anchor.merkle_root)
    return anchor
