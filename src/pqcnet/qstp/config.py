"""Typed, validated knobs of a QSTP connection (the ``QuicConfiguration`` of QSTP).

Every bound the frame layer enforces lives here with the risk it limits, so an
operator can tune it and a reviewer can find it. The core never reads env or files:
callers build one of these (the CLI and node config map their settings onto it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pqcnet.qstp.budget import ReceiveBudget
from pqcnet.qstp.frames import MAX_DATA_CHUNK, MAX_FRAME_PAYLOAD

#: Credit every window starts with before the peer's first ACK (both sides assume it,
#: so differently-configured peers still agree; larger windows are granted by ACK).
INITIAL_WINDOW = 64 * 1024


@dataclass(frozen=True, slots=True)
class QstpConfiguration:
    """Limits and timers for one QSTP connection; validated at construction."""

    max_frame_payload: int = MAX_FRAME_PAYLOAD
    """Largest frame payload we accept: bounds memory pinned by one incomplete frame."""
    max_data_chunk: int = MAX_DATA_CHUNK
    """Largest DATA payload we send (must not exceed the peer's ``max_frame_payload``)."""
    stream_window: int = 4 * 1024 * 1024
    """Receive credit per stream: bounds bytes buffered for a slow reader of one stream.
    4 MiB: at ~1 GB/s one scheduler wake-up (~1 ms on a busy host) moves ~1 MB, and the
    receiver grants credit at half a window; with 1 MiB a bulk sender stalled on credit
    (``benchmarks/README.md``, "qstp — issue 15 follow-up")."""
    connection_window: int = 8 * 1024 * 1024
    """Receive credit for all streams together: bounds a connection's buffered bytes."""
    max_streams: int = 256
    """Concurrent peer-opened streams: bounds per-stream state a peer can create."""
    max_pending_send: int = 4 * 1024 * 1024
    """Plaintext queued for TLS before ``data_to_send`` must be called (local misuse)."""
    handshake_timeout: float = 10.0
    """Seconds a handshake may take: a stalled peer cannot pin a connection slot."""
    idle_timeout: float = 300.0
    """Seconds without any bytes from the peer before the connection is closed."""
    close_timeout: float = 5.0
    """Seconds ``Tunnel.close()`` waits for unsent bytes to drain before aborting the
    socket: a peer that stops reading cannot hold a closing tunnel (or a server's
    shutdown) open."""
    keepalive: bool = True
    """PING after ``idle_timeout / 2`` of silence, so a quiet but live tunnel stays up."""
    rekey_after_bytes: int = 1 << 30
    """TLS KeyUpdate after this many plaintext bytes sent (0 disables)."""
    rekey_interval: float = 3600.0
    """TLS KeyUpdate after this many seconds (0 disables)."""
    tls_key_update: bool = True
    """Rekey with TLS 1.3 KeyUpdate. ``False`` behaves exactly like a process whose
    OpenSSL self-check disabled ``SSL_key_update`` (:func:`pqcnet.qstp._ossl.capabilities`):
    when a rekey falls due the connection sends GOAWAY asking the peer to reconnect
    (fresh keys come with the new handshake), and closes the tunnel when the *next*
    rekey falls due — so no key protects more than ``2 * rekey_after_bytes`` or lives
    longer than ``2 * rekey_interval`` even with a peer that never reconnects."""

    receive_budget: ReceiveBudget | None = None
    """Receive credit shared by every connection made with these settings (a server's
    ``tunnel_buffer_total_bytes``): each takes its window beyond ``INITIAL_WINDOW``
    from it, so together they cannot be made to buffer more than its total plus
    ``INITIAL_WINDOW`` each (:mod:`pqcnet.qstp.budget`). None: no shared bound."""

    def with_buffer(self, window: int, total: int | None = None) -> QstpConfiguration:
        """These settings with ``window`` as the most one tunnel may make us buffer: the
        connection window we grant, and each stream's the smaller of it and ours (what a
        server's ``tunnel_buffer_bytes`` means). With ``total``, one new
        :class:`ReceiveBudget` of that many bytes for all the tunnels (a server's
        ``tunnel_buffer_total_bytes``); else ``max_tunnels`` times ``window`` bounds them."""
        return replace(self, connection_window=window,
                       stream_window=min(self.stream_window, window),
                       receive_budget=None if total is None else ReceiveBudget(total))

    def __post_init__(self) -> None:
        positive = {
            "max_frame_payload": self.max_frame_payload,
            "max_data_chunk": self.max_data_chunk,
            "stream_window": self.stream_window,
            "connection_window": self.connection_window,
            "max_streams": self.max_streams,
            "max_pending_send": self.max_pending_send,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"QstpConfiguration.{name} must be > 0, got {value}")
        for name, fvalue in (("handshake_timeout", self.handshake_timeout),
                             ("idle_timeout", self.idle_timeout),
                             ("close_timeout", self.close_timeout)):
            if fvalue <= 0:
                raise ValueError(f"QstpConfiguration.{name} must be > 0, got {fvalue}")
        if self.rekey_after_bytes < 0 or self.rekey_interval < 0:
            raise ValueError("rekey_after_bytes / rekey_interval must be >= 0 (0 disables)")
        if self.max_data_chunk > self.max_frame_payload:
            raise ValueError("max_data_chunk must not exceed max_frame_payload")
        if self.stream_window < INITIAL_WINDOW or self.connection_window < INITIAL_WINDOW:
            raise ValueError(f"windows must be at least INITIAL_WINDOW ({INITIAL_WINDOW})")
        if self.stream_window > 0x7FFFFFFF or self.connection_window > 0x7FFFFFFF:
            raise ValueError("windows must fit in 31 bits")
