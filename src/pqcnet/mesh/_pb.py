"""The protobuf boundary of the mesh: parse bytes, or raise the caller's typed error.

Every message the mesh decodes (wire envelopes, bodies, directives, stored bundles)
fails the same way — a one-line error of the kind that the caller counts or
reports — so the try/except lives here once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from google.protobuf.message import DecodeError
from google.protobuf.message import Message as _PbMessage

M = TypeVar("M", bound=_PbMessage)


def parse(cls: type[M], data: bytes, error: Callable[[str], Exception], message: str) -> M:
    """``cls`` parsed from ``data``; ``error(message)`` if the bytes do not decode."""
    try:
        return cls.FromString(data)
    except DecodeError:
        raise error(message) from None
