"""The QSTP tunnel's error tree (handshake, frame protocol, closed tunnels).

    PqcnetError (pqcnet.errors)
    ├── HandshakeError               TLS refused (carries a reason a human can act on)
    ├── ProtocolError                QSTP frame layer (carries its wire error code)
    │   ├── LocalProtocolError       we were asked to do something illegal
    │   └── RemoteProtocolError      the peer sent something illegal
    │       ├── FrameError           a frame could not be decoded
    │       └── FlowControlError     peer exceeded the credit we gave it
    └── TunnelClosed                 operation on a closed tunnel/stream
"""

from __future__ import annotations

from pqcnet.errors import PqcnetError


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
