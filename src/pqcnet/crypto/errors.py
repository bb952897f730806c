"""Errors of the post-quantum primitives (ML-KEM, ML-DSA, hybrid sealing)."""

from __future__ import annotations

from pqcnet.errors import PqcnetError

__all__ = ["CryptoError", "SealError", "SignatureInvalid"]


class CryptoError(PqcnetError):
    """A cryptographic primitive rejected its input."""


class SignatureInvalid(CryptoError):
    """A signature did not verify under the given key and context."""


class SealError(CryptoError):
    """A sealed message could not be opened (wrong recipient, tampered or truncated)."""
