from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VertexKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERTEX_KIND_UNSPECIFIED: _ClassVar[VertexKind]
    GENESIS: _ClassVar[VertexKind]
    KEY_VERSION: _ClassVar[VertexKind]
    ATTESTATION: _ClassVar[VertexKind]
    VOLUME_PROOF: _ClassVar[VertexKind]
    PERFORMANCE_REPORT: _ClassVar[VertexKind]
    POLICY_ANCHOR: _ClassVar[VertexKind]
    ROUTE: _ClassVar[VertexKind]
    GOVERNANCE_DIRECTIVE: _ClassVar[VertexKind]
    SLASHING_EVIDENCE: _ClassVar[VertexKind]
    RELAY_RECORD: _ClassVar[VertexKind]
VERTEX_KIND_UNSPECIFIED: VertexKind
GENESIS: VertexKind
KEY_VERSION: VertexKind
ATTESTATION: VertexKind
VOLUME_PROOF: VertexKind
PERFORMANCE_REPORT: VertexKind
POLICY_ANCHOR: VertexKind
ROUTE: VertexKind
GOVERNANCE_DIRECTIVE: VertexKind
SLASHING_EVIDENCE: VertexKind
RELAY_RECORD: VertexKind

class Vertex(_message.Message):
    __slots__ = ("version", "kind", "author", "counter", "timestamp_ms", "key_version", "parents", "payload", "signature")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    COUNTER_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    version: int
    kind: VertexKind
    author: str
    counter: int
    timestamp_ms: int
    key_version: int
    parents: _containers.RepeatedScalarFieldContainer[bytes]
    payload: bytes
    signature: bytes
    def __init__(self, version: _Optional[int] = ..., kind: _Optional[_Union[VertexKind, str]] = ..., author: _Optional[str] = ..., counter: _Optional[int] = ..., timestamp_ms: _Optional[int] = ..., key_version: _Optional[int] = ..., parents: _Optional[_Iterable[bytes]] = ..., payload: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class KeyRecord(_message.Message):
    __slots__ = ("node_id", "key_version", "algorithm", "public_key")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    key_version: int
    algorithm: str
    public_key: bytes
    def __init__(self, node_id: _Optional[str] = ..., key_version: _Optional[int] = ..., algorithm: _Optional[str] = ..., public_key: _Optional[bytes] = ...) -> None: ...

class Genesis(_message.Message):
    __slots__ = ("network", "authorities", "open_enrolment")
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    AUTHORITIES_FIELD_NUMBER: _ClassVar[int]
    OPEN_ENROLMENT_FIELD_NUMBER: _ClassVar[int]
    network: str
    authorities: _containers.RepeatedCompositeFieldContainer[KeyRecord]
    open_enrolment: bool
    def __init__(self, network: _Optional[str] = ..., authorities: _Optional[_Iterable[_Union[KeyRecord, _Mapping]]] = ..., open_enrolment: _Optional[bool] = ...) -> None: ...

class Measurements(_message.Message):
    __slots__ = ("package_hash", "image_digest", "config_hash")
    PACKAGE_HASH_FIELD_NUMBER: _ClassVar[int]
    IMAGE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    package_hash: bytes
    image_digest: str
    config_hash: bytes
    def __init__(self, package_hash: _Optional[bytes] = ..., image_digest: _Optional[str] = ..., config_hash: _Optional[bytes] = ...) -> None: ...

class AttestationEvent(_message.Message):
    __slots__ = ("node_id", "role", "measurements", "quote", "counter", "timestamp_ms", "key_version", "signature")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MEASUREMENTS_FIELD_NUMBER: _ClassVar[int]
    QUOTE_FIELD_NUMBER: _ClassVar[int]
    COUNTER_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    role: str
    measurements: Measurements
    quote: bytes
    counter: int
    timestamp_ms: int
    key_version: int
    signature: bytes
    def __init__(self, node_id: _Optional[str] = ..., role: _Optional[str] = ..., measurements: _Optional[_Union[Measurements, _Mapping]] = ..., quote: _Optional[bytes] = ..., counter: _Optional[int] = ..., timestamp_ms: _Optional[int] = ..., key_version: _Optional[int] = ..., signature: _Optional[bytes] = ...) -> None: ...

class PolicyAnchor(_message.Message):
    __slots__ = ("policy_hash", "tenant", "time_ms", "description")
    POLICY_HASH_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    TIME_MS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    policy_hash: bytes
    tenant: str
    time_ms: int
    description: str
    def __init__(self, policy_hash: _Optional[bytes] = ..., tenant: _Optional[str] = ..., time_ms: _Optional[int] = ..., description: _Optional[str] = ...) -> None: ...

class Route(_message.Message):
    __slots__ = ("topic", "shard_owner", "priority", "max_latency_ms", "replicas")
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    SHARD_OWNER_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    MAX_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    topic: str
    shard_owner: str
    priority: int
    max_latency_ms: int
    replicas: int
    def __init__(self, topic: _Optional[str] = ..., shard_owner: _Optional[str] = ..., priority: _Optional[int] = ..., max_latency_ms: _Optional[int] = ..., replicas: _Optional[int] = ...) -> None: ...

class RelayRecord(_message.Message):
    __slots__ = ("node_id", "stake", "endpoint", "shards")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STAKE_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    stake: int
    endpoint: str
    shards: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_id: _Optional[str] = ..., stake: _Optional[int] = ..., endpoint: _Optional[str] = ..., shards: _Optional[_Iterable[str]] = ...) -> None: ...

class OpaqueRecord(_message.Message):
    __slots__ = ("content_type", "subject", "body")
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    content_type: str
    subject: str
    body: bytes
    def __init__(self, content_type: _Optional[str] = ..., subject: _Optional[str] = ..., body: _Optional[bytes] = ...) -> None: ...

class SlashingEvidence(_message.Message):
    __slots__ = ("offender", "counter", "first", "second", "reason")
    OFFENDER_FIELD_NUMBER: _ClassVar[int]
    COUNTER_FIELD_NUMBER: _ClassVar[int]
    FIRST_FIELD_NUMBER: _ClassVar[int]
    SECOND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    offender: str
    counter: int
    first: Vertex
    second: Vertex
    reason: str
    def __init__(self, offender: _Optional[str] = ..., counter: _Optional[int] = ..., first: _Optional[_Union[Vertex, _Mapping]] = ..., second: _Optional[_Union[Vertex, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class SlashNotice(_message.Message):
    __slots__ = ("target", "reason", "key_version")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    target: str
    reason: str
    key_version: int
    def __init__(self, target: _Optional[str] = ..., reason: _Optional[str] = ..., key_version: _Optional[int] = ...) -> None: ...

class VertexRef(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: bytes
    def __init__(self, id: _Optional[bytes] = ...) -> None: ...

class VertexEntry(_message.Message):
    __slots__ = ("id", "vertex", "depth", "position")
    ID_FIELD_NUMBER: _ClassVar[int]
    VERTEX_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    id: bytes
    vertex: Vertex
    depth: int
    position: int
    def __init__(self, id: _Optional[bytes] = ..., vertex: _Optional[_Union[Vertex, _Mapping]] = ..., depth: _Optional[int] = ..., position: _Optional[int] = ...) -> None: ...

class VertexQuery(_message.Message):
    __slots__ = ("author", "kind", "since_ms", "until_ms", "limit")
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SINCE_MS_FIELD_NUMBER: _ClassVar[int]
    UNTIL_MS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    author: str
    kind: VertexKind
    since_ms: int
    until_ms: int
    limit: int
    def __init__(self, author: _Optional[str] = ..., kind: _Optional[_Union[VertexKind, str]] = ..., since_ms: _Optional[int] = ..., until_ms: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class SlashesQuery(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: str
    def __init__(self, node: _Optional[str] = ...) -> None: ...

class SlashesReply(_message.Message):
    __slots__ = ("slashed", "history_json")
    SLASHED_FIELD_NUMBER: _ClassVar[int]
    HISTORY_JSON_FIELD_NUMBER: _ClassVar[int]
    slashed: _containers.RepeatedScalarFieldContainer[str]
    history_json: str
    def __init__(self, slashed: _Optional[_Iterable[str]] = ..., history_json: _Optional[str] = ...) -> None: ...

class AnchorEntry(_message.Message):
    __slots__ = ("vertex_id", "envelope_json", "index", "path", "size")
    VERTEX_ID_FIELD_NUMBER: _ClassVar[int]
    ENVELOPE_JSON_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    vertex_id: bytes
    envelope_json: str
    index: int
    path: _containers.RepeatedScalarFieldContainer[bytes]
    size: int
    def __init__(self, vertex_id: _Optional[bytes] = ..., envelope_json: _Optional[str] = ..., index: _Optional[int] = ..., path: _Optional[_Iterable[bytes]] = ..., size: _Optional[int] = ...) -> None: ...
