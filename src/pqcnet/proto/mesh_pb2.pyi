from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MessageType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MESSAGE_TYPE_UNSPECIFIED: _ClassVar[MessageType]
    NODE_ANNOUNCEMENT: _ClassVar[MessageType]
    ROUTE_ADVERTISEMENT: _ClassVar[MessageType]
    GOVERNANCE_DIRECTIVE: _ClassVar[MessageType]
    SLASHING_PROPOSAL: _ClassVar[MessageType]
    GOSSIP: _ClassVar[MessageType]
    DAG_TIPS: _ClassVar[MessageType]
    DAG_PULL: _ClassVar[MessageType]
    DAG_VERTICES: _ClassVar[MessageType]
    RELAY_REPORT: _ClassVar[MessageType]
MESSAGE_TYPE_UNSPECIFIED: MessageType
NODE_ANNOUNCEMENT: MessageType
ROUTE_ADVERTISEMENT: MessageType
GOVERNANCE_DIRECTIVE: MessageType
SLASHING_PROPOSAL: MessageType
GOSSIP: MessageType
DAG_TIPS: MessageType
DAG_PULL: MessageType
DAG_VERTICES: MessageType
RELAY_REPORT: MessageType

class ControlEnvelope(_message.Message):
    __slots__ = ("type", "sender", "counter", "timestamp_ms", "body", "key_version", "recipient")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    COUNTER_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    type: MessageType
    sender: str
    counter: int
    timestamp_ms: int
    body: bytes
    key_version: int
    recipient: bytes
    def __init__(self, type: _Optional[_Union[MessageType, str]] = ..., sender: _Optional[str] = ..., counter: _Optional[int] = ..., timestamp_ms: _Optional[int] = ..., body: _Optional[bytes] = ..., key_version: _Optional[int] = ..., recipient: _Optional[bytes] = ...) -> None: ...

class SignedEnvelope(_message.Message):
    __slots__ = ("envelope", "signature")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    envelope: bytes
    signature: bytes
    def __init__(self, envelope: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class Sealed(_message.Message):
    __slots__ = ("recipient", "blob")
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    BLOB_FIELD_NUMBER: _ClassVar[int]
    recipient: bytes
    blob: bytes
    def __init__(self, recipient: _Optional[bytes] = ..., blob: _Optional[bytes] = ...) -> None: ...

class WireMessage(_message.Message):
    __slots__ = ("version", "hops_left", "signed", "sealed")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HOPS_LEFT_FIELD_NUMBER: _ClassVar[int]
    SIGNED_FIELD_NUMBER: _ClassVar[int]
    SEALED_FIELD_NUMBER: _ClassVar[int]
    version: int
    hops_left: int
    signed: SignedEnvelope
    sealed: Sealed
    def __init__(self, version: _Optional[int] = ..., hops_left: _Optional[int] = ..., signed: _Optional[_Union[SignedEnvelope, _Mapping]] = ..., sealed: _Optional[_Union[Sealed, _Mapping]] = ...) -> None: ...

class Endpoint(_message.Message):
    __slots__ = ("kind", "address")
    KIND_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    address: str
    def __init__(self, kind: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class NodeAnnouncement(_message.Message):
    __slots__ = ("node_id", "role", "capabilities", "software_hash", "staking_address", "endpoints", "key_version", "seal_key", "interval_ms", "next_key_version", "next_key_algorithm", "next_public_key")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_HASH_FIELD_NUMBER: _ClassVar[int]
    STAKING_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEAL_KEY_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    NEXT_KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    NEXT_KEY_ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    NEXT_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    role: str
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    software_hash: bytes
    staking_address: str
    endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    key_version: int
    seal_key: bytes
    interval_ms: int
    next_key_version: int
    next_key_algorithm: str
    next_public_key: bytes
    def __init__(self, node_id: _Optional[str] = ..., role: _Optional[str] = ..., capabilities: _Optional[_Iterable[str]] = ..., software_hash: _Optional[bytes] = ..., staking_address: _Optional[str] = ..., endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ..., key_version: _Optional[int] = ..., seal_key: _Optional[bytes] = ..., interval_ms: _Optional[int] = ..., next_key_version: _Optional[int] = ..., next_key_algorithm: _Optional[str] = ..., next_public_key: _Optional[bytes] = ...) -> None: ...

class RouteEntry(_message.Message):
    __slots__ = ("topic", "shard", "owner", "withdrawn")
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    WITHDRAWN_FIELD_NUMBER: _ClassVar[int]
    topic: str
    shard: int
    owner: str
    withdrawn: bool
    def __init__(self, topic: _Optional[str] = ..., shard: _Optional[int] = ..., owner: _Optional[str] = ..., withdrawn: _Optional[bool] = ...) -> None: ...

class RouteAdvertisement(_message.Message):
    __slots__ = ("node_id", "version", "routes")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    version: int
    routes: _containers.RepeatedCompositeFieldContainer[RouteEntry]
    def __init__(self, node_id: _Optional[str] = ..., version: _Optional[int] = ..., routes: _Optional[_Iterable[_Union[RouteEntry, _Mapping]]] = ...) -> None: ...

class RateLimitUpdate(_message.Message):
    __slots__ = ("scope", "rate_per_s", "burst")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    RATE_PER_S_FIELD_NUMBER: _ClassVar[int]
    BURST_FIELD_NUMBER: _ClassVar[int]
    scope: str
    rate_per_s: float
    burst: int
    def __init__(self, scope: _Optional[str] = ..., rate_per_s: _Optional[float] = ..., burst: _Optional[int] = ...) -> None: ...

class ForceRekey(_message.Message):
    __slots__ = ("target", "min_key_version")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    MIN_KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    target: str
    min_key_version: int
    def __init__(self, target: _Optional[str] = ..., min_key_version: _Optional[int] = ...) -> None: ...

class SlashNotice(_message.Message):
    __slots__ = ("target", "reason", "evidence_digest")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    target: str
    reason: str
    evidence_digest: bytes
    def __init__(self, target: _Optional[str] = ..., reason: _Optional[str] = ..., evidence_digest: _Optional[bytes] = ...) -> None: ...

class GovernanceDirective(_message.Message):
    __slots__ = ("directive_id", "issued_ms", "expires_ms", "rate_limit", "force_rekey", "slash")
    DIRECTIVE_ID_FIELD_NUMBER: _ClassVar[int]
    ISSUED_MS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_MS_FIELD_NUMBER: _ClassVar[int]
    RATE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    FORCE_REKEY_FIELD_NUMBER: _ClassVar[int]
    SLASH_FIELD_NUMBER: _ClassVar[int]
    directive_id: bytes
    issued_ms: int
    expires_ms: int
    rate_limit: RateLimitUpdate
    force_rekey: ForceRekey
    slash: SlashNotice
    def __init__(self, directive_id: _Optional[bytes] = ..., issued_ms: _Optional[int] = ..., expires_ms: _Optional[int] = ..., rate_limit: _Optional[_Union[RateLimitUpdate, _Mapping]] = ..., force_rekey: _Optional[_Union[ForceRekey, _Mapping]] = ..., slash: _Optional[_Union[SlashNotice, _Mapping]] = ...) -> None: ...

class GovernanceSignature(_message.Message):
    __slots__ = ("key_id", "signature")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    key_id: bytes
    signature: bytes
    def __init__(self, key_id: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class SignedDirective(_message.Message):
    __slots__ = ("directive", "signatures")
    DIRECTIVE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURES_FIELD_NUMBER: _ClassVar[int]
    directive: bytes
    signatures: _containers.RepeatedCompositeFieldContainer[GovernanceSignature]
    def __init__(self, directive: _Optional[bytes] = ..., signatures: _Optional[_Iterable[_Union[GovernanceSignature, _Mapping]]] = ...) -> None: ...

class SlashingProposal(_message.Message):
    __slots__ = ("target", "kind", "detail", "evidence", "proposal_id")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    PROPOSAL_ID_FIELD_NUMBER: _ClassVar[int]
    target: str
    kind: str
    detail: str
    evidence: _containers.RepeatedScalarFieldContainer[bytes]
    proposal_id: bytes
    def __init__(self, target: _Optional[str] = ..., kind: _Optional[str] = ..., detail: _Optional[str] = ..., evidence: _Optional[_Iterable[bytes]] = ..., proposal_id: _Optional[bytes] = ...) -> None: ...

class GossipItem(_message.Message):
    __slots__ = ("kind", "payload", "expires_ms", "destination")
    KIND_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_MS_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    kind: str
    payload: bytes
    expires_ms: int
    destination: str
    def __init__(self, kind: _Optional[str] = ..., payload: _Optional[bytes] = ..., expires_ms: _Optional[int] = ..., destination: _Optional[str] = ...) -> None: ...

class DagTips(_message.Message):
    __slots__ = ("tips", "vertex_count", "genesis")
    TIPS_FIELD_NUMBER: _ClassVar[int]
    VERTEX_COUNT_FIELD_NUMBER: _ClassVar[int]
    GENESIS_FIELD_NUMBER: _ClassVar[int]
    tips: _containers.RepeatedScalarFieldContainer[bytes]
    vertex_count: int
    genesis: bytes
    def __init__(self, tips: _Optional[_Iterable[bytes]] = ..., vertex_count: _Optional[int] = ..., genesis: _Optional[bytes] = ...) -> None: ...

class DagPull(_message.Message):
    __slots__ = ("ids", "have_tips", "requester")
    IDS_FIELD_NUMBER: _ClassVar[int]
    HAVE_TIPS_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[bytes]
    have_tips: _containers.RepeatedScalarFieldContainer[bytes]
    requester: str
    def __init__(self, ids: _Optional[_Iterable[bytes]] = ..., have_tips: _Optional[_Iterable[bytes]] = ..., requester: _Optional[str] = ...) -> None: ...

class DagVertices(_message.Message):
    __slots__ = ("vertices", "destination", "more")
    VERTICES_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    vertices: _containers.RepeatedScalarFieldContainer[bytes]
    destination: str
    more: bool
    def __init__(self, vertices: _Optional[_Iterable[bytes]] = ..., destination: _Optional[str] = ..., more: _Optional[bool] = ...) -> None: ...

class RelayReport(_message.Message):
    __slots__ = ("kind", "payload", "anchor_id")
    KIND_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    ANCHOR_ID_FIELD_NUMBER: _ClassVar[int]
    kind: str
    payload: bytes
    anchor_id: bytes
    def __init__(self, kind: _Optional[str] = ..., payload: _Optional[bytes] = ..., anchor_id: _Optional[bytes] = ...) -> None: ...

class Bundle(_message.Message):
    __slots__ = ("bundle_id", "destination", "created_ms", "expires_ms", "payload")
    BUNDLE_ID_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    CREATED_MS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_MS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    bundle_id: bytes
    destination: str
    created_ms: int
    expires_ms: int
    payload: bytes
    def __init__(self, bundle_id: _Optional[bytes] = ..., destination: _Optional[str] = ..., created_ms: _Optional[int] = ..., expires_ms: _Optional[int] = ..., payload: _Optional[bytes] = ...) -> None: ...
