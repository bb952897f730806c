"""Volume proofs on disk: what a relayer proved and where the proof is anchored.

One file per epoch, ``<dir>/<epoch>.proof``: the QS-DAG vertex id of the anchor and
the ``VolumeProof`` protobuf, each u32-length-prefixed (an epoch split into several
trees has one file per further part, ``<epoch>.<part>.proof``). Written atomically
(temp file, fsync, rename, directory fsync) *after* the anchor.

Anchoring is made idempotent by an *intent* written before it:
``<dir>/<epoch>.intent`` holds the author counter the anchor will take and the signed
proof headers about to be anchored (fsynced, like the proof files; the records are
rebuilt from the persisted volume, and must give the same roots). The node anchors, writes
the proof files, then deletes the intent. After a crash anywhere in between, the
intent is found at start and finished: a proof already in the ledger (looked up from
the recorded counter) is taken as is, a missing one is anchored — so an epoch is
anchored exactly once. Files are read with a size bound and parsed strictly; a
damaged one is a :class:`~pqcnet.relayer.errors.ProofError` naming it.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import DecodeError

from pqcnet._util.files import read_bounded
from pqcnet.crypto.pqc import length_prefixed
from pqcnet.identity.keystore import atomic_write
from pqcnet.proto import relayer_pb2 as pb
from pqcnet.relayer.errors import ProofError
from pqcnet.relayer.proof import VolumeProof, proof_from_pb, proof_to_pb, record_to_pb

#: Largest proof file read: a proof carries one volume record per (customer, channel,
#: qos) of its epoch, ~100 bytes each, so this allows ~600k of them per epoch.
MAX_PROOF_FILE = 64 << 20
#: Most trees one epoch is split into (bounds an intent file, headers only).
MAX_PARTS = 64
#: Largest intent file read (MAX_PARTS headers of well under 4 KiB each).
MAX_INTENT_FILE = MAX_PARTS * 4096
SUFFIX = ".proof"
INTENT_SUFFIX = ".intent"
#: the key of ``VolumeProof.records`` (field 4, length-delimited) on the wire
_RECORDS_KEY = bytes([4 << 3 | 2])


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_proof(proof: VolumeProof) -> bytes:
    """``proof_to_pb(proof).SerializeToString()``'s message, records encoded one at a time.

    The protobuf message of a 300k-record epoch holds 300k sub-messages at once (about
    as much memory as the meter's whole epoch); this holds one. A repeated field may
    follow the others on the wire, so any protobuf parser reads the same message.
    """
    head = proof_to_pb(proof.header()).SerializeToString()
    body = bytearray(head)
    for r in proof.records:
        rec = record_to_pb(r).SerializeToString()
        body += _RECORDS_KEY
        body += _varint(len(rec))
        body += rec
    return bytes(body)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename / unlink itself is durable
    finally:
        os.close(fd)


def _split_lp(raw: bytes) -> list[bytes]:
    """Inverse of ``length_prefixed`` (ValueError when truncated)."""
    out, i = [], 0
    while i < len(raw):
        (n,) = struct.unpack_from(">I", raw, i)
        part = raw[i + 4 : i + 4 + n]
        if len(part) != n:
            raise ValueError("truncated")
        out.append(part)
        i += 4 + n
    return out


@dataclass(frozen=True, slots=True)
class Intent:
    """An epoch about to be anchored: its signed proof headers (records are stripped
    when written) and the first author counter."""

    epoch: int
    counter: int
    proofs: tuple[VolumeProof, ...]


class ProofStore:
    """The proof files of one relayer (``<data_dir>/proofs``)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, epoch: int, part: int = 0) -> Path:
        return self.directory / (f"{epoch}{SUFFIX}" if part == 0 else f"{epoch}.{part}{SUFFIX}")

    def write(self, proof: VolumeProof, vertex_id: bytes) -> None:
        """Store ``proof`` anchored at ``vertex_id`` (atomic; replaces an older file)."""
        body = encode_proof(proof)
        atomic_write(self.path(proof.epoch, proof.part), length_prefixed(vertex_id, body))
        _fsync_dir(self.directory)

    # ------------------------------------------------------------------ intents
    def intent_path(self, epoch: int) -> Path:
        return self.directory / f"{epoch}{INTENT_SUFFIX}"

    def write_intent(self, intent: Intent) -> None:
        """Durably record ``intent`` before anything is anchored (atomic, fsynced)."""
        if len(intent.proofs) > MAX_PARTS:
            raise ProofError(f"epoch {intent.epoch}: {len(intent.proofs)} trees; at most "
                             f"{MAX_PARTS}")
        bodies = [proof_to_pb(p.header()).SerializeToString() for p in intent.proofs]
        atomic_write(self.intent_path(intent.epoch),
                     length_prefixed(intent.counter.to_bytes(8, "big"), *bodies))
        _fsync_dir(self.directory)

    def intent_epochs(self) -> list[int]:
        """Epochs with an unfinished anchoring intent, ascending."""
        if not self.directory.is_dir():
            return []
        return sorted(int(p.stem) for p in self.directory.glob(f"*{INTENT_SUFFIX}")
                      if p.stem.isdigit())

    def read_intent(self, epoch: int) -> Intent:
        path = self.intent_path(epoch)
        raw = read_bounded(path, MAX_INTENT_FILE, ProofError)
        try:
            head, *bodies = _split_lp(raw)
            if len(head) != 8 or not bodies:
                raise ValueError("no counter or no proofs")
            proofs = []
            for body in bodies:
                msg = pb.VolumeProof()
                msg.ParseFromString(body)
                proofs.append(proof_from_pb(msg))
        except (ValueError, struct.error, DecodeError) as exc:
            raise ProofError(f"intent file {path} is damaged: {exc}") from None
        if any(p.epoch != epoch for p in proofs):
            raise ProofError(f"intent file {path} holds another epoch")
        return Intent(epoch, int.from_bytes(head, "big"), tuple(proofs))

    def clear_intent(self, epoch: int) -> None:
        self.intent_path(epoch).unlink(missing_ok=True)
        _fsync_dir(self.directory)

    def epochs(self) -> list[int]:
        """Epochs with a proof file, ascending."""
        if not self.directory.is_dir():
            return []
        return sorted(int(p.stem) for p in self.directory.glob(f"*{SUFFIX}") if p.stem.isdigit())

    def read(self, epoch: int, part: int = 0) -> tuple[VolumeProof, bytes]:
        """The proof of ``epoch`` (its part ``part``) and its anchor vertex id."""
        path = self.path(epoch, part)
        raw = read_bounded(path, MAX_PROOF_FILE, ProofError)
        try:
            (n,) = struct.unpack_from(">I", raw, 0)
            vid = raw[4 : 4 + n]
            (m,) = struct.unpack_from(">I", raw, 4 + n)
            body = raw[8 + n :]
            if len(vid) != n or len(body) != m:
                raise ValueError("truncated")
            msg = pb.VolumeProof()
            msg.ParseFromString(body)
            proof = proof_from_pb(msg)
        except (ValueError, struct.error, DecodeError) as exc:
            raise ProofError(f"proof file {path} is damaged: {exc}") from None
        if proof.epoch != epoch or proof.part != part:
            raise ProofError(f"proof file {path} holds epoch {proof.epoch} part {proof.part}")
        return proof, vid

    def read_parts(self, epoch: int) -> list[tuple[VolumeProof, bytes]]:
        """Every part of ``epoch`` with its anchor, part 0 first."""
        first = self.read(epoch)
        return [first] + [self.read(epoch, i) for i in range(1, first[0].parts)]

    def load(self) -> Iterator[tuple[VolumeProof, bytes]]:
        """Every stored proof (every part) with its anchor, in epoch order; epochs with
        an unfinished intent are left to the node to finish."""
        pending = set(self.intent_epochs())
        for epoch in self.epochs():
            if epoch not in pending:
                yield from self.read_parts(epoch)

    def prune(self, epochs: Iterable[int]) -> None:
        """Delete the proof files of ``epochs`` (missing ones are fine)."""
        for epoch in epochs:
            self.path(epoch).unlink(missing_ok=True)
            for extra in self.directory.glob(f"{epoch}.*{SUFFIX}"):
                extra.unlink(missing_ok=True)


__all__ = ["MAX_INTENT_FILE", "MAX_PARTS", "MAX_PROOF_FILE", "Intent", "ProofStore", "encode_proof"]
