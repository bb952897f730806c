from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SessionAssertionBody(_message.Message):
    __slots__ = ("version", "subject", "tenant", "session_id", "scopes", "issued_at", "expires_at", "channel_binding", "issuer_key_id")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_BINDING_FIELD_NUMBER: _ClassVar[int]
    ISSUER_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    version: int
    subject: str
    tenant: str
    session_id: bytes
    scopes: _containers.RepeatedScalarFieldContainer[str]
    issued_at: int
    expires_at: int
    channel_binding: bytes
    issuer_key_id: bytes
    def __init__(self, version: _Optional[int] = ..., subject: _Optional[str] = ..., tenant: _Optional[str] = ..., session_id: _Optional[bytes] = ..., scopes: _Optional[_Iterable[str]] = ..., issued_at: _Optional[int] = ..., expires_at: _Optional[int] = ..., channel_binding: _Optional[bytes] = ..., issuer_key_id: _Optional[bytes] = ...) -> None: ...

class SessionAssertion(_message.Message):
    __slots__ = ("body", "signature")
    BODY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    body: bytes
    signature: bytes
    def __init__(self, body: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class Header(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: str
    def __init__(self, name: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class RpcRequestHead(_message.Message):
    __slots__ = ("kind", "method", "path", "headers", "assertion", "timeout")
    KIND_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    ASSERTION_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    kind: str
    method: str
    path: str
    headers: _containers.RepeatedCompositeFieldContainer[Header]
    assertion: bytes
    timeout: float
    def __init__(self, kind: _Optional[str] = ..., method: _Optional[str] = ..., path: _Optional[str] = ..., headers: _Optional[_Iterable[_Union[Header, _Mapping]]] = ..., assertion: _Optional[bytes] = ..., timeout: _Optional[float] = ...) -> None: ...

class RpcResponseHead(_message.Message):
    __slots__ = ("status", "headers", "error", "reason", "retry_after", "grpc_code")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    GRPC_CODE_FIELD_NUMBER: _ClassVar[int]
    status: int
    headers: _containers.RepeatedCompositeFieldContainer[Header]
    error: str
    reason: str
    retry_after: float
    grpc_code: int
    def __init__(self, status: _Optional[int] = ..., headers: _Optional[_Iterable[_Union[Header, _Mapping]]] = ..., error: _Optional[str] = ..., reason: _Optional[str] = ..., retry_after: _Optional[float] = ..., grpc_code: _Optional[int] = ...) -> None: ...
