from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EpochAnchor(_message.Message):
    __slots__ = ("network", "epoch", "first_position", "last_position", "count", "merkle_root")
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    FIRST_POSITION_FIELD_NUMBER: _ClassVar[int]
    LAST_POSITION_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MERKLE_ROOT_FIELD_NUMBER: _ClassVar[int]
    network: str
    epoch: int
    first_position: int
    last_position: int
    count: int
    merkle_root: bytes
    def __init__(self, network: _Optional[str] = ..., epoch: _Optional[int] = ..., first_position: _Optional[int] = ..., last_position: _Optional[int] = ..., count: _Optional[int] = ..., merkle_root: _Optional[bytes] = ...) -> None: ...

class Height(_message.Message):
    __slots__ = ("revision_number", "revision_height")
    REVISION_NUMBER_FIELD_NUMBER: _ClassVar[int]
    REVISION_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    revision_number: int
    revision_height: int
    def __init__(self, revision_number: _Optional[int] = ..., revision_height: _Optional[int] = ...) -> None: ...

class IBCEnvelope(_message.Message):
    __slots__ = ("channel", "sequence", "payload_hash", "signature", "data", "timeout_height", "timeout_timestamp", "signer", "key_version")
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_HASH_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SIGNER_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    channel: str
    sequence: int
    payload_hash: bytes
    signature: bytes
    data: bytes
    timeout_height: Height
    timeout_timestamp: int
    signer: str
    key_version: int
    def __init__(self, channel: _Optional[str] = ..., sequence: _Optional[int] = ..., payload_hash: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., data: _Optional[bytes] = ..., timeout_height: _Optional[_Union[Height, _Mapping]] = ..., timeout_timestamp: _Optional[int] = ..., signer: _Optional[str] = ..., key_version: _Optional[int] = ...) -> None: ...
