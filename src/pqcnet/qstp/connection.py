"""The sans-IO QSTP connection: a memory-BIO TLS 1.3 object plus the frame state machine.

Bytes in, events out; calls in, bytes out. Nothing here touches a socket, a loop or a
clock (time arrives as ``now`` arguments), so tests and simulations drive the real
protocol deterministically and :mod:`pqcnet.qstp.aio` stays a thin dispatcher::

    conn = Connection(tls, client=True, verify=..., config=QstpConfiguration())
    conn.start(now)                      # client: ClientHello is now in data_to_send()
    conn.receive_data(data, now)         # TLS records from the peer
    while (event := conn.next_event()):  # HandshakeCompleted, DataReceived, ...
        ...
    sock.sendall(conn.data_to_send())
    timer = conn.get_timer()             # call handle_timer(now) when it passes

Protocol rules (see :mod:`pqcnet.qstp.frames` for the wire layout):

* Streams: client-initiated ids are odd, server-initiated even, each side counting up;
  a peer's first DATA on a new id opens it. Stream 0 carries connection control.
  Stream states move only through :data:`STREAM_TRANSITIONS`; anything else is a
  protocol error (Remote if the peer caused it, Local if the application did).
* Sequence numbers: DATA ``seq`` counts 0, 1, 2, ... per stream; control frames on
  stream 0 count their own sequence. A gap or replay is a ``SEQUENCE_ERROR``.
* Flow control: every stream and the connection start with :data:`INITIAL_WINDOW`
  bytes of credit; receivers grant more with ACK once the application *consumed*
  data (:meth:`Connection.consumed`), so a slow reader stalls its sender instead of
  growing buffers. Each side's first frame after the handshake (the *preface*) is an
  ACK raising the connection window; the client reports ``HandshakeCompleted`` only
  when it arrives, which proves the server accepted the client certificate.
* Rekey: a TLS 1.3 KeyUpdate after ``rekey_after_bytes`` or ``rekey_interval``,
  announced by a REKEY frame that already travels under the new keys. Without
  KeyUpdate (the process's OpenSSL self-check disabled it, see :mod:`pqcnet.qstp._ossl`,
  or ``QstpConfiguration.tls_key_update=False``) the fallback is a reconnect: the first
  due rekey sends GOAWAY (reason :data:`REKEY_BY_RECONNECT`; running streams finish,
  no new ones) and sets :attr:`Connection.rekey_overdue`; the next one closes.
* Shutdown: GOAWAY (last accepted stream, DATA frames processed) then TLS close_notify.
* Failure: any malformed input becomes an ERROR frame (or a TLS alert during the
  handshake) plus :class:`~pqcnet.qstp.events.ConnectionTerminated`; never an escaping exception.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from OpenSSL import SSL

from pqcnet.crypto.errors import CryptoError
from pqcnet.errors import PqcnetError
from pqcnet.qstp import _ossl
from pqcnet.qstp import events as ev
from pqcnet.qstp import frames as fr
from pqcnet.qstp.config import INITIAL_WINDOW, QstpConfiguration
from pqcnet.qstp.errors import (
    FlowControlError,
    HandshakeError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    TunnelClosed,
)
from pqcnet.qstp.frames import ErrorCode, FrameType

if TYPE_CHECKING:
    from pqcnet.qstp.tls import PeerInfo
else:
    PeerInfo = Any

log = logging.getLogger(__name__)

#: Outstanding PINGs we track; more would let a caller grow the table without bound.
MAX_OUTSTANDING_PINGS = 16
#: ``Flags.END_STREAM`` as a plain int: ``int & IntFlag`` goes through enum's
#: Python-level operator on every DATA frame.
_END_STREAM = int(fr.Flags.END_STREAM)
_MAX_WINDOW = 0x7FFFFFFF
#: GOAWAY reason when a rekey falls due and TLS KeyUpdate is unavailable.
REKEY_BY_RECONNECT = "rekey due and TLS KeyUpdate unavailable: reconnect for fresh keys"


class ConnectionState(enum.Enum):
    """Lifecycle of a connection."""

    HANDSHAKING = "handshaking"
    AWAIT_PREFACE = "await_preface"  # client: TLS done, waiting for the server's first frame
    OPEN = "open"
    CLOSED = "closed"


class StreamState(enum.Enum):
    """Lifecycle of one stream (h2-style half-closes)."""

    OPEN = "open"
    HALF_CLOSED_LOCAL = "half_closed_local"  # we sent END_STREAM
    HALF_CLOSED_REMOTE = "half_closed_remote"  # the peer sent END_STREAM
    CLOSED = "closed"


class StreamInput(enum.Enum):
    """What can happen to a stream."""

    SEND_DATA = "send_data"
    SEND_END = "send_end"
    RECV_DATA = "recv_data"
    RECV_END = "recv_end"


_S, _I = StreamState, StreamInput
#: The whole stream state machine: (state, input) -> next state. A missing key is a
#: protocol error; RESET (ERROR frame on a stream) closes from any state.
STREAM_TRANSITIONS: dict[tuple[StreamState, StreamInput], StreamState] = {
    (_S.OPEN, _I.SEND_DATA): _S.OPEN,
    (_S.OPEN, _I.SEND_END): _S.HALF_CLOSED_LOCAL,
    (_S.OPEN, _I.RECV_DATA): _S.OPEN,
    (_S.OPEN, _I.RECV_END): _S.HALF_CLOSED_REMOTE,
    (_S.HALF_CLOSED_LOCAL, _I.RECV_DATA): _S.HALF_CLOSED_LOCAL,
    (_S.HALF_CLOSED_LOCAL, _I.RECV_END): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, _I.SEND_DATA): _S.HALF_CLOSED_REMOTE,
    (_S.HALF_CLOSED_REMOTE, _I.SEND_END): _S.CLOSED,
}


class _Stream:
    __slots__ = ("acked_initial", "id", "recv_pending", "recv_seq", "recv_window",
                 "send_credit", "send_seq", "state")

    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        self.state = StreamState.OPEN
        self.send_seq = 0
        self.recv_seq = 0
        self.send_credit = INITIAL_WINDOW
        self.recv_window = INITIAL_WINDOW
        self.recv_pending = 0
        self.acked_initial = False

    def transition(self, what: StreamInput) -> None:
        nxt = STREAM_TRANSITIONS.get((self.state, what))
        if nxt is None:
            msg = f"stream {self.id}: {what.value} not allowed in state {self.state.value}"
            if what in (StreamInput.RECV_DATA, StreamInput.RECV_END):
                raise RemoteProtocolError(msg, code=ErrorCode.STREAM_ERROR)
            raise LocalProtocolError(msg, code=ErrorCode.STREAM_ERROR)
        self.state = nxt


class Connection:
    """One QSTP connection over a memory-BIO ``SSL.Connection`` (see module docstring).

    ``verify`` checks the peer once TLS finishes (``pqcnet.qstp.tls.verify_peer`` bound to the
    local identity and policy) and returns its :class:`~pqcnet.qstp.tls.PeerInfo`, or raises
    :class:`~pqcnet.qstp.errors.HandshakeError`.
    """

    def __init__(
        self,
        tls: SSL.Connection,
        *,
        client: bool,
        verify: Callable[[SSL.Connection], PeerInfo],
        config: QstpConfiguration | None = None,
    ) -> None:
        self.config = config or QstpConfiguration()
        self.tls = tls
        self.is_client = client
        self._verify = verify
        self.state = ConnectionState.HANDSHAKING
        self.peer: PeerInfo | None = None
        self._events: deque[ev.Event] = deque()
        self._out = bytearray()  # encoded frames not yet handed to TLS
        self._decoder = fr.FrameDecoder(self.config.max_frame_payload)
        self._streams: dict[int, _Stream] = {}
        self._next_local_id = 1 if client else 2
        # highest peer-initiated id seen (peers count 1, 3, 5 ... or 2, 4, 6 ...), and the
        # lower ids the peer skipped over: it may still send on them (bounded by max_streams)
        self._last_peer_id = 0 if client else -1
        self._peer_gaps: set[int] = set()
        self._peer_streams = 0  # open peer-initiated streams (bounded by max_streams)
        self._ctl_send_seq = 0
        self._ctl_recv_seq = 0
        self._conn_send_credit = INITIAL_WINDOW
        self._conn_recv_window = INITIAL_WINDOW
        self._conn_recv_pending = 0
        #: connection credit beyond INITIAL_WINDOW held from ``config.receive_budget``
        self._reserved = 0
        #: pending consumed bytes at which connection credit goes back: half of the
        #: window we grant (with a budget, of the window we hold; set at the preface)
        self._ack_at = self.config.connection_window // 2
        self._data_frames_received = 0
        #: DATA bytes received and dropped (a refused or released stream, after GOAWAY):
        #: never delivered, their connection credit goes back to the peer
        self.dropped_data_bytes = 0
        self._pings: dict[bytes, float] = {}
        self._keepalive: bytes | None = None  # payload of the outstanding keepalive PING
        self._ping_counter = 0
        self._goaway_sent = False
        self._goaway_received = False
        self._peer_paused: dict[int, ev.FlowPaused] = {}
        self._started = False
        self._tls_established = False
        #: the memory BIOs still hold their handshake-sized buffers
        self._bios_to_shrink = True
        self._handshake_deadline: float | None = None
        self._last_recv = 0.0
        self._last_rekey = 0.0
        self._bytes_since_rekey = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.key_updates = 0
        self.rekey_overdue = False
        """A rekey fell due without KeyUpdate: GOAWAY was sent, the next due one closes."""

    # ------------------------------------------------------------------ public state

    @property
    def closed(self) -> bool:
        """True once the connection terminated (events may still be queued)."""
        return self.state is ConnectionState.CLOSED

    @property
    def session(self) -> SSL.Session | None:
        """The TLS session for resumption (client side; set once a ticket arrived)."""
        if self.state is ConnectionState.HANDSHAKING:
            return None
        try:
            return self.tls.get_session()
        except SSL.Error:  # pragma: no cover - defensive
            return None

    @property
    def key_update_available(self) -> bool:
        """Whether rekeys use TLS KeyUpdate (else the reconnect fallback applies)."""
        return self.config.tls_key_update and _ossl.key_update_supported()

    @property
    def pending_send(self) -> int:
        """Plaintext frame bytes queued since the last :meth:`data_to_send`."""
        return len(self._out)

    @property
    def connection_send_window(self) -> int:
        """Bytes the peer lets this side send on the whole connection right now (its
        connection window minus what is in flight): what the peer agreed to buffer."""
        return max(0, self._conn_send_credit)

    def send_window(self, stream_id: int) -> int:
        """Bytes that may be sent on ``stream_id`` right now (0 when blocked)."""
        st = self._streams.get(stream_id)
        if st is None or st.state not in (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE):
            return 0
        return max(0, min(st.send_credit, self._conn_send_credit))

    def stream_state(self, stream_id: int) -> StreamState | None:
        """State of a stream, or None when it is unknown or already released."""
        st = self._streams.get(stream_id)
        return None if st is None else st.state

    @property
    def any_peer_pause(self) -> bool:
        """Whether the peer has any PAUSE in force (tunnel-wide or on some stream)."""
        return bool(self._peer_paused)

    def peer_paused(self, stream_id: int = 0) -> ev.FlowPaused | None:
        """The active PAUSE the peer sent for ``stream_id`` (0: whole connection)."""
        return self._peer_paused.get(stream_id)

    # ------------------------------------------------------------------ driving inputs

    def start(self, now: float) -> None:
        """Begin: arm the handshake timer; a client also produces its ClientHello."""
        if self._started:
            return
        self._started = True
        self._handshake_deadline = now + self.config.handshake_timeout
        self._last_recv = now
        if self.is_client:
            self._drive_handshake(now)

    def receive_data(self, data: bytes, now: float) -> None:
        """Feed TLS bytes from the peer. Never raises for bad input: it ends the
        connection with :class:`~pqcnet.qstp.events.ConnectionTerminated` instead."""
        if self.state is ConnectionState.CLOSED or not data:
            return
        if not self._started:
            self.start(now)
        self._last_recv = now
        self.bytes_received += len(data)
        try:
            self.tls.bio_write(data)
        except SSL.Error as exc:  # pragma: no cover - memory BIO writes do not fail
            self._terminate(ErrorCode.TLS_ERROR, _ssl_reason(exc), by_peer=False)
            return
        if self.state is ConnectionState.HANDSHAKING:
            self._drive_handshake(now)
            if self.state in (ConnectionState.HANDSHAKING, ConnectionState.CLOSED):
                return
        self._read_records(now)

    def receive_eof(self, now: float) -> None:
        """The transport reached EOF (or broke) without a TLS close_notify."""
        if self.state is ConnectionState.CLOSED:
            return
        hs = self.state in (ConnectionState.HANDSHAKING, ConnectionState.AWAIT_PREFACE)
        reason = ("peer closed the connection during the handshake" if hs else
                  "peer closed the connection without a TLS close_notify (truncated)")
        self._terminate(ErrorCode.TLS_ERROR, reason, by_peer=True, send=False)

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must next be called (None: no timer)."""
        if self.state is ConnectionState.CLOSED or not self._started:
            return None
        if self.state is not ConnectionState.OPEN:
            return self._handshake_deadline
        timer = self._last_recv + self.config.idle_timeout
        if self.config.keepalive and self._keepalive is None:
            timer = self._last_recv + self.config.idle_timeout / 2
        if self.config.rekey_interval:
            timer = min(timer, self._last_rekey + self.config.rekey_interval)
        return timer

    def handle_timer(self, now: float) -> None:
        """Fire due timers: handshake timeout, keepalive PING, idle timeout, rekey."""
        if self.state is ConnectionState.CLOSED or not self._started:
            return
        if self.state is not ConnectionState.OPEN:
            if self._handshake_deadline is not None and now >= self._handshake_deadline:
                self._terminate(
                    ErrorCode.HANDSHAKE_TIMEOUT,
                    f"handshake did not complete within {self.config.handshake_timeout:g}s",
                    by_peer=False,
                    send=False,
                )
            return
        if now >= self._last_recv + self.config.idle_timeout:
            self.close(ErrorCode.IDLE_TIMEOUT,
                       f"no data from peer for {self.config.idle_timeout:g}s")
            return
        if (self.config.keepalive and self._keepalive is None
                and now >= self._last_recv + self.config.idle_timeout / 2):
            # quiet for half the idle timeout: a PING makes a live peer answer
            self._ping_counter += 1
            self._keepalive = self._ping_counter.to_bytes(8, "big")
            self._queue(FrameType.PING, 0, None, self._keepalive)
        if self.config.rekey_interval and now >= self._last_rekey + self.config.rekey_interval:
            self._auto_rekey(now)

    def next_event(self) -> ev.Event | None:
        """Pop the next event, or None."""
        return self._events.popleft() if self._events else None

    def data_to_send(self) -> bytes:
        """Encrypted bytes to write to the transport (empty when nothing is pending)."""
        self._flush_plain()
        waiting = _ossl.pending_out(self.tls)  # exactly what is there: one read drains it
        data = self.tls.bio_read(waiting) if waiting else b""
        self.bytes_sent += len(data)
        if self._bios_to_shrink and self._tls_established:
            # the handshake's flights are out: drop the BIOs' grown buffers (see
            # _ossl.fresh_bios); retried on the next call while a partial record waits
            self._bios_to_shrink = not _ossl.fresh_bios(self.tls)
        return data

    # ------------------------------------------------------------------ application calls

    def open_stream(self) -> int:
        """Allocate a new local stream id; it exists for the peer once DATA is sent."""
        self._require_open()
        if self._goaway_received or self._goaway_sent:
            raise TunnelClosed("tunnel is going away; no new streams")
        sid = self._next_local_id
        if sid > 0xFFFFFFFF:
            raise LocalProtocolError("stream ids exhausted; open a new tunnel",
                                     code=ErrorCode.STREAM_LIMIT)
        self._next_local_id += 2
        self._streams[sid] = _Stream(sid)
        return sid

    def send_data(self, stream_id: int, data: bytes | memoryview, *,
                  end_stream: bool = False) -> None:
        """Queue ``data`` on a stream. ``len(data)`` must fit :meth:`send_window`;
        large data is split into ``max_data_chunk`` frames."""
        self._require_open()
        st = self._streams.get(stream_id)
        if st is None:
            raise TunnelClosed(f"stream {stream_id} is not open")
        n = len(data)
        if n > st.send_credit or n > self._conn_send_credit:
            raise LocalProtocolError(
                f"stream {stream_id}: {n} bytes exceed the send window "
                f"{self.send_window(stream_id)}", code=ErrorCode.FLOW_CONTROL_ERROR)
        if st.state not in (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE):
            raise TunnelClosed(f"stream {stream_id} is closed for sending")
        st.send_credit -= n
        self._conn_send_credit -= n
        pack = fr.HEADER.pack
        chunk = self.config.max_data_chunk
        rekey_after = self.config.rekey_after_bytes
        if n <= chunk and st.acked_initial and not end_stream:  # the common small write
            out = self._out
            out += pack(fr.VERSION, FrameType.DATA, 0, stream_id, st.send_seq, n)
            out += data
            st.send_seq += 1
            self._bytes_since_rekey += n
            if rekey_after and self._bytes_since_rekey >= rekey_after:
                self._auto_rekey(None)
                self._check_not_closed_by_rekey()
            elif len(out) >= self.config.max_pending_send:
                self._flush_plain()
            return
        view = memoryview(data)
        pos = 0
        while True:
            piece = view[pos : pos + chunk]
            pos += len(piece)
            last = pos >= n
            flags = fr.Flags.END_STREAM if (last and end_stream) else 0
            out = self._out
            out += pack(fr.VERSION, FrameType.DATA, flags, stream_id, st.send_seq, len(piece))
            out += piece
            st.send_seq += 1
            self._bytes_since_rekey += len(piece)
            if rekey_after and self._bytes_since_rekey >= rekey_after:
                self._auto_rekey(None)  # rekeys between frames, so big writes rekey too
                self._check_not_closed_by_rekey()
            if last:
                break
        if not st.acked_initial:
            st.acked_initial = True
            self._grant_initial(st)
        if end_stream:
            st.transition(StreamInput.SEND_END)
            self._maybe_release(st)
        if len(self._out) >= self.config.max_pending_send:
            self._flush_plain()

    def end_stream(self, stream_id: int) -> None:
        """Half-close: send an empty DATA frame with END_STREAM."""
        self.send_data(stream_id, b"", end_stream=True)

    def reset_stream(self, stream_id: int, code: int = ErrorCode.CANCELLED,
                     reason: str = "") -> None:
        """Abort one stream with an ERROR frame; the connection stays up."""
        self._require_open()
        st = self._streams.pop(stream_id, None)
        if st is None:
            return
        if self._is_peer_id(stream_id):
            self._peer_streams -= 1
        st.state = StreamState.CLOSED
        self._queue(FrameType.ERROR, stream_id, 0, fr.error_payload(code, reason))

    def consumed(self, stream_id: int, n: int) -> bool:
        """The application took ``n`` received bytes of ``stream_id``: return credit.

        Credit goes back in ACK frames once half a window is pending; returns whether
        one was queued (a caller driving I/O has something to send only then)."""
        if n <= 0 or self.state is not ConnectionState.OPEN:
            return False
        self._conn_recv_pending += n
        queued = self._conn_recv_pending >= self._ack_at
        if queued:
            self._return_credit()
        st = self._streams.get(stream_id)
        if st is None or st.state in (StreamState.HALF_CLOSED_REMOTE, StreamState.CLOSED):
            return queued
        st.recv_pending += n
        if st.recv_pending >= self.config.stream_window // 2:
            inc, st.recv_pending = st.recv_pending, 0
            st.recv_window += inc
            self._queue(FrameType.ACK, stream_id, max(0, st.recv_seq - 1), fr.ack_payload(inc))
            queued = True
        return queued

    def pause(self, stream_id: int = 0, reason: int = 0, retry_after: float = 0.0) -> None:
        """Ask the peer to stop sending on ``stream_id`` (0: everything)."""
        self._require_open()
        ms = min(max(0, round(retry_after * 1000)), 0xFFFFFFFF)
        self._queue(FrameType.FLOW, stream_id, 0,
                    fr.flow_payload(fr.FlowOp.PAUSE, reason & 0xFFFF, ms))

    def resume(self, stream_id: int = 0, reason: int = 0) -> None:
        """Lift an earlier :meth:`pause`."""
        self._require_open()
        self._queue(FrameType.FLOW, stream_id, 0,
                    fr.flow_payload(fr.FlowOp.RESUME, reason & 0xFFFF, 0))

    def ping(self, now: float) -> None:
        """Send a PING; a :class:`~pqcnet.qstp.events.PingAcknowledged` follows the PONG."""
        self._require_open()
        if len(self._pings) >= MAX_OUTSTANDING_PINGS:
            raise LocalProtocolError(f"more than {MAX_OUTSTANDING_PINGS} PINGs outstanding")
        self._ping_counter += 1
        opaque = self._ping_counter.to_bytes(8, "big")
        self._pings[opaque] = now
        self._queue(FrameType.PING, 0, None, opaque)

    def rekey(self, now: float | None = None) -> None:
        """TLS 1.3 KeyUpdate (asking the peer to update too) + a REKEY frame."""
        self._require_open()
        if not self.key_update_available:
            raise CryptoError("TLS KeyUpdate is unavailable (OpenSSL build or "
                              "tls_key_update=False): rekey by reconnecting")
        self._flush_plain()  # everything queued so far goes out under the old keys
        _ossl.key_update(self.tls, request_peer=True)
        self._queue(FrameType.REKEY, 0, None, b"")
        self._bytes_since_rekey = 0
        if now is not None:
            self._last_rekey = now
        self.key_updates += 1
        self._events.append(ev.KeyUpdated(local=True))

    def goaway(self, code: int = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Announce graceful shutdown: no new streams from the peer will be accepted."""
        if self.state is not ConnectionState.OPEN or self._goaway_sent:
            return
        self._goaway_sent = True
        self._queue(FrameType.GOAWAY, 0, None, fr.goaway_payload(
            max(0, self._last_peer_id), self._data_frames_received, code, reason))

    def close(self, code: int = ErrorCode.NO_ERROR, reason: str = "closed") -> None:
        """GOAWAY (when open) + TLS close_notify; emits ConnectionTerminated."""
        if self.state is ConnectionState.CLOSED:
            return
        if self.state is ConnectionState.OPEN:
            self.goaway(code, reason)
            self._terminate(code, reason, by_peer=False, send=False)
        else:
            self._terminate(code, reason, by_peer=False, send=True)

    # ------------------------------------------------------------------ internals

    def _require_open(self) -> None:
        if self.state is ConnectionState.CLOSED:
            raise TunnelClosed("tunnel is closed")
        if self.state is not ConnectionState.OPEN:
            raise LocalProtocolError("tunnel handshake has not completed")

    def _is_peer_id(self, stream_id: int) -> bool:
        return (stream_id % 2 == 0) if self.is_client else (stream_id % 2 == 1)

    def _queue(self, ftype: FrameType, stream_id: int, seq: int | None,
               payload: bytes, flags: int = 0) -> None:
        if seq is None:
            seq = self._ctl_send_seq
        if stream_id == 0:
            seq = self._ctl_send_seq
            self._ctl_send_seq += 1
        self._out += fr.HEADER.pack(fr.VERSION, ftype, flags, stream_id, seq, len(payload))
        self._out += payload

    def _flush_plain(self) -> None:
        if not self._out:
            return
        out, self._out = self._out, bytearray()
        try:
            self.tls.sendall(out)
        except SSL.Error as exc:
            self._out = bytearray()
            if self.state is not ConnectionState.CLOSED:
                self._terminate(ErrorCode.TLS_ERROR, _ssl_reason(exc), by_peer=False,
                                send=False)

    def _grant_initial(self, st: _Stream) -> None:
        extra = self.config.stream_window - INITIAL_WINDOW
        if extra > 0:
            st.recv_window += extra
            self._queue(FrameType.ACK, st.id, 0, fr.ack_payload(extra))

    def _drive_handshake(self, now: float) -> None:
        try:
            self.tls.do_handshake()
        except SSL.WantReadError:
            return
        except (SSL.Error, HandshakeError) as exc:
            # a verify-callback refusal (HandshakeError) already made OpenSSL queue an
            # alert; so did a refusal by OpenSSL itself (e.g. no shared group): only a
            # failure the peer caused by its own alert or close is "by peer"
            self._terminate(ErrorCode.HANDSHAKE_FAILED, _handshake_reason(exc),
                            by_peer=_ended_by_peer(exc), send=False,
                            during_handshake=True)
            return
        self._tls_established = True
        try:
            self.peer = self._verify(self.tls)
        except HandshakeError as exc:
            self._terminate(ErrorCode.HANDSHAKE_FAILED, str(exc), by_peer=False,
                            during_handshake=True)
            return
        except PqcnetError as exc:
            self._terminate(ErrorCode.HANDSHAKE_FAILED, f"peer verification failed: {exc}",
                            by_peer=False, during_handshake=True)
            return
        self._last_rekey = now
        self.state = ConnectionState.AWAIT_PREFACE if self.is_client else ConnectionState.OPEN
        # the preface: raise the peer's view of our connection window (from the shared
        # budget if there is one; an ACK of 0 still completes the peer's handshake)
        extra = self.config.connection_window - INITIAL_WINDOW
        budget = self.config.receive_budget
        if budget is not None:
            extra = self._reserved = budget.reserve_window(extra)
            self._ack_at = (INITIAL_WINDOW + extra) // 2
        self._conn_recv_window += extra
        self._queue(FrameType.ACK, 0, None, fr.ack_payload(extra))
        if not self.is_client:
            self._events.append(ev.HandshakeCompleted(peer=self.peer))

    def _read_records(self, now: float) -> None:
        """Decrypt every complete record, then decode the plaintext in one batch.

        A TLS record holds at most 16 KiB, so a 64 KiB frame spans four; decoding
        the joined plaintext once (instead of per record) avoids re-buffering.
        """
        limit = self.config.max_frame_payload * 4
        while self.state is not ConnectionState.CLOSED:
            plain, failure = _ossl.read_plaintext(self.tls, limit)
            if plain and not self._decode(plain, now):
                return
            if failure is not None:
                self._on_tls_failure(failure)
                return
            if len(plain) < limit:
                return

    def _decode(self, plain: bytes | memoryview, now: float) -> bool:
        """Handle the frames in ``plain``; False once the connection closed."""
        try:
            for frame in self._decoder.feed(plain):
                self._handle_frame(frame, now)
                if self.closed:
                    return False
        except RemoteProtocolError as exc:
            self._terminate(exc.code, str(exc), by_peer=False)
            return False
        return True

    def _on_tls_failure(self, exc: BaseException) -> None:
        if self.closed:
            return
        if isinstance(exc, SSL.ZeroReturnError):
            self._on_close_notify()
            return
        hs = self.state is ConnectionState.AWAIT_PREFACE
        self._terminate(ErrorCode.HANDSHAKE_FAILED if hs else ErrorCode.TLS_ERROR,
                        _handshake_reason(exc) if hs else _ssl_reason(exc),
                        by_peer=_ended_by_peer(exc), send=False, during_handshake=hs)

    def _on_close_notify(self) -> None:
        hs = self.state is not ConnectionState.OPEN
        reason = "peer closed the tunnel" + (" during the handshake" if hs else "")
        self._terminate(ErrorCode.NO_ERROR, reason, by_peer=True, send=False,
                        during_handshake=hs)

    def _handle_frame(self, frame: fr.Frame, now: float) -> None:
        if self.state is ConnectionState.AWAIT_PREFACE:
            if frame.type is FrameType.ERROR and frame.stream_id == 0:
                code, reason = fr.parse_error(frame)
                self._terminate(code, f"server refused the tunnel: {reason}", by_peer=True,
                                during_handshake=True)
                return
            self.state = ConnectionState.OPEN
            assert self.peer is not None
            self._events.append(ev.HandshakeCompleted(peer=self.peer))
        if frame.stream_id == 0:
            if frame.seq != self._ctl_recv_seq:
                raise RemoteProtocolError(
                    f"control frame seq {frame.seq}, expected {self._ctl_recv_seq}",
                    code=ErrorCode.SEQUENCE_ERROR)
            self._ctl_recv_seq += 1
        handler = _HANDLERS[frame.type]
        handler(self, frame, now)

    def _on_data(self, frame: fr.Frame, now: float) -> None:
        sid = frame.stream_id
        n = len(frame.payload)
        self._conn_recv_window -= n
        if self._conn_recv_window < 0:
            raise FlowControlError(f"peer exceeded the connection window by "
                                   f"{-self._conn_recv_window} bytes")
        st = self._streams.get(sid)
        if st is None:
            if not self._is_peer_id(sid):
                if sid >= self._next_local_id:
                    raise RemoteProtocolError(f"DATA on stream {sid} that we never opened",
                                              code=ErrorCode.STREAM_ERROR)
                self._late_data(n)
                return
            if sid <= self._last_peer_id:
                if sid not in self._peer_gaps:
                    self._late_data(n)  # a stream we already reset or finished
                    return
                # the peer allocated this id before a higher one but sent on it later
                self._peer_gaps.discard(sid)
            else:
                skipped = (sid - self._last_peer_id) // 2 - 1
                if skipped > 0:
                    if len(self._peer_gaps) + skipped > self.config.max_streams:
                        raise RemoteProtocolError(
                            f"peer skipped {skipped} stream ids (limit {self.config.max_streams})",
                            code=ErrorCode.STREAM_LIMIT)
                    self._peer_gaps.update(range(self._last_peer_id + 2, sid, 2))
                self._last_peer_id = sid
            if self._goaway_sent:
                self._late_data(n)
                return
            if self._peer_streams >= self.config.max_streams:
                # refuse this stream only (like h2's REFUSED_STREAM); its data is dropped
                self._late_data(n)
                self._queue(FrameType.ERROR, sid, 0, fr.error_payload(
                    ErrorCode.STREAM_LIMIT,
                    f"more than {self.config.max_streams} concurrent streams"))
                return
            st = _Stream(sid)
            self._streams[sid] = st
            self._peer_streams += 1
            st.acked_initial = True
            if not frame.flags & _END_STREAM:
                # a stream opened and ended in one frame will send no more: no grant
                self._grant_initial(st)
            self._events.append(ev.StreamOpened(sid))
        if frame.seq != st.recv_seq:
            raise RemoteProtocolError(f"stream {sid}: DATA seq {frame.seq}, expected "
                                      f"{st.recv_seq}", code=ErrorCode.SEQUENCE_ERROR)
        st.recv_seq += 1
        st.recv_window -= n
        if st.recv_window < 0:
            raise FlowControlError(f"stream {sid}: peer exceeded the stream window")
        end = bool(frame.flags & _END_STREAM)
        st.transition(StreamInput.RECV_DATA)
        self._data_frames_received += 1
        if end:
            st.transition(StreamInput.RECV_END)
        self._events.append(ev.DataReceived(sid, frame.seq, frame.payload, end))
        if end:
            self._maybe_release(st)

    def _late_data(self, n: int) -> None:
        """DATA for a stream we already released: drop it but return its credit."""
        self._data_frames_received += 1
        self.dropped_data_bytes += n
        self._conn_recv_pending += n
        if self._conn_recv_pending >= self._ack_at:
            self._return_credit()

    def _return_credit(self) -> None:
        """Half of our window was consumed (``_ack_at``): ACK the pending connection
        credit, with a receive budget topped up from it toward the full window as it
        frees."""
        inc, self._conn_recv_pending = self._conn_recv_pending, 0
        budget = self.config.receive_budget
        if budget is not None:
            full = self.config.connection_window
            window = INITIAL_WINDOW + self._reserved
            if window < full:
                more = budget.take(full - window)
                self._reserved += more
                self._ack_at = (INITIAL_WINDOW + self._reserved) // 2
                inc += more
        self._conn_recv_window += inc
        self._queue(FrameType.ACK, 0, None, fr.ack_payload(inc))

    def _maybe_release(self, st: _Stream) -> None:
        if st.state is StreamState.CLOSED:
            del self._streams[st.id]
            if self._is_peer_id(st.id):
                self._peer_streams -= 1

    def _on_ack(self, frame: fr.Frame, now: float) -> None:
        inc = fr.parse_ack(frame)
        sid = frame.stream_id
        if sid == 0:
            self._conn_send_credit += inc
            if self._conn_send_credit > _MAX_WINDOW:
                raise FlowControlError("peer grew the connection window beyond 2^31-1")
            self._events.append(ev.CreditAvailable(0, self._conn_send_credit))
            return
        st = self._streams.get(sid)
        if st is None:
            return  # credit for a stream already finished: harmless
        st.send_credit += inc
        if st.send_credit > _MAX_WINDOW:
            raise FlowControlError(f"stream {sid}: window grown beyond 2^31-1")
        self._events.append(ev.CreditAvailable(sid, self.send_window(sid)))

    def _on_flow(self, frame: fr.Frame, now: float) -> None:
        op, reason, retry_ms = fr.parse_flow(frame)
        sid = frame.stream_id
        if op is fr.FlowOp.PAUSE:
            paused = ev.FlowPaused(sid, reason, retry_ms / 1000.0)
            self._peer_paused[sid] = paused
            if len(self._peer_paused) > self.config.max_streams * 2 + 1:
                raise RemoteProtocolError("too many paused streams",
                                          code=ErrorCode.STREAM_LIMIT)
            self._events.append(paused)
        else:
            self._peer_paused.pop(sid, None)
            self._events.append(ev.FlowResumed(sid, reason))

    def _on_ping(self, frame: fr.Frame, now: float) -> None:
        self._queue(FrameType.PONG, 0, None, frame.payload)

    def _on_pong(self, frame: fr.Frame, now: float) -> None:
        if frame.payload == self._keepalive:
            self._keepalive = None
            return
        sent = self._pings.pop(frame.payload, None)
        if sent is not None:
            self._events.append(ev.PingAcknowledged(rtt=max(0.0, now - sent)))

    def _on_rekey(self, frame: fr.Frame, now: float) -> None:
        self.key_updates += 1
        self._events.append(ev.KeyUpdated(local=False))

    def _on_goaway(self, frame: fr.Frame, now: float) -> None:
        last_id, last_seq, code, reason = fr.parse_goaway(frame)
        self._goaway_received = True
        self._events.append(ev.GoAwayReceived(last_id, last_seq, code, reason))

    def _on_error(self, frame: fr.Frame, now: float) -> None:
        code, reason = fr.parse_error(frame)
        sid = frame.stream_id
        if sid == 0:
            self._terminate(code, reason or "peer sent ERROR", by_peer=True)
            return
        st = self._streams.pop(sid, None)
        if st is not None:
            st.state = StreamState.CLOSED
            if self._is_peer_id(sid):
                self._peer_streams -= 1
            self._events.append(ev.StreamReset(sid, code, reason))

    def _auto_rekey(self, now: float | None) -> None:
        if self.key_update_available:
            try:
                self.rekey(now)
                return
            except CryptoError as exc:  # e.g. a write pending: try at the next due point
                log.warning("rekey skipped", extra={"reason": str(exc)})
        elif not self.rekey_overdue:
            # the fallback: ask for a reconnect; streams in flight may finish
            log.warning("rekey due without TLS KeyUpdate: GOAWAY, reconnect expected")
            self.rekey_overdue = True
            self.goaway(ErrorCode.NO_ERROR, REKEY_BY_RECONNECT)
        else:
            # GOAWAY went out already: an ERROR frame (code NO_ERROR) tells the peer why
            self._terminate(ErrorCode.NO_ERROR, "tunnel keys overdue for rotation (TLS "
                            "KeyUpdate unavailable and no reconnect)", by_peer=False)
        self._bytes_since_rekey = 0
        if now is not None:
            self._last_rekey = now

    def _check_not_closed_by_rekey(self) -> None:
        if self.state is ConnectionState.CLOSED:
            raise TunnelClosed("tunnel closed: keys overdue for rotation (TLS KeyUpdate "
                               "unavailable); reconnect")

    def _terminate(self, code: int, reason: str, *, by_peer: bool, send: bool = True,
                   during_handshake: bool | None = None) -> None:
        if self.state is ConnectionState.CLOSED:
            return
        if during_handshake is None:
            during_handshake = self.state is not ConnectionState.OPEN
        tls_up = self._tls_established
        if send and tls_up and not by_peer:
            self._queue(FrameType.ERROR, 0, None, fr.error_payload(code, reason))
        self.state = ConnectionState.CLOSED
        if self._reserved and self.config.receive_budget is not None:
            self.config.receive_budget.give_back(self._reserved)
            self._reserved = 0
        if tls_up:
            self._flush_plain_closed()
            with contextlib.suppress(SSL.Error):
                self.tls.shutdown()
        self._pings.clear()
        self._events.append(ev.ConnectionTerminated(int(code), reason, during_handshake,
                                                    by_peer))

    def _flush_plain_closed(self) -> None:
        if self._out:
            out, self._out = self._out, bytearray()
            with contextlib.suppress(SSL.Error):
                self.tls.sendall(out)


def _handshake_reason(exc: BaseException) -> str:
    """Handshake failures are worded by :func:`pqcnet.qstp.tls.handshake_error` (one place)."""
    from pqcnet.qstp.tls import handshake_error

    return str(handshake_error(exc))


def _ended_by_peer(exc: BaseException) -> bool:
    """Peer alert / close vs a local decision: :func:`pqcnet.qstp.tls.ended_by_peer`."""
    from pqcnet.qstp.tls import ended_by_peer

    return ended_by_peer(exc)


def _ssl_reason(exc: BaseException) -> str:
    """A one-line reason from a pyOpenSSL error (its args hold OpenSSL's error queue)."""
    parts: list[str] = []
    for arg in exc.args:
        if isinstance(arg, list):
            for item in arg:
                if isinstance(item, tuple) and item:
                    parts.append(str(item[-1]))
        elif arg:
            parts.append(str(arg))
    text = "; ".join(p for p in parts if p) or type(exc).__name__
    return f"TLS: {text}"


_HANDLERS: dict[FrameType, Callable[[Connection, fr.Frame, float], None]] = {
    FrameType.DATA: Connection._on_data,
    FrameType.ACK: Connection._on_ack,
    FrameType.FLOW: Connection._on_flow,
    FrameType.PING: Connection._on_ping,
    FrameType.PONG: Connection._on_pong,
    FrameType.REKEY: Connection._on_rekey,
    FrameType.GOAWAY: Connection._on_goaway,
    FrameType.ERROR: Connection._on_error,
}

__all__ = [
    "MAX_OUTSTANDING_PINGS",
    "REKEY_BY_RECONNECT",
    "STREAM_TRANSITIONS",
    "Connection",
    "ConnectionState",
    "ProtocolError",
    "StreamInput",
    "StreamState",
]
