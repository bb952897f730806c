"""Volume proofs on disk: what a relayer proved and where the proof is anchored.

One file per epoch, ``<dir>/<epoch>.proof``: the QS-DAG vertex id of the anchor and
the ``VolumeProof`` protobuf, each u32-length-prefixed. Written atomically (temp
file, fsync, rename) *after* the anchor, so after a crash an epoch is either proven
on disk or proven again — never anchored twice (:meth:`ProofStore.load` tells the node
which epochs it already proved). Files are read with a size bound and parsed
strictly; a damaged one is a :class:`~pqcnet.relayer.errors.ProofError` naming it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

from google.protobuf.message import DecodeError

from pqcnet.crypto.pqc import length_prefixed
from pqcnet.identity.keystore import atomic_write
from pqcnet.proto import relayer_pb2 as pb
from pqcnet.relayer.errors import ProofError
from pqcnet.relayer.proof import VolumeProof, proof_from_pb, proof_to_pb

#: Largest proof file read: a proof carries one volume record per (customer, channel,
#: qos) of its epoch, ~100 bytes each, so this allows ~600k of them per epoch.
MAX_PROOF_FILE = 64 << 20
SUFFIX = ".proof"


class ProofStore:
    """The proof files of one relayer (``<data_dir>/proofs``)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, epoch: int) -> Path:
        return self.directory / f"{epoch}{SUFFIX}"

    def write(self, proof: VolumeProof, vertex_id: bytes) -> None:
        """Store ``proof`` anchored at ``vertex_id`` (atomic; replaces an older file)."""
        body = proof_to_pb(proof).SerializeToString()
        atomic_write(self.path(proof.epoch), length_prefixed(vertex_id, body))

    def epochs(self) -> list[int]:
        """Epochs with a proof file, ascending."""
        if not self.directory.is_dir():
            return []
        return sorted(int(p.stem) for p in self.directory.glob(f"*{SUFFIX}") if p.stem.isdigit())

    def read(self, epoch: int) -> tuple[VolumeProof, bytes]:
        """The proof of ``epoch`` and its anchor vertex id."""
        path = self.path(epoch)
        try:
            with path.open("rb") as fh:
                raw = fh.read(MAX_PROOF_FILE + 1)
        except OSError as exc:
            raise ProofError(f"cannot read proof file {path}: {exc.strerror}") from None
        try:
            if len(raw) > MAX_PROOF_FILE:
                raise ValueError(f"larger than {MAX_PROOF_FILE} bytes")
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
        if proof.epoch != epoch:
            raise ProofError(f"proof file {path} holds epoch {proof.epoch}")
        return proof, vid

    def load(self) -> Iterator[tuple[VolumeProof, bytes]]:
        """Every stored proof with its anchor, in epoch order."""
        for epoch in self.epochs():
            yield self.read(epoch)

    def prune(self, epochs: Iterable[int]) -> None:
        """Delete the proof files of ``epochs`` (missing ones are fine)."""
        for epoch in epochs:
            self.path(epoch).unlink(missing_ok=True)


__all__ = ["MAX_PROOF_FILE", "ProofStore"]
