"""Client-signed acknowledgement counters, and volume claims checked against them.

A relayer signs its own volume proofs, so on their own they prove only what the
relayer *says* it carried. The clients at both ends count too (decision 0014): the
publisher SDK counts the frames the relayer accepted, the subscriber SDK the frames
it took and acknowledged, per (customer, channel, epoch), and each signs its counters
with its own identity key (:class:`SignedAckCounter`, FIPS 204 context
``pqcnet/relayer/ack-counter/v1``, its certificate chain attached). The SDKs send them
to the relayer, which keeps the highest per signer (:class:`CounterBook`).

A claim — one record of a signed volume proof — is then checked by
:func:`check_claims` against the *final* subscriber counters for the same topic and
epoch (the meter counts what subscribers acknowledged): ``supported`` when within the
tolerance, ``overclaimed`` above it, ``unsupported`` when no client signed anything for
it (a relayer whose subscriber never acks cannot prove its claim; it is not slashed,
but nothing backs it either). An over-claim becomes :class:`VolumeOverclaim`
evidence — the relayer's signed header, the record with its inclusion proof, and the
client's signed counter — anchored in the QS-DAG by whoever found it
(:func:`report_overclaim`); :func:`overclaim_rule` is the
:data:`~pqcnet.mesh.pipeline.EvidenceRule` that turns each valid one into a slashing
proposal, on every node the same.

Epochs are ``floor(time / epoch_seconds)`` on each side's own clock, so frames acked
right at an epoch boundary may be counted in neighbouring epochs by the relayer and
the client; the tolerance (ratio and absolute frames) absorbs that, and a counter is
``final`` only after the client's clock passed the epoch's end plus a grace.
"""

from __future__ import annotations

import builtins
import hashlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from cryptography import x509
from google.protobuf.message import DecodeError

from pqcnet.crypto.errors import SignatureInvalid
from pqcnet.crypto.pqc import SigningKey, VerifyKey, length_prefixed
from pqcnet.errors import PqcnetError
from pqcnet.identity import NodeIdentity, SpiffeId
from pqcnet.identity.certs import is_signed_by, load_certs, spiffe_id_of, verify_key_of
from pqcnet.identity.keystore import atomic_write
from pqcnet.mesh.messages import SlashingProposal
from pqcnet.proto import relayer_pb2 as pb
from pqcnet.qsdag import Ledger, OpaqueRecord, VertexKind
from pqcnet.qsdag.errors import LedgerError
from pqcnet.relayer.errors import CounterInvalid, ProofError
from pqcnet.relayer.frame import Frame
from pqcnet.relayer.metering import VolumeRecord
from pqcnet.relayer.proof import (
    VolumeProof,
    inclusion_proof,
    proof_from_pb,
    proof_to_pb,
    verify_inclusion,
    verify_volume_proof,
)
from pqcnet.relayer.receipts import ReceiptEntry, entry_from_pb, entry_to_pb

COUNTER_CONTEXT = b"pqcnet/relayer/ack-counter/v1"
OVERCLAIM_CONTENT_TYPE = "pqcnet.relayer.VolumeOverclaim"
#: Counters the relayer keeps (signer x topic x epoch); bounds memory per relayer.
MAX_COUNTERS = 100_000
#: Counters one AckCounters message may carry.
MAX_COUNTERS_PER_MESSAGE = 1024
#: Largest counter file read back at start (one epoch's counters, ~6 KiB each with
#: the signer's chain).
MAX_COUNTER_FILE = 256 << 20
#: Seconds after an epoch's end (client clock) before its counter is signed ``final``.
FINAL_GRACE = 2.0
#: Default tolerance: a claim may exceed the signed count by this ratio ...
TOLERANCE_RATIO = 0.01
#: ... plus this many frames (boundary frames counted in the neighbouring epoch).
TOLERANCE_FRAMES = 2

Role = Literal["publisher", "subscriber"]
ClaimStatus = Literal["supported", "overclaimed", "unsupported"]
#: chain PEM -> (leaf key, SPIFFE id) once checked against the mesh CA
Trust = Callable[[bytes], tuple[VerifyKey, SpiffeId]]


@dataclass(frozen=True, slots=True)
class AckCounter:
    """What one client counted for one topic in one epoch (cumulative)."""

    role: str
    customer: str
    channel: str
    epoch: int
    frames: int
    bytes: int
    final: bool = False

    def canonical(self) -> builtins.bytes:
        return length_prefixed(self.role.encode(), self.customer.encode(),
                               self.channel.encode(), self.epoch.to_bytes(8, "big"),
                               self.frames.to_bytes(8, "big"), self.bytes.to_bytes(8, "big"),
                               b"\x01" if self.final else b"\x00")


@dataclass(frozen=True, slots=True)
class SignedAckCounter:
    """An :class:`AckCounter` signed by a client identity (its chain attached)."""

    counter: AckCounter
    cert_chain_pem: bytes
    signature: bytes

    def to_pb(self) -> pb.SignedAckCounter:
        c = self.counter
        return pb.SignedAckCounter(
            counter=pb.AckCounter(role=c.role, customer=c.customer, channel=c.channel,
                                  epoch=c.epoch, frames=c.frames, bytes=c.bytes, final=c.final),
            cert_chain_pem=self.cert_chain_pem, signature=self.signature)

    @classmethod
    def from_pb(cls, m: pb.SignedAckCounter) -> SignedAckCounter:
        c = m.counter
        return cls(AckCounter(c.role, c.customer, c.channel, c.epoch, c.frames, c.bytes,
                              c.final), m.cert_chain_pem, m.signature)

    def signer(self) -> str:
        """The signer's SPIFFE id as its certificate names it (not yet trusted)."""
        try:
            return str(spiffe_id_of(load_certs(self.cert_chain_pem, "counter chain")[0]))
        except (PqcnetError, IndexError) as exc:
            raise CounterInvalid(f"counter certificate: {exc}") from None

    def verify(self, trust: Trust) -> SpiffeId:
        """Signature under a CA-trusted certificate whose tenant is the customer."""
        key, spiffe = trust(self.cert_chain_pem)
        try:
            key.verify(self.signature, self.counter.canonical(), context=COUNTER_CONTEXT)
        except SignatureInvalid:
            raise CounterInvalid("ack counter signature does not verify") from None
        if spiffe.tenant != self.counter.customer:
            raise CounterInvalid(f"ack counter for customer {self.counter.customer!r} signed "
                                 f"by tenant {spiffe.tenant!r}")
        if self.counter.role not in ("publisher", "subscriber"):
            raise CounterInvalid(f"ack counter role {self.counter.role!r}")
        return spiffe


def sign_counter(counter: AckCounter, identity: NodeIdentity) -> SignedAckCounter:
    return SignedAckCounter(counter, identity.cert_chain_pem,
                            identity.key.sign(counter.canonical(), context=COUNTER_CONTEXT))


def ca_trust(ca_certs: Sequence[x509.Certificate]) -> Trust:
    """A :data:`Trust` accepting leaves issued directly by one of ``ca_certs``."""
    def check(chain_pem: bytes) -> tuple[VerifyKey, SpiffeId]:
        try:
            leaf = load_certs(chain_pem, "counter chain")[0]
            if not any(is_signed_by(leaf, ca) for ca in ca_certs):
                raise CounterInvalid("counter certificate is not issued by the mesh CA")
            return verify_key_of(leaf), spiffe_id_of(leaf)
        except CounterInvalid:
            raise
        except (PqcnetError, IndexError) as exc:
            raise CounterInvalid(f"counter certificate: {exc}") from None
    return check


# ------------------------------------------------------------------ client side


class CounterTracker:
    """A client's per-(customer, channel, epoch) counts of acknowledged frames."""

    def __init__(self, role: Role, identity: NodeIdentity, epoch_seconds: float = 60.0, *,
                 clock: Callable[[], float] = time.time, final_grace: float = FINAL_GRACE,
                 max_open: int = MAX_COUNTERS_PER_MESSAGE) -> None:
        self.role, self.identity = role, identity
        self.epoch_seconds, self.clock, self.final_grace = epoch_seconds, clock, final_grace
        self.max_open = max_open
        self._counts: dict[tuple[str, str, int], list[int]] = {}
        self._dirty: set[tuple[str, str, int]] = set()

    def count(self, frames: Iterable[Frame]) -> None:
        """Add frames the client just acknowledged (or saw accepted)."""
        epoch = int(self.clock() // self.epoch_seconds)
        for f in frames:
            key = (f.customer, f.channel, epoch)
            agg = self._counts.setdefault(key, [0, 0])
            agg[0] += 1
            agg[1] += len(f.payload)
            self._dirty.add(key)

    def take(self) -> list[SignedAckCounter]:
        """Signed counters for what changed, plus ``final`` ones for epochs now closed
        (which are then forgotten). Empty when there is nothing new."""
        now = self.clock()
        closed_before = int((now - self.final_grace) // self.epoch_seconds)
        out = []
        for key in sorted(self._counts):
            customer, channel, epoch = key
            final = epoch < closed_before
            if not final and key not in self._dirty:
                continue
            frames, nbytes = self._counts[key]
            out.append(sign_counter(AckCounter(self.role, customer, channel, epoch, frames,
                                               nbytes, final), self.identity))
            if final:
                del self._counts[key]
            if len(out) >= self.max_open:
                break
        self._dirty.clear()
        return out


# ------------------------------------------------------------------ relayer side


class CounterBook:
    """The signed counters a relayer received, highest (final first) per signer/topic/epoch."""

    def __init__(self, trust: Trust, *, max_counters: int = MAX_COUNTERS) -> None:
        self.trust = trust
        self.max_counters = max_counters
        self._by_key: dict[tuple[str, str, str, str, int], SignedAckCounter] = {}
        self.refused = 0
        #: epochs changed since :meth:`take_dirty` (what a store must rewrite)
        self._dirty: set[int] = set()

    def add(self, counters: Iterable[SignedAckCounter], *, peer: str | None = None) -> int:
        """Keep valid counters (signed by ``peer`` when given); returns how many were
        kept. Invalid ones are counted in :attr:`refused`."""
        kept = 0
        for sc in counters:
            try:
                spiffe = sc.verify(self.trust)
                if peer is not None and str(spiffe) != peer:
                    raise CounterInvalid("ack counter signed by another identity than the peer")
            except CounterInvalid:
                self.refused += 1
                continue
            c = sc.counter
            key = (c.role, str(spiffe), c.customer, c.channel, c.epoch)
            old = self._by_key.get(key)
            if old is not None and (old.counter.final, old.counter.frames) >= (c.final, c.frames):
                continue
            if old is None and len(self._by_key) >= self.max_counters:
                del self._by_key[min(self._by_key, key=lambda k: k[4])]  # oldest epoch goes
            self._by_key[key] = sc
            self._dirty.add(c.epoch)
            kept += 1
        return kept

    def take_dirty(self) -> list[int]:
        dirty, self._dirty = sorted(self._dirty), set()
        return dirty

    def for_epoch(self, epoch: int) -> list[SignedAckCounter]:
        return [sc for key, sc in sorted(self._by_key.items()) if key[4] == epoch]

    def for_topic(self, customer: str, channel: str, epoch: int) -> list[SignedAckCounter]:
        return [sc for (_r, _s, c, ch, e), sc in self._by_key.items()
                if (c, ch, e) == (customer, channel, epoch)]

    def forget_before(self, epoch: int) -> None:
        for key in [k for k in self._by_key if k[4] < epoch]:
            del self._by_key[key]

    def __len__(self) -> int:
        return len(self._by_key)


class CounterStore:
    """The counter book on disk: ``<dir>/<epoch>.counters`` (an AckCounters message per
    epoch, rewritten atomically and fsynced when it changed), so a restarted relayer
    still holds what its clients signed. Loaded counters are verified again."""

    SUFFIX = ".counters"

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def save(self, book: CounterBook) -> int:
        """Write the epochs that changed; returns how many files were written."""
        dirty = book.take_dirty()
        for epoch in dirty:
            msg = pb.AckCounters(counters=[sc.to_pb() for sc in book.for_epoch(epoch)])
            atomic_write(self.directory / f"{epoch}{self.SUFFIX}", msg.SerializeToString())
        return len(dirty)

    def load(self, book: CounterBook) -> int:
        """Add every stored counter to ``book``; a damaged file is skipped (logged by
        the caller through the returned count). Returns how many were kept."""
        kept = 0
        if not self.directory.is_dir():
            return 0
        for path in sorted(self.directory.glob(f"*{self.SUFFIX}")):
            try:
                with path.open("rb") as fh:
                    raw = fh.read(MAX_COUNTER_FILE + 1)
                if len(raw) > MAX_COUNTER_FILE:
                    continue
                msg = pb.AckCounters()
                msg.ParseFromString(raw)
            except (OSError, DecodeError):
                continue
            kept += book.add(SignedAckCounter.from_pb(m) for m in msg.counters)
        book.take_dirty()
        return kept

    def prune(self, before: int) -> None:
        if not self.directory.is_dir():
            return
        for path in self.directory.glob(f"*{self.SUFFIX}"):
            if path.stem.isdigit() and int(path.stem) < before:
                path.unlink(missing_ok=True)


@dataclass(frozen=True, slots=True)
class Tolerance:
    """How far a claim may exceed the signed count before it is an over-claim."""

    ratio: float = TOLERANCE_RATIO
    frames: int = TOLERANCE_FRAMES

    def allows(self, claimed: int, signed: int) -> bool:
        return claimed <= signed * (1 + self.ratio) + self.frames


@dataclass(frozen=True, slots=True)
class ClaimCheck:
    """One claimed record against the final subscriber counters for it."""

    record: VolumeRecord
    status: ClaimStatus
    signed_frames: int
    counter: SignedAckCounter | None
    """the counter with the most frames (the one evidence is built on)"""


def check_claims(records: Iterable[VolumeRecord], book: CounterBook,
                 tolerance: Tolerance = Tolerance()) -> list[ClaimCheck]:
    """Each record of an epoch's proof: supported, overclaimed or unsupported.

    The meter counts each frame once however many subscribers took it, so a claim is
    backed by the *largest* final subscriber counter for its topic and epoch. Each
    record is compared on its own (as evidence is verified); a topic metered under
    several QoS levels is compared per record against the topic's counter."""
    out = []
    for r in records:
        finals = [sc for sc in book.for_topic(r.customer, r.channel, r.epoch)
                  if sc.counter.role == "subscriber" and sc.counter.final]
        if not finals:
            out.append(ClaimCheck(r, "unsupported", 0, None))
            continue
        best = max(finals, key=lambda sc: sc.counter.frames)
        ok = tolerance.allows(r.frames, best.counter.frames)
        out.append(ClaimCheck(r, "supported" if ok else "overclaimed", best.counter.frames,
                              best))
    return out


# ------------------------------------------------------------------ evidence


@dataclass(frozen=True, slots=True)
class VolumeOverclaim:
    """A relayer's signed claim above a client's signed final counter."""

    proof: VolumeProof
    entry: ReceiptEntry
    counter: SignedAckCounter
    tolerance: Tolerance

    def encode(self) -> bytes:
        return pb.VolumeOverclaim(
            proof=proof_to_pb(self.proof.header()), entry=entry_to_pb(self.entry),
            counter=self.counter.to_pb(), tolerance_ratio=self.tolerance.ratio,
            tolerance_frames=self.tolerance.frames).SerializeToString()

    @classmethod
    def decode(cls, data: bytes) -> VolumeOverclaim:
        m = pb.VolumeOverclaim()
        try:
            m.ParseFromString(data)
        except DecodeError:
            raise CounterInvalid("over-claim evidence does not decode") from None
        proof = proof_from_pb(m.proof)
        entry = entry_from_pb(m.entry, proof.record_count)
        return cls(proof, entry, SignedAckCounter.from_pb(m.counter),
                   Tolerance(m.tolerance_ratio, m.tolerance_frames))

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(b"pqcnet/relayer/overclaim/v1" + self.encode()).digest()


def verify_overclaim(ev: VolumeOverclaim, relayer_key: VerifyKey, trust: Trust,
                     tolerance: Tolerance) -> None:
    """Raise :class:`CounterInvalid` unless ``ev`` proves an over-claim beyond
    ``tolerance`` (the verifier's own tolerance, never one lower than the evidence's)."""
    try:
        verify_volume_proof(ev.proof, relayer_key)
        verify_inclusion(ev.entry.record, replace(ev.entry.inclusion,
                                                  size=ev.proof.record_count), ev.proof)
    except ProofError as exc:
        raise CounterInvalid(f"over-claim evidence: relayer proof: {exc}") from None
    ev.counter.verify(trust)
    c, r = ev.counter.counter, ev.entry.record
    if c.role != "subscriber" or not c.final:
        raise CounterInvalid("over-claim evidence needs a final subscriber counter")
    if (c.customer, c.channel, c.epoch) != (r.customer, r.channel, r.epoch):
        raise CounterInvalid("the counter is for another topic or epoch than the claim")
    strict = Tolerance(max(tolerance.ratio, ev.tolerance.ratio),
                       max(tolerance.frames, ev.tolerance.frames))
    if strict.allows(r.frames, c.frames):
        raise CounterInvalid(f"claim of {r.frames} frames is within tolerance of the signed "
                             f"{c.frames}")


def find_overclaims(proofs: Sequence[VolumeProof], book: CounterBook,
                    tolerance: Tolerance = Tolerance()) -> list[VolumeOverclaim]:
    """Evidence for every over-claimed record of an epoch's proofs (with records)."""
    out = []
    for p in proofs:
        for i, check in enumerate(check_claims(p.records, book, tolerance)):
            if check.status == "overclaimed" and check.counter is not None:
                out.append(VolumeOverclaim(p.header(), ReceiptEntry(
                    check.record, p.part, inclusion_proof(p, i)), check.counter, tolerance))
    return out


def report_overclaim(ledger: Ledger, ev: VolumeOverclaim, reporter: str,
                     signer: SigningKey) -> bytes:
    """Anchor ``ev`` as a signed vertex by ``reporter``; returns the vertex id.

    The QS-DAG's ``SLASHING_EVIDENCE`` payload is the equivocation message, so
    over-claims travel as an :class:`OpaqueRecord` (content type
    :data:`OVERCLAIM_CONTENT_TYPE`, subject = the relayer) in a ``PERFORMANCE_REPORT``
    vertex — the kind that already carries relayer volume statements (decision 0014).
    """
    rec = OpaqueRecord(OVERCLAIM_CONTENT_TYPE, ev.proof.relayer_id, ev.encode())
    return ledger.append(VertexKind.PERFORMANCE_REPORT, rec, reporter, signer).id


def overclaim_rule(trust: Trust, tolerance: Tolerance = Tolerance()
                   ) -> Callable[[Ledger], list[SlashingProposal]]:
    """An :data:`~pqcnet.mesh.pipeline.EvidenceRule`: each valid over-claim anchored in
    the ledger becomes a ``volume_overclaim`` proposal against the relayer (a pure
    function of ledger content, so every node proposes the same)."""
    position = [0]

    def rule(ledger: Ledger) -> list[SlashingProposal]:
        out = []
        end = len(ledger)
        for vid in ledger.ids_range(position[0], end):
            try:
                v = ledger.get(vid)
                if v.kind != VertexKind.PERFORMANCE_REPORT:
                    continue
                payload = ledger.payload(vid)
                if (not isinstance(payload, OpaqueRecord)
                        or payload.content_type != OVERCLAIM_CONTENT_TYPE):
                    continue
                ev = VolumeOverclaim.decode(payload.body)
                key = _relayer_key(ledger, ev.proof)
                verify_overclaim(ev, key, trust, tolerance)
            except (CounterInvalid, LedgerError):
                continue
            r, c = ev.entry.record, ev.counter.counter
            out.append(SlashingProposal(
                ev.proof.relayer_id, "volume_overclaim",
                f"epoch {r.epoch} {r.customer}/{r.channel}: claimed {r.frames} frames, "
                f"client signed {c.frames}", (vid,),
                hashlib.sha256(b"pqcnet/mesh/slashing/v1oc" + ev.digest).digest()[:16]))
        position[0] = end
        return out
    return rule


def _relayer_key(ledger: Ledger, proof: VolumeProof) -> VerifyKey:
    """The relayer's registered key that signed ``proof`` (by key id)."""
    views = ledger.views.key_versions
    current = views.current(proof.relayer_id) or 0
    for version in range(current, 0, -1):
        key = ledger.key_for(proof.relayer_id, version)
        if key is not None and key.key_id == proof.signer_key_id:
            return key
    raise CounterInvalid(f"no registered key of {proof.relayer_id} signed the proof")


__all__ = ["COUNTER_CONTEXT", "FINAL_GRACE", "MAX_COUNTERS", "MAX_COUNTERS_PER_MESSAGE",
           "MAX_COUNTER_FILE",
           "OVERCLAIM_CONTENT_TYPE", "TOLERANCE_FRAMES", "TOLERANCE_RATIO", "AckCounter",
           "ClaimCheck", "CounterBook", "CounterStore", "CounterTracker", "SignedAckCounter",
           "Tolerance",
           "VolumeOverclaim", "ca_trust", "check_claims",
           "find_overclaims", "overclaim_rule", "report_overclaim", "sign_counter",
           "verify_overclaim"]
