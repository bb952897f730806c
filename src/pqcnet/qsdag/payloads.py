"""Per-kind payload schemas: dataclasses at the API, protobuf on the wire.

Each :class:`~pqcnet.qsdag.vertex.VertexKind` has exactly one payload message in
``proto/qsdag.proto``. Decoding is *strict*: the bytes must parse and re-serialize
to exactly themselves (so no unknown fields, no explicitly encoded defaults), which
makes payload bytes canonical and keeps vertex ids unambiguous. Structural rules
(required fields, sizes) are checked here; rules that need ledger state (key
registry, attestation signatures, evidence) are checked by the ledger.

Kinds whose message another area owns — ``VOLUME_PROOF``, ``PERFORMANCE_REPORT``,
``GOVERNANCE_DIRECTIVE`` — carry an :class:`OpaqueRecord`: a declared
``content_type`` (e.g. ``"pqcnet.relayer.VolumeRecord"``), the ``subject`` node id
it is about, and the owner's serialized message as a bounded ``body``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from google.protobuf.message import DecodeError, Message

from pqcnet.proto import qsdag_pb2
from pqcnet.qsdag.errors import InvalidPayload
from pqcnet.qsdag.vertex import MAX_PAYLOAD, VertexKind, check_node_id

#: Longest free-text field (content types, topics, tenants, endpoints).
MAX_TEXT = 256
#: Most registrar authorities a genesis may list.
MAX_AUTHORITIES = 64
#: Most shards one relay record may claim.
MAX_SHARDS = 256


def _text(value: str, field: str, *, required: bool = True, limit: int = MAX_TEXT) -> None:
    if required and not value:
        raise InvalidPayload(f"{field} is required")
    if len(value.encode("utf-8")) > limit:
        raise InvalidPayload(f"{field} longer than {limit} bytes")


def _node(value: str, field: str) -> None:
    check_node_id(value, field, error=InvalidPayload)


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A node's public key at a version (KEY_VERSION payload, genesis authorities)."""

    node_id: str
    key_version: int
    algorithm: str
    public_key: bytes

    def to_proto(self) -> qsdag_pb2.KeyRecord:
        return qsdag_pb2.KeyRecord(node_id=self.node_id, key_version=self.key_version,
                                   algorithm=self.algorithm, public_key=self.public_key)

    @classmethod
    def from_proto(cls, m: qsdag_pb2.KeyRecord) -> KeyRecord:
        _node(m.node_id, "node_id")
        if m.key_version < 1:
            raise InvalidPayload("key_version must be >= 1")
        if m.algorithm not in ("ML-DSA-44", "ML-DSA-65", "ML-DSA-87"):
            raise InvalidPayload(f"unsupported key algorithm {m.algorithm!r}")
        return cls(m.node_id, m.key_version, m.algorithm, m.public_key)


@dataclass(frozen=True, slots=True)
class Genesis:
    """GENESIS payload: network name, registrar authorities, enrolment policy."""

    network: str
    authorities: tuple[KeyRecord, ...]
    open_enrolment: bool = False

    def to_proto(self) -> qsdag_pb2.Genesis:
        return qsdag_pb2.Genesis(network=self.network,
                                 authorities=[a.to_proto() for a in self.authorities],
                                 open_enrolment=self.open_enrolment)

    @classmethod
    def from_proto(cls, m: qsdag_pb2.Genesis) -> Genesis:
        _text(m.network, "network")
        if not 1 <= len(m.authorities) <= MAX_AUTHORITIES:
            raise InvalidPayload(f"genesis needs 1..{MAX_AUTHORITIES} authorities")
        auths = tuple(KeyRecord.from_proto(a) for a in m.authorities)
        if len({a.node_id for a in auths}) != len(auths):
            raise InvalidPayload("duplicate authority node id")
        return cls(m.network, auths, m.open_enrolment)


@dataclass(frozen=True, slots=True)
class PolicyAnchor:
    """POLICY_ANCHOR payload: a policy hash, its tenant and effective time."""

    policy_hash: bytes
    tenant: str
    time_ms: int
    description: str = ""

    def to_proto(self) -> qsdag_pb2.PolicyAnchor:
        return qsdag_pb2.PolicyAnchor(policy_hash=self.policy_hash, tenant=self.tenant,
                                      time_ms=self.time_ms, description=self.description)

    @classmethod
    def from_proto(cls, m: qsdag_pb2.PolicyAnchor) -> PolicyAnchor:
        if len(m.policy_hash) not in (32, 48, 64):
            raise InvalidPayload("policy_hash must be 32, 48 or 64 bytes")
        _text(m.tenant, "tenant")
        _text(m.description, "description", required=False, limit=1024)
        return cls(m.policy_hash, m.tenant, m.time_ms, m.description)


@dataclass(frozen=True, slots=True)
class Route:
    """ROUTE payload: meta-routing table entry (topic → shard owner, QoS hints)."""

    topic: str
    shard_owner: str
    priority: int = 0
    max_latency_ms: int = 0
    replicas: int = 0

    def to_proto(self) -> qsdag_pb2.Route:
        return qsdag_pb2.Route(topic=self.topic, shard_owner=self.shard_owner,
                               priority=self.priority, max_latency_ms=self.max_latency_ms,
                               replicas=self.replicas)

    @classmethod
    def from_proto(cls, m: qsdag_pb2.Route) -> Route:
        _text(m.topic, "topic")
        _node(m.shard_owner, "shard_owner")
        return cls(m.topic, m.shard_owner, m.priority, m.max_latency_ms, m.replicas)


@dataclass(frozen=True, slots=True)
class RelayRecord:
    """RELAY_RECORD payload: a relay node's stake, endpoint and shards."""

    node_id: str
    stake: int
    endpoint: str = ""
    shards: tuple[str, ...] = ()

    def to_proto(self) -> qsdag_pb2.RelayRecord:
        return qsdag_pb2.RelayRecord(node_id=self.node_id, stake=self.stake,
                                     endpoint=self.endpoint, shards=list(self.shards))

    @classmethod
    def from_proto(cls, m: qsdag_pb2.RelayRecord) -> RelayRecord:
        _node(m.node_id, "node_id")
        _text(m.endpoint, "endpoint", required=False)
        if len(m.shards) > MAX_SHARDS:
            raise InvalidPayload(f"more than {MAX_SHARDS} shards")
        for s in m.shards:
            _text(s, "shard")
        return cls(m.node_id, m.stake, m.endpoint, tuple(m.shards))


@dataclass(frozen=True, slots=True)
class OpaqueRecord:
    """Payload for kinds whose message another area owns (see module docstring)."""

    content_type: str
    subject: str
    body: bytes

    def to_proto(self) -> qsdag_pb2.OpaqueRecord:
        return qsdag_pb2.OpaqueRecord(content_type=self.content_type, subject=self.subject,
                                      body=self.body)

    @classmethod
    def from_proto(cls, m: qsdag_pb2.OpaqueRecord) -> OpaqueRecord:
        _text(m.content_type, "content_type")
        _node(m.subject, "subject")
        if not m.body:
            raise InvalidPayload("body is required")
        return cls(m.content_type, m.subject, m.body)


class _Payload(Protocol):
    def to_proto(self) -> Any: ...


P = TypeVar("P")


def _registry() -> dict[VertexKind, tuple[type[Message], Callable[[Any], Any]]]:
    from pqcnet.qsdag.attestation import AttestationEvent
    from pqcnet.qsdag.evidence import SlashingEvidence

    opaque = (qsdag_pb2.OpaqueRecord, OpaqueRecord.from_proto)
    return {
        VertexKind.GENESIS: (qsdag_pb2.Genesis, Genesis.from_proto),
        VertexKind.KEY_VERSION: (qsdag_pb2.KeyRecord, KeyRecord.from_proto),
        VertexKind.ATTESTATION: (qsdag_pb2.AttestationEvent, AttestationEvent.from_proto),
        VertexKind.VOLUME_PROOF: opaque,
        VertexKind.PERFORMANCE_REPORT: opaque,
        VertexKind.POLICY_ANCHOR: (qsdag_pb2.PolicyAnchor, PolicyAnchor.from_proto),
        VertexKind.ROUTE: (qsdag_pb2.Route, Route.from_proto),
        VertexKind.GOVERNANCE_DIRECTIVE: opaque,
        VertexKind.SLASHING_EVIDENCE: (qsdag_pb2.SlashingEvidence, SlashingEvidence.from_proto),
        VertexKind.RELAY_RECORD: (qsdag_pb2.RelayRecord, RelayRecord.from_proto),
    }


_SCHEMAS: dict[VertexKind, tuple[type[Message], Callable[[Any], Any]]] = {}


def schema(kind: VertexKind) -> tuple[type[Message], Callable[[Any], Any]]:
    """(protobuf class, from_proto) for a kind."""
    if not _SCHEMAS:
        _SCHEMAS.update(_registry())
    return _SCHEMAS[kind]


def encode_payload(payload: _Payload | bytes) -> bytes:
    """Serialize a payload dataclass (bytes pass through unchanged)."""
    if isinstance(payload, bytes):
        return payload
    data: bytes = payload.to_proto().SerializeToString(deterministic=True)
    if len(data) > MAX_PAYLOAD:
        raise InvalidPayload(f"payload is {len(data)} bytes; at most {MAX_PAYLOAD}")
    return data


def decode_payload(kind: VertexKind, data: bytes) -> Any:
    """Strictly decode ``data`` as the payload of ``kind`` into its dataclass."""
    cls, convert = schema(kind)
    msg = cls()
    try:
        msg.ParseFromString(data)
    except (DecodeError, ValueError) as exc:
        raise InvalidPayload(f"{kind.name} payload does not decode: {exc}") from None
    msg.DiscardUnknownFields()
    if msg.SerializeToString(deterministic=True) != data:
        raise InvalidPayload(f"{kind.name} payload is not canonically encoded")
    return convert(msg)
