"""Events the sans-IO :class:`pqcnet.qstp.connection.Connection` emits (pulled via ``next_event``).

Flat, frozen, slotted dataclasses, one per thing the application may need to act on;
the asyncio adapter in :mod:`pqcnet.qstp.aio` is just a dispatcher over these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # qstp.tls is optional at import time for the codec-only users
    from pqcnet.qstp.tls import PeerInfo
else:
    PeerInfo = Any


@dataclass(frozen=True, slots=True)
class HandshakeCompleted:
    """TLS finished, the peer's identity was verified and (client side) the server's
    first QSTP frame arrived, proving it accepted our certificate."""

    peer: PeerInfo
    """Verified identity and negotiated parameters of the peer."""


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The peer opened a new stream (its first DATA frame arrived)."""

    stream_id: int
    """The new stream's id (odd: client-initiated, even: server-initiated)."""


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Payload of one DATA frame. Call ``Connection.consumed`` once the app took it."""

    stream_id: int
    """The stream it arrived on."""
    seq: int
    """Per-stream sequence number, 0, 1, 2, ... (checked monotonic)."""
    data: bytes
    """The payload (may be empty on a bare END_STREAM)."""
    end_stream: bool
    """The peer will send nothing more on this stream."""


@dataclass(frozen=True, slots=True)
class FlowPaused:
    """The peer asked us to stop sending (FLOW PAUSE)."""

    stream_id: int
    """The stream to pause, or 0 for the whole connection."""
    reason: int
    """Application reason code (e.g. a relayer's 'shard full')."""
    retry_after: float
    """Seconds after which the peer suggests trying again (0: wait for RESUME)."""


@dataclass(frozen=True, slots=True)
class FlowResumed:
    """The peer lifted an earlier pause (FLOW RESUME)."""

    stream_id: int
    """The stream resumed, or 0 for the whole connection."""
    reason: int
    """Application reason code."""


@dataclass(frozen=True, slots=True)
class CreditAvailable:
    """The peer granted send credit (ACK); blocked senders may continue."""

    stream_id: int
    """The stream that got credit, or 0 for the connection window."""
    credit: int
    """Bytes now available to send on that window."""


@dataclass(frozen=True, slots=True)
class PingAcknowledged:
    """A PONG answered one of our PINGs."""

    rtt: float
    """Round-trip time in seconds, measured with the ``now`` values we were given."""


@dataclass(frozen=True, slots=True)
class KeyUpdated:
    """A TLS 1.3 KeyUpdate took effect."""

    local: bool
    """True when we initiated it; False when the peer announced it (REKEY frame)."""


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    """The peer is shutting down gracefully: no new streams will be accepted."""

    last_stream_id: int
    """Highest of our streams the peer accepted."""
    last_seq: int
    """Number of our DATA frames the peer processed."""
    code: int
    """Wire error code (0: no error)."""
    reason: str
    """Human-readable reason."""


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The peer aborted one stream with an ERROR frame; the connection lives on."""

    stream_id: int
    """The aborted stream."""
    code: int
    """Wire error code."""
    reason: str
    """Human-readable reason."""


@dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    """The connection is over (cleanly or not); nothing more will be delivered."""

    error_code: int
    """Wire error code (0: clean close)."""
    reason: str
    """Human-readable reason, suitable for a log line or a CLI error."""
    during_handshake: bool = False
    """True when the tunnel never became usable (a handshake/authentication failure)."""
    by_peer: bool = False
    """True when the peer ended it: its close_notify, ERROR frame or fatal TLS alert,
    or the connection dropping. False when this side decided: a refusal by our policy
    or by our TLS stack (no shared group), a bad record or frame detected here, a
    timeout, :meth:`~pqcnet.qstp.connection.Connection.close`."""


Event = (
    HandshakeCompleted
    | StreamOpened
    | DataReceived
    | FlowPaused
    | FlowResumed
    | CreditAvailable
    | PingAcknowledged
    | KeyUpdated
    | GoAwayReceived
    | StreamReset
    | ConnectionTerminated
)
"""Any event :meth:`pqcnet.qstp.connection.Connection.next_event` can return."""
