"""The root of every pqcnet exception, and the QSTP tunnel's own error tree.

Every package roots its errors in :class:`PqcnetError` so a caller (CLI, service
loop) can catch one class and turn it into a clear message instead of a traceback::

    PqcnetError
    ├── CryptoError                  a primitive refused its input
    │   └── SignatureInvalid         ML-DSA verification failed
    │   └── SealError                hybrid open failed (wrong key, tampered blob)
    ├── IdentityError                certificate / CA / key-store problems
    │   └── PolicyViolation          a CSR or certificate outside the CA's policy
    ├── HandshakeError               TLS refused (carries a reason a human can act on)
    ├── ProtocolError                QSTP frame layer (carries its wire error code)
    │   ├── LocalProtocolError       we were asked to do something illegal
    │   └── RemoteProtocolError      the peer sent something illegal
    ├── FlowControlError             peer exceeded the credit we gave it
    └── TunnelClosed                 operation on a closed tunnel/stream

`qstp` is the lowest package, so the pqcnet-wide root lives here and every other
package imports it from ``qstp.errors``.
"""

from __future__ import annotations


class PqcnetError(Exception):
    """Root of all pqcnet errors."""


class CryptoError(PqcnetError):
    """A cryptographic primitive rejected its input."""


class SignatureInvalid(CryptoError):
    """A signature did not verify under the given key and context."""


class SealError(CryptoError):
    """A sealed message could not be opened (wrong recipient, tampered or truncated)."""


class IdentityError(PqcnetError):
    """Certificates, CA, CSRs, CRLs or the key store."""


class PolicyViolation(IdentityError):
    """A request (CSR, issuance, peer identity) falls outside the configured policy."""


class HandshakeError(PqcnetError):
    """The TLS handshake failed or the peer's identity was refused."""


class ProtocolError(PqcnetError):
    """A QSTP frame-layer violation. ``code`` is the wire error code sent in ERROR."""

    code: int = 1  # PROTOCOL_ERROR

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class LocalProtocolError(ProtocolError):
    """The local application asked for something the protocol forbids."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that violate the protocol."""


class FrameError(RemoteProtocolError):
    """A frame could not be decoded (bad header, version, type, length)."""

    code = 2  # FRAME_ERROR


class FlowControlError(RemoteProtocolError):
    """The peer sent more than the credit window allowed."""

    code = 3  # FLOW_CONTROL_ERROR


class TunnelClosed(PqcnetError):
    """The tunnel or stream is closed; the operation cannot proceed."""
