"""Signed (and optionally sealed) control envelopes — the sans-IO core of the mesh.

Waku relays whatever it is given, so authenticity lives entirely in the payload:
every control message is a ``ControlEnvelope`` signed with the sender's ML-DSA key
under the FIPS 204 context ``pqcnet/mesh/envelope/v1`` (a signature made for a
QS-DAG vertex or a directive can never pass as an envelope), then optionally sealed
with ``pqcnet.crypto.pqc.seal`` so the Waku network only sees ciphertext.

Receivers run every message through :class:`EnvelopeVerifier.open`, which is pure:
it takes the bytes and ``now_ms`` and either returns a :class:`ControlMessage` or
raises an :class:`~pqcnet.mesh.errors.EnvelopeRejected` whose ``reason`` labels the drop
counter. Checks, in order: decode, unseal (must be for a key we hold, and the signed
recipient must match the seal), sender known and not revoked, signature, then
freshness — a per-sender sliding counter window and a clock-skew bound for direct
messages, or a bounded message-id dedup set for gossip (forwarded gossip arrives late
and out of order by design; its expiry lives in the gossip body).
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum

from pqcnet.crypto.errors import SealError, SignatureInvalid
from pqcnet.crypto.pqc import (
    RecipientKey,
    RecipientPublicKey,
    SigningKey,
    VerifyKey,
    open_sealed,
    seal,
)
from pqcnet.mesh import metrics
from pqcnet.mesh._pb import parse
from pqcnet.mesh.errors import (
    BadSignature,
    ConfigError,
    DuplicateMessage,
    EnvelopeRejected,
    MalformedMessage,
    NotForUs,
    ReplayedMessage,
    RevokedSender,
    StaleMessage,
    UnknownSender,
)
from pqcnet.proto import mesh_pb2

CONTEXT_ENVELOPE = b"pqcnet/mesh/envelope/v1"
WIRE_VERSION = 1
#: Keep envelopes well under go-waku's default 150 KB max message (base64 adds 1/3).
MAX_WIRE_BYTES = 100 * 1024


class MessageType(IntEnum):
    """Mirrors ``pqcnet.mesh.MessageType``."""

    NODE_ANNOUNCEMENT = 1
    ROUTE_ADVERTISEMENT = 2
    GOVERNANCE_DIRECTIVE = 3
    SLASHING_PROPOSAL = 4
    GOSSIP = 5
    DAG_TIPS = 6
    DAG_PULL = 7
    DAG_VERTICES = 8
    RELAY_REPORT = 9


def now_ms() -> int:
    """Wall clock in milliseconds (the only clock read, kept out of the cores)."""
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class ControlMessage:
    """A verified control message."""

    type: MessageType
    #: node id of the signer
    sender: str
    #: per-sender counter
    counter: int
    #: sender's timestamp
    timestamp_ms: int
    #: serialized body (decode according to ``type``)
    body: bytes
    #: which key version of the sender signed
    key_version: int
    #: True when it arrived sealed
    sealed: bool
    #: SHA-256 over the signed envelope: the gossip/dedup identity
    message_id: bytes
    #: forwarding budget left (gossip), outside the signature
    hops_left: int
    #: the signed envelope bytes, for forwarding intact
    signed: bytes = field(repr=False)


# --------------------------------------------------------------------------- keys


@dataclass(slots=True)
class _KeyEntry:
    versions: dict[int, VerifyKey] = field(default_factory=dict)
    min_version: int = 0
    revoked: str | None = None


class Keyring:
    """Who may speak on the control plane: node id -> verify keys per key version.

    Fed from bootstrap config and from the QS-DAG's key-version records. Revoking a
    node makes every message it signs drop as ``revoked`` until it is re-admitted with
    :meth:`readmit` after re-attesting. Only governance revokes: the agent calls
    :meth:`revoke` for a verified, anchored slash directive, never for a peer's say-so.
    """

    def __init__(self) -> None:
        self._entries: dict[str, _KeyEntry] = {}
        #: consulted for a (node, version) the ring does not hold — the QS-DAG's
        #: key-version view (``Ledger.key_for``); a key found there is remembered
        self.lookup: Callable[[str, int], VerifyKey | None] | None = None
        #: consulted for every sender: a reason if a durable authority (the QS-DAG's
        #: slash notices) refuses it, so a slash outlives a restart of this ring
        self.denied: Callable[[str], str | None] | None = None

    def add(self, node_id: str, key: VerifyKey, key_version: int = 1) -> None:
        """Register (or replace) ``node_id``'s key for ``key_version``."""
        self._entries.setdefault(node_id, _KeyEntry()).versions[key_version] = key

    def retire_below(self, node_id: str, key_version: int) -> None:
        """Refuse versions older than ``key_version`` (after a forced rekey)."""
        entry = self._entries.setdefault(node_id, _KeyEntry())
        entry.min_version = max(entry.min_version, key_version)

    def revoke(self, node_id: str, reason: str) -> None:
        """Refuse everything ``node_id`` signs (slashing, CRL)."""
        self._entries.setdefault(node_id, _KeyEntry()).revoked = reason or "revoked"

    def readmit(self, node_id: str) -> None:
        """Lift a revocation (the node re-attested)."""
        if node_id in self._entries:
            self._entries[node_id].revoked = None

    def is_revoked(self, node_id: str) -> bool:
        entry = self._entries.get(node_id)
        return entry is not None and entry.revoked is not None

    def knows(self, node_id: str) -> bool:
        entry = self._entries.get(node_id)
        return entry is not None and bool(entry.versions)

    def current_version(self, node_id: str) -> int:
        entry = self._entries.get(node_id)
        return max(entry.versions) if entry and entry.versions else 0

    def key_for(self, node_id: str, key_version: int) -> VerifyKey:
        """The key to verify ``node_id``'s signature at ``key_version``, or a typed drop."""
        entry = self._entries.get(node_id)
        if entry is not None and entry.revoked is not None:
            raise RevokedSender(f"sender {node_id} is revoked ({entry.revoked})")
        denied = self.denied(node_id) if self.denied is not None else None
        if denied is not None:
            raise RevokedSender(f"sender {node_id} is revoked ({denied})")
        if (entry is None or key_version not in entry.versions) and self.lookup is not None:
            learned = self.lookup(node_id, key_version)
            if learned is not None:
                self.add(node_id, learned, key_version)
                entry = self._entries[node_id]
        if entry is None or key_version not in entry.versions:
            raise UnknownSender(f"no key for sender {node_id!r} version {key_version}")
        if key_version < entry.min_version:
            raise RevokedSender(
                f"sender {node_id} key version {key_version} retired (< {entry.min_version})"
            )
        return entry.versions[key_version]

    def node_ids(self) -> list[str]:
        return sorted(self._entries)


@dataclass(slots=True)
class NodeKeys:
    """One node's mesh identity: id, signing key + version, and its seal recipient key."""

    node_id: str
    signing_key: SigningKey
    key_version: int = 1
    recipient_key: RecipientKey = field(default_factory=RecipientKey.generate)

    @classmethod
    def generate(cls, node_id: str, key_version: int = 1) -> NodeKeys:
        return cls(node_id, SigningKey.generate(), key_version)


# --------------------------------------------------------------------------- sending


@dataclass(frozen=True, slots=True)
class UnsignedEnvelope:
    """An envelope whose counter is already taken, ready to be signed in any thread.

    :meth:`EnvelopeSigner.reserve` makes it on the caller's thread, so counters follow
    the order of the calls; :meth:`sign` and :meth:`wire` touch no shared state (the key
    is the one current at reservation), which lets a
    :class:`~pqcnet.mesh.offload.CryptoPool` run them off the event loop.
    """

    type: MessageType
    #: the serialized ``ControlEnvelope`` (counter, timestamp, body, recipient)
    envelope: bytes = field(repr=False)
    counter: int
    signing_key: SigningKey = field(repr=False)

    def sign(self) -> bytes:
        """Serialized ``SignedEnvelope``."""
        sig = self.signing_key.sign(self.envelope, context=CONTEXT_ENVELOPE)
        return mesh_pb2.SignedEnvelope(envelope=self.envelope,
                                       signature=sig).SerializeToString()

    def wire(self, to: RecipientPublicKey | None = None, hops: int = 0) -> bytes:
        """A complete Waku payload: signed, sealed to ``to`` if given (and counted)."""
        out = wrap(self.sign(), to=to, hops=hops)
        metrics.PUBLISHED.labels(self.type.name.lower()).inc()  # thread-safe
        return out


class EnvelopeSigner:
    """Builds wire messages for one node. Counters start at the construction time in
    microseconds, so they keep increasing across restarts without persisted state.

    Not thread-safe: call it from one thread (the event loop); hand the
    :class:`UnsignedEnvelope` from :meth:`reserve` to other threads to sign."""

    def __init__(self, keys: NodeKeys, *, start_counter: int | None = None) -> None:
        self.keys = keys
        self._counter = start_counter if start_counter is not None else time.time_ns() // 1000

    @property
    def counter(self) -> int:
        """The last counter taken."""
        return self._counter

    def rekey(self, signing_key: SigningKey, key_version: int) -> None:
        """Switch to a new key (forced rekey); counters continue."""
        self.keys.signing_key = signing_key
        self.keys.key_version = key_version

    def reserve(self, type_: MessageType, body: bytes, *, now_ms: int,
                to: RecipientPublicKey | None = None) -> UnsignedEnvelope:
        """Take the next counter for ``body`` (sealed to ``to`` if given); sign later."""
        self._counter += 1
        env = mesh_pb2.ControlEnvelope(
            type=mesh_pb2.MessageType.Name(type_.value), sender=self.keys.node_id,
            counter=self._counter, timestamp_ms=now_ms, body=body,
            key_version=self.keys.key_version, recipient=to.key_id if to is not None else b"",
        ).SerializeToString()
        return UnsignedEnvelope(type_, env, self._counter, self.keys.signing_key)

    def sign(self, type_: MessageType, body: bytes, *, now_ms: int) -> bytes:
        """Serialized ``SignedEnvelope`` for ``body`` (no recipient: content for many)."""
        return self.reserve(type_, body, now_ms=now_ms).sign()

    def wire(self, type_: MessageType, body: bytes, *, now_ms: int,
             to: RecipientPublicKey | None = None, hops: int = 0) -> bytes:
        """A complete Waku payload: signed, sealed to ``to`` if given."""
        return self.reserve(type_, body, now_ms=now_ms, to=to).wire(to, hops)


def wrap(signed: bytes, *, to: RecipientPublicKey | None, hops: int) -> bytes:
    """Put a signed envelope on the wire (sealing it to ``to``); used for forwarding."""
    msg = mesh_pb2.WireMessage(version=WIRE_VERSION, hops_left=hops)
    if to is None:
        msg.signed.ParseFromString(signed)
    else:
        msg.sealed.recipient = to.key_id
        msg.sealed.blob = seal(to, signed, aad=to.key_id)
    out = msg.SerializeToString()
    if len(out) > MAX_WIRE_BYTES:
        raise ConfigError(f"control message is {len(out)} bytes; limit {MAX_WIRE_BYTES}")
    return out


# --------------------------------------------------------------------------- receiving


@dataclass(frozen=True, slots=True)
class VerifierConfig:
    """Freshness bounds. Each names the risk it caps."""

    #: accepted |sender clock - our clock|; bounds how long a captured message replays
    max_skew_ms: int = 30_000
    #: counters this far below the sender's highest are refused outright
    replay_window: int = 1024
    #: per-sender windows kept (LRU); bounds memory against many senders
    max_senders: int = 65_536
    #: gossip message ids remembered; bounds memory against id flooding
    dedup_capacity: int = 65_536
    #: larger payloads are dropped before any parsing work
    max_wire_bytes: int = MAX_WIRE_BYTES

    def __post_init__(self) -> None:
        if self.replay_window < 1 or self.max_senders < 1 or self.dedup_capacity < 1:
            raise ConfigError("replay window, sender and dedup bounds must be >= 1")


class _Window:
    """IPsec-style anti-replay: highest counter plus a bitmap of the last N."""

    __slots__ = ("bits", "highest")

    def __init__(self) -> None:
        self.highest = 0
        self.bits = 0

    def check(self, counter: int, size: int) -> None:
        if counter > self.highest:
            return
        offset = self.highest - counter
        if offset >= size:
            raise ReplayedMessage(f"counter {counter} older than the replay window")
        if self.bits >> offset & 1:
            raise ReplayedMessage(f"counter {counter} already seen")

    def commit(self, counter: int, size: int) -> None:
        if counter > self.highest:
            shift = counter - self.highest
            self.bits = 1 if shift >= size else ((self.bits << shift) | 1) & ((1 << size) - 1)
            self.highest = counter
        else:
            self.bits |= 1 << (self.highest - counter)


class EnvelopeVerifier:
    """Opens and checks received wire messages; counts every drop by reason."""

    def __init__(self, keyring: Keyring, recipients: list[RecipientKey] | None = None,
                 config: VerifierConfig | None = None) -> None:
        self.keyring = keyring
        self.config = config or VerifierConfig()
        self._recipients: dict[bytes, RecipientKey] = {}
        for r in recipients or []:
            self.add_recipient(r)
        self._windows: OrderedDict[str, _Window] = OrderedDict()
        self._seen_ids: OrderedDict[bytes, None] = OrderedDict()
        self.drops: Counter[str] = Counter()
        self.accepted: Counter[str] = Counter()

    def add_recipient(self, key: RecipientKey) -> None:
        """Hold another seal key (our node key, or a group key)."""
        self._recipients[key.public.key_id] = key

    def accept(self, wire: bytes, now_ms: int) -> ControlMessage | None:
        """:meth:`open`, counting a drop instead of raising."""
        try:
            return self.open(wire, now_ms)
        except EnvelopeRejected as exc:
            self.drops[exc.reason] += 1
            metrics.DROPPED.labels(exc.reason).inc()
            return None

    def open(self, wire: bytes, now_ms: int) -> ControlMessage:
        """Decode, unseal, authenticate and freshness-check one wire message."""
        if len(wire) > self.config.max_wire_bytes:
            raise MalformedMessage(f"message of {len(wire)} bytes over the limit")
        msg = parse(mesh_pb2.WireMessage, wire, MalformedMessage, "not a control wire message")
        if msg.version != WIRE_VERSION:
            raise MalformedMessage(f"unknown wire version {msg.version}")
        kind = msg.WhichOneof("content")
        sealed_to = b""
        if kind == "sealed":
            key = self._recipients.get(msg.sealed.recipient)
            if key is None:
                raise NotForUs("sealed to a key we do not hold")
            try:
                signed_bytes = open_sealed(key, msg.sealed.blob, aad=msg.sealed.recipient)
            except SealError as exc:
                raise MalformedMessage(f"cannot open sealed message: {exc}") from None
            sealed_to = msg.sealed.recipient
        elif kind == "signed":
            signed_bytes = msg.signed.SerializeToString()
        else:
            raise BadSignature("no signed envelope in the message")
        signed = parse(mesh_pb2.SignedEnvelope, signed_bytes, MalformedMessage,
                       "envelope does not decode")
        env = parse(mesh_pb2.ControlEnvelope, signed.envelope, MalformedMessage,
                    "envelope does not decode")
        if not signed.signature:
            raise BadSignature("unsigned envelope")
        try:
            type_ = MessageType(env.type)
        except ValueError:
            raise MalformedMessage(f"unknown message type {env.type}") from None
        # A signed recipient binds the message to that seal; an empty one is content meant
        # for many (gossip, bundles) that each hop re-seals to the next recipient.
        if env.recipient and env.recipient != sealed_to:
            raise NotForUs("signed recipient does not match the seal")
        vk = self.keyring.key_for(env.sender, env.key_version)
        try:
            vk.verify(signed.signature, signed.envelope, context=CONTEXT_ENVELOPE)
        except SignatureInvalid:
            raise BadSignature(f"bad signature from {env.sender!r}") from None
        message_id = hashlib.sha256(signed_bytes).digest()
        if type_ is MessageType.GOSSIP:
            self._dedup(message_id)
        else:
            self._fresh(env.sender, env.counter, env.timestamp_ms, now_ms)
        self.accepted[type_.name.lower()] += 1
        metrics.ACCEPTED.labels(type_.name.lower()).inc()
        return ControlMessage(
            type=type_, sender=env.sender, counter=env.counter, timestamp_ms=env.timestamp_ms,
            body=env.body, key_version=env.key_version, sealed=bool(sealed_to),
            message_id=message_id, hops_left=msg.hops_left, signed=signed_bytes,
        )

    def _fresh(self, sender: str, counter: int, ts: int, now: int) -> None:
        if abs(now - ts) > self.config.max_skew_ms:
            raise StaleMessage(f"timestamp {ts} is {now - ts} ms from our clock")
        window = self._windows.get(sender)
        if window is None:
            window = _Window()
            self._windows[sender] = window
            while len(self._windows) > self.config.max_senders:
                self._windows.popitem(last=False)
        self._windows.move_to_end(sender)
        window.check(counter, self.config.replay_window)
        window.commit(counter, self.config.replay_window)

    def mark_seen(self, signed: bytes) -> bytes:
        """Remember a gossip envelope we originated; returns its message id."""
        message_id = hashlib.sha256(signed).digest()
        self._seen_ids[message_id] = None
        while len(self._seen_ids) > self.config.dedup_capacity:
            self._seen_ids.popitem(last=False)
        return message_id

    def _dedup(self, message_id: bytes) -> None:
        if message_id in self._seen_ids:
            raise DuplicateMessage("gossip message already seen")
        self._seen_ids[message_id] = None
        while len(self._seen_ids) > self.config.dedup_capacity:
            self._seen_ids.popitem(last=False)
