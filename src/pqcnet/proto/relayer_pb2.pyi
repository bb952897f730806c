from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class IngressFrame(_message.Message):
    __slots__ = ("customer_id", "channel_id", "seq", "payload", "qos", "retry")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    QOS_FIELD_NUMBER: _ClassVar[int]
    RETRY_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    channel_id: str
    seq: int
    payload: bytes
    qos: int
    retry: bool
    def __init__(self, customer_id: _Optional[str] = ..., channel_id: _Optional[str] = ..., seq: _Optional[int] = ..., payload: _Optional[bytes] = ..., qos: _Optional[int] = ..., retry: _Optional[bool] = ...) -> None: ...

class PublishRequest(_message.Message):
    __slots__ = ("request_id", "frames")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    frames: _containers.RepeatedCompositeFieldContainer[IngressFrame]
    def __init__(self, request_id: _Optional[int] = ..., frames: _Optional[_Iterable[_Union[IngressFrame, _Mapping]]] = ...) -> None: ...

class FrameResult(_message.Message):
    __slots__ = ("seq", "status", "error_code", "reason", "overflowed", "retriable")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[FrameResult.Status]
        ACCEPTED: _ClassVar[FrameResult.Status]
        REJECTED: _ClassVar[FrameResult.Status]
    STATUS_UNSPECIFIED: FrameResult.Status
    ACCEPTED: FrameResult.Status
    REJECTED: FrameResult.Status
    SEQ_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    OVERFLOWED_FIELD_NUMBER: _ClassVar[int]
    RETRIABLE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    status: FrameResult.Status
    error_code: int
    reason: str
    overflowed: bool
    retriable: bool
    def __init__(self, seq: _Optional[int] = ..., status: _Optional[_Union[FrameResult.Status, str]] = ..., error_code: _Optional[int] = ..., reason: _Optional[str] = ..., overflowed: _Optional[bool] = ..., retriable: _Optional[bool] = ...) -> None: ...

class PublishReply(_message.Message):
    __slots__ = ("request_id", "results")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    results: _containers.RepeatedCompositeFieldContainer[FrameResult]
    def __init__(self, request_id: _Optional[int] = ..., results: _Optional[_Iterable[_Union[FrameResult, _Mapping]]] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("customer_id", "channel_ids")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_IDS_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    channel_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, customer_id: _Optional[str] = ..., channel_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class Delivery(_message.Message):
    __slots__ = ("customer_id", "channel_id", "seq", "payload", "qos")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    QOS_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    channel_id: str
    seq: int
    payload: bytes
    qos: int
    def __init__(self, customer_id: _Optional[str] = ..., channel_id: _Optional[str] = ..., seq: _Optional[int] = ..., payload: _Optional[bytes] = ..., qos: _Optional[int] = ...) -> None: ...

class DeliveryBatch(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[Delivery]
    def __init__(self, frames: _Optional[_Iterable[_Union[Delivery, _Mapping]]] = ...) -> None: ...

class ErrorReply(_message.Message):
    __slots__ = ("code", "reason")
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    code: int
    reason: str
    def __init__(self, code: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class TopicAck(_message.Message):
    __slots__ = ("customer_id", "channel_id", "seq")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    channel_id: str
    seq: int
    def __init__(self, customer_id: _Optional[str] = ..., channel_id: _Optional[str] = ..., seq: _Optional[int] = ...) -> None: ...

class DeliveryAck(_message.Message):
    __slots__ = ("topics",)
    TOPICS_FIELD_NUMBER: _ClassVar[int]
    topics: _containers.RepeatedCompositeFieldContainer[TopicAck]
    def __init__(self, topics: _Optional[_Iterable[_Union[TopicAck, _Mapping]]] = ...) -> None: ...

class AckCounter(_message.Message):
    __slots__ = ("role", "customer", "channel", "epoch", "frames", "bytes", "final")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    role: str
    customer: str
    channel: str
    epoch: int
    frames: int
    bytes: int
    final: bool
    def __init__(self, role: _Optional[str] = ..., customer: _Optional[str] = ..., channel: _Optional[str] = ..., epoch: _Optional[int] = ..., frames: _Optional[int] = ..., bytes: _Optional[int] = ..., final: _Optional[bool] = ...) -> None: ...

class SignedAckCounter(_message.Message):
    __slots__ = ("counter", "cert_chain_pem", "signature")
    COUNTER_FIELD_NUMBER: _ClassVar[int]
    CERT_CHAIN_PEM_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    counter: AckCounter
    cert_chain_pem: bytes
    signature: bytes
    def __init__(self, counter: _Optional[_Union[AckCounter, _Mapping]] = ..., cert_chain_pem: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class AckCounters(_message.Message):
    __slots__ = ("counters",)
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    counters: _containers.RepeatedCompositeFieldContainer[SignedAckCounter]
    def __init__(self, counters: _Optional[_Iterable[_Union[SignedAckCounter, _Mapping]]] = ...) -> None: ...

class ReceiptRequest(_message.Message):
    __slots__ = ("customer_id", "epoch")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    epoch: int
    def __init__(self, customer_id: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class ReceiptEntry(_message.Message):
    __slots__ = ("record", "part", "index", "path")
    RECORD_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    record: VolumeRecord
    part: int
    index: int
    path: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, record: _Optional[_Union[VolumeRecord, _Mapping]] = ..., part: _Optional[int] = ..., index: _Optional[int] = ..., path: _Optional[_Iterable[bytes]] = ...) -> None: ...

class VolumeReceipt(_message.Message):
    __slots__ = ("relayer_id", "customer", "epoch", "entries", "proofs", "anchor_vertices", "signer_key_id", "signature")
    RELAYER_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    PROOFS_FIELD_NUMBER: _ClassVar[int]
    ANCHOR_VERTICES_FIELD_NUMBER: _ClassVar[int]
    SIGNER_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    relayer_id: str
    customer: str
    epoch: int
    entries: _containers.RepeatedCompositeFieldContainer[ReceiptEntry]
    proofs: _containers.RepeatedCompositeFieldContainer[VolumeProof]
    anchor_vertices: _containers.RepeatedScalarFieldContainer[bytes]
    signer_key_id: bytes
    signature: bytes
    def __init__(self, relayer_id: _Optional[str] = ..., customer: _Optional[str] = ..., epoch: _Optional[int] = ..., entries: _Optional[_Iterable[_Union[ReceiptEntry, _Mapping]]] = ..., proofs: _Optional[_Iterable[_Union[VolumeProof, _Mapping]]] = ..., anchor_vertices: _Optional[_Iterable[bytes]] = ..., signer_key_id: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class VolumeOverclaim(_message.Message):
    __slots__ = ("proof", "entry", "counter", "tolerance_ratio", "tolerance_frames")
    PROOF_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    COUNTER_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_RATIO_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FRAMES_FIELD_NUMBER: _ClassVar[int]
    proof: VolumeProof
    entry: ReceiptEntry
    counter: SignedAckCounter
    tolerance_ratio: float
    tolerance_frames: int
    def __init__(self, proof: _Optional[_Union[VolumeProof, _Mapping]] = ..., entry: _Optional[_Union[ReceiptEntry, _Mapping]] = ..., counter: _Optional[_Union[SignedAckCounter, _Mapping]] = ..., tolerance_ratio: _Optional[float] = ..., tolerance_frames: _Optional[int] = ...) -> None: ...

class ClientMessage(_message.Message):
    __slots__ = ("publish", "subscribe", "ack", "counters", "receipt")
    PUBLISH_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIBE_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    publish: PublishRequest
    subscribe: SubscribeRequest
    ack: DeliveryAck
    counters: AckCounters
    receipt: ReceiptRequest
    def __init__(self, publish: _Optional[_Union[PublishRequest, _Mapping]] = ..., subscribe: _Optional[_Union[SubscribeRequest, _Mapping]] = ..., ack: _Optional[_Union[DeliveryAck, _Mapping]] = ..., counters: _Optional[_Union[AckCounters, _Mapping]] = ..., receipt: _Optional[_Union[ReceiptRequest, _Mapping]] = ...) -> None: ...

class RelayerMessage(_message.Message):
    __slots__ = ("reply", "deliveries", "error", "receipt")
    REPLY_FIELD_NUMBER: _ClassVar[int]
    DELIVERIES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    reply: PublishReply
    deliveries: DeliveryBatch
    error: ErrorReply
    receipt: VolumeReceipt
    def __init__(self, reply: _Optional[_Union[PublishReply, _Mapping]] = ..., deliveries: _Optional[_Union[DeliveryBatch, _Mapping]] = ..., error: _Optional[_Union[ErrorReply, _Mapping]] = ..., receipt: _Optional[_Union[VolumeReceipt, _Mapping]] = ...) -> None: ...

class VolumeRecord(_message.Message):
    __slots__ = ("customer", "channel", "bytes", "frames", "qos", "epoch")
    CUSTOMER_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    QOS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    customer: str
    channel: str
    bytes: int
    frames: int
    qos: int
    epoch: int
    def __init__(self, customer: _Optional[str] = ..., channel: _Optional[str] = ..., bytes: _Optional[int] = ..., frames: _Optional[int] = ..., qos: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class InclusionProof(_message.Message):
    __slots__ = ("index", "siblings")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SIBLINGS_FIELD_NUMBER: _ClassVar[int]
    index: int
    siblings: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, index: _Optional[int] = ..., siblings: _Optional[_Iterable[bytes]] = ...) -> None: ...

class VolumeProof(_message.Message):
    __slots__ = ("relayer_id", "epoch", "merkle_root", "records", "total_bytes", "total_frames", "signer_key_id", "signature", "record_count", "part", "parts")
    RELAYER_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MERKLE_ROOT_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FRAMES_FIELD_NUMBER: _ClassVar[int]
    SIGNER_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    RECORD_COUNT_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    relayer_id: str
    epoch: int
    merkle_root: bytes
    records: _containers.RepeatedCompositeFieldContainer[VolumeRecord]
    total_bytes: int
    total_frames: int
    signer_key_id: bytes
    signature: bytes
    record_count: int
    part: int
    parts: int
    def __init__(self, relayer_id: _Optional[str] = ..., epoch: _Optional[int] = ..., merkle_root: _Optional[bytes] = ..., records: _Optional[_Iterable[_Union[VolumeRecord, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., total_frames: _Optional[int] = ..., signer_key_id: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., record_count: _Optional[int] = ..., part: _Optional[int] = ..., parts: _Optional[int] = ...) -> None: ...

class RelayerPerformanceReport(_message.Message):
    __slots__ = ("relayer_id", "epoch_from", "epoch_to", "volume_proofs", "attestation_receipts", "uptime_seconds", "signer_key_id", "signature")
    RELAYER_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FROM_FIELD_NUMBER: _ClassVar[int]
    EPOCH_TO_FIELD_NUMBER: _ClassVar[int]
    VOLUME_PROOFS_FIELD_NUMBER: _ClassVar[int]
    ATTESTATION_RECEIPTS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SIGNER_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    relayer_id: str
    epoch_from: int
    epoch_to: int
    volume_proofs: _containers.RepeatedCompositeFieldContainer[VolumeProof]
    attestation_receipts: _containers.RepeatedScalarFieldContainer[bytes]
    uptime_seconds: float
    signer_key_id: bytes
    signature: bytes
    def __init__(self, relayer_id: _Optional[str] = ..., epoch_from: _Optional[int] = ..., epoch_to: _Optional[int] = ..., volume_proofs: _Optional[_Iterable[_Union[VolumeProof, _Mapping]]] = ..., attestation_receipts: _Optional[_Iterable[bytes]] = ..., uptime_seconds: _Optional[float] = ..., signer_key_id: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class VolumeQuery(_message.Message):
    __slots__ = ("customer", "channel", "epoch_from", "epoch_to", "page_size", "page_token")
    CUSTOMER_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FROM_FIELD_NUMBER: _ClassVar[int]
    EPOCH_TO_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    customer: str
    channel: str
    epoch_from: int
    epoch_to: int
    page_size: int
    page_token: bytes
    def __init__(self, customer: _Optional[str] = ..., channel: _Optional[str] = ..., epoch_from: _Optional[int] = ..., epoch_to: _Optional[int] = ..., page_size: _Optional[int] = ..., page_token: _Optional[bytes] = ...) -> None: ...

class VolumeResponse(_message.Message):
    __slots__ = ("records", "total_bytes", "total_frames", "next_page_token")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FRAMES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[VolumeRecord]
    total_bytes: int
    total_frames: int
    next_page_token: bytes
    def __init__(self, records: _Optional[_Iterable[_Union[VolumeRecord, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., total_frames: _Optional[int] = ..., next_page_token: _Optional[bytes] = ...) -> None: ...

class VolumeCursor(_message.Message):
    __slots__ = ("epoch", "customer", "channel", "qos")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    QOS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    customer: str
    channel: str
    qos: int
    def __init__(self, epoch: _Optional[int] = ..., customer: _Optional[str] = ..., channel: _Optional[str] = ..., qos: _Optional[int] = ...) -> None: ...

class ReportQuery(_message.Message):
    __slots__ = ("epoch_from", "epoch_to")
    EPOCH_FROM_FIELD_NUMBER: _ClassVar[int]
    EPOCH_TO_FIELD_NUMBER: _ClassVar[int]
    epoch_from: int
    epoch_to: int
    def __init__(self, epoch_from: _Optional[int] = ..., epoch_to: _Optional[int] = ...) -> None: ...
