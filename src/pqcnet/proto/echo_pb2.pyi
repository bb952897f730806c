from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class EchoRequest(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class EchoReply(_message.Message):
    __slots__ = ("text", "metadata")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    text: str
    metadata: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, text: _Optional[str] = ..., metadata: _Optional[_Iterable[str]] = ...) -> None: ...

class CountRequest(_message.Message):
    __slots__ = ("count", "size", "fail_after")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    FAIL_AFTER_FIELD_NUMBER: _ClassVar[int]
    count: int
    size: int
    fail_after: str
    def __init__(self, count: _Optional[int] = ..., size: _Optional[int] = ..., fail_after: _Optional[str] = ...) -> None: ...

class CountReply(_message.Message):
    __slots__ = ("seq", "padding")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    seq: int
    padding: bytes
    def __init__(self, seq: _Optional[int] = ..., padding: _Optional[bytes] = ...) -> None: ...
