"""The sans-IO Connection driven in memory over real TLS 1.3 (no sockets, no clock)."""

from __future__ import annotations

import itertools
from functools import partial

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pqcnet.qstp import events as ev
from pqcnet.qstp import frames as fr
from pqcnet.qstp.config import INITIAL_WINDOW, QstpConfiguration
from pqcnet.qstp.connection import (
    STREAM_TRANSITIONS,
    Connection,
    ConnectionState,
    StreamInput,
    StreamState,
    _Stream,
)
from pqcnet.qstp.errors import LocalProtocolError, RemoteProtocolError, TunnelClosed
from pqcnet.qstp.frames import ErrorCode, FrameType
from pqcnet.qstp.tls import TlsPolicy, build_context, new_connection, verify_peer

from .qstputil import CLIENT_ID, SERVER_ID, make_mesh

pytestmark = pytest.mark.timeout(120)

MESH = make_mesh()
POLICY = TlsPolicy()
CCTX = build_context(MESH.client, POLICY, server=False)
SCTX = build_context(MESH.server, POLICY, server=True)
WIN = QstpConfiguration().stream_window // 65536  # full frames that fill a stream window


def new_pair(config: QstpConfiguration | None = None,
             server_config: QstpConfiguration | None = None) -> tuple[Connection, Connection]:
    """A client and a server connection (the server with ``server_config`` if given)."""
    c = Connection(new_connection(CCTX, server=False), client=True, config=config,
                   verify=partial(verify_peer, identity=MESH.client, policy=POLICY))
    s = Connection(new_connection(SCTX, server=True), client=False,
                   config=server_config or config,
                   verify=partial(verify_peer, identity=MESH.server, policy=POLICY))
    return c, s


def pump(a: Connection, b: Connection, now: float = 0.0) -> None:
    for _ in range(50):
        x = a.data_to_send()
        if x:
            b.receive_data(x, now)
        y = b.data_to_send()
        if y:
            a.receive_data(y, now)
        if not x and not y:
            return
    raise AssertionError("pump did not settle")


def drain(conn: Connection) -> list[ev.Event]:
    out: list[ev.Event] = []
    while (e := conn.next_event()) is not None:
        out.append(e)
    return out


def open_pair(config: QstpConfiguration | None = None,
              server_config: QstpConfiguration | None = None) -> tuple[Connection, Connection]:
    c, s = new_pair(config, server_config)
    c.start(0.0)
    s.start(0.0)
    pump(c, s)
    assert any(isinstance(e, ev.HandshakeCompleted) for e in drain(c))
    assert any(isinstance(e, ev.HandshakeCompleted) for e in drain(s))
    return c, s


def inject(sender: Connection, receiver: Connection, raw: bytes) -> None:
    """A misbehaving peer: raw plaintext through the sender's real TLS session."""
    sender.tls.sendall(raw)
    receiver.receive_data(sender.data_to_send(), 0.0)


def terminated(conn: Connection) -> ev.ConnectionTerminated:
    events = [e for e in drain(conn) if isinstance(e, ev.ConnectionTerminated)]
    assert len(events) == 1, events
    return events[0]


def test_handshake_reports_peers_and_group() -> None:
    c, s = new_pair()
    c.start(0.0)
    s.start(0.0)
    pump(c, s)
    (hc,) = [e for e in drain(c) if isinstance(e, ev.HandshakeCompleted)]
    (hs,) = [e for e in drain(s) if isinstance(e, ev.HandshakeCompleted)]
    assert str(hc.peer.spiffe_id) == SERVER_ID
    assert str(hs.peer.spiffe_id) == CLIENT_ID
    assert hc.peer.group == hs.peer.group == "X25519MLKEM768"
    assert c.state is s.state is ConnectionState.OPEN


NOBODY = TlsPolicy(allowed_peers=("spiffe://mesh.test/acme/nobody/*",))


@pytest.mark.parametrize(("server_policy", "client_policy", "refuser", "reason"), [
    (TlsPolicy(groups="strict"), POLICY, "server", "no-shared-group"),  # OpenSSL decides
    (NOBODY, POLICY, "server", "spiffe-not-allowed"),  # our verify callback decides
    (POLICY, NOBODY, "client", "spiffe-not-allowed"),
    (TlsPolicy(alpn=b"other/1"), POLICY, "server", "alpn"),
])
def test_a_refusal_is_by_peer_only_on_the_side_that_did_not_decide(
        server_policy: TlsPolicy, client_policy: TlsPolicy, refuser: str, reason: str) -> None:
    c = Connection(new_connection(build_context(MESH.client, client_policy, server=False),
                                  server=False), client=True,
                   verify=partial(verify_peer, identity=MESH.client, policy=client_policy))
    s = Connection(new_connection(build_context(MESH.server, server_policy, server=True),
                                  server=True), client=False,
                   verify=partial(verify_peer, identity=MESH.server, policy=server_policy))
    c.start(0.0)
    s.start(0.0)
    pump(c, s)
    ends = {"client": terminated(c), "server": terminated(s)}
    decided, told = ends[refuser], ends["client" if refuser == "server" else "server"]
    assert decided.reason.endswith(f"[{reason}]") and not decided.by_peer
    assert told.by_peer and "peer refused" in told.reason
    assert decided.during_handshake and told.during_handshake


def test_client_waits_for_server_preface_before_completing() -> None:
    c, s = new_pair()
    c.start(0.0)
    s.start(0.0)
    s.receive_data(c.data_to_send(), 0.0)      # ClientHello
    c.receive_data(s.data_to_send(), 0.0)      # ServerHello..Finished: client TLS is done
    assert c.state is ConnectionState.AWAIT_PREFACE
    assert not any(isinstance(e, ev.HandshakeCompleted) for e in drain(c))
    with pytest.raises(LocalProtocolError):
        c.open_stream()
    s.receive_data(c.data_to_send(), 0.0)      # client Finished + preface
    c.receive_data(s.data_to_send(), 0.0)      # tickets + server preface
    assert any(isinstance(e, ev.HandshakeCompleted) for e in drain(c))


def test_data_flows_with_sequence_numbers_and_end_stream() -> None:
    c, s = open_pair()
    sid = c.open_stream()
    c.send_data(sid, b"a")
    pump(c, s)  # the stream window grows past INITIAL_WINDOW once the server saw it
    c.send_data(sid, b"b" * 70_000, end_stream=True)  # split into two frames
    pump(c, s)
    got = [e for e in drain(s) if isinstance(e, ev.DataReceived)]
    assert [(e.seq, len(e.data), e.end_stream) for e in got] == [
        (0, 1, False), (1, 65536, False), (2, 70_000 - 65536, True)]
    assert s.stream_state(sid) is StreamState.HALF_CLOSED_REMOTE
    s.end_stream(sid)
    pump(c, s)
    assert s.stream_state(sid) is None and c.stream_state(sid) is None  # released
    with pytest.raises(TunnelClosed):
        c.send_data(sid, b"late")


def test_credit_limits_sender_until_receiver_consumes() -> None:
    cfg = QstpConfiguration(stream_window=INITIAL_WINDOW * 2,
                            connection_window=INITIAL_WINDOW * 4)
    c, s = open_pair(cfg)
    sid = c.open_stream()
    c.send_data(sid, b"x")
    pump(c, s)  # the server grants the stream window beyond INITIAL_WINDOW
    first = [e for e in drain(s) if isinstance(e, ev.DataReceived)]
    assert c.send_window(sid) == cfg.stream_window - 1
    c.send_data(sid, b"y" * (cfg.stream_window - 1))
    assert c.send_window(sid) == 0
    with pytest.raises(LocalProtocolError, match="send window"):
        c.send_data(sid, b"z")
    pump(c, s)
    assert c.send_window(sid) == 0  # nothing consumed yet: no credit back
    total = sum(len(e.data) for e in first + drain(s) if isinstance(e, ev.DataReceived))
    s.consumed(sid, total)
    pump(c, s)
    assert any(isinstance(e, ev.CreditAvailable) and e.stream_id == sid for e in drain(c))
    assert c.send_window(sid) == cfg.stream_window


def test_consumed_says_whether_it_queued_credit() -> None:
    """The tunnel flushes after ``consumed`` only when it returns True: it must be
    True exactly when an ACK frame is waiting to go out."""
    cfg = QstpConfiguration(stream_window=INITIAL_WINDOW * 2,
                            connection_window=INITIAL_WINDOW * 4)
    c, s = open_pair(cfg)
    sid = c.open_stream()
    c.send_data(sid, b"x" * 100)
    pump(c, s)
    drain(s)
    assert s.data_to_send() == b""
    assert s.consumed(sid, 100) is False  # far below half a window: nothing to send
    assert s.data_to_send() == b""
    assert s.consumed(sid, cfg.stream_window // 2) is True  # crosses half the stream window
    wire = s.data_to_send()
    assert wire
    c.receive_data(wire, 0.0)
    assert any(isinstance(e, ev.CreditAvailable) and e.stream_id == sid for e in drain(c))
    assert s.consumed(sid, 0) is False


@pytest.mark.parametrize(
    ("raw_after_open", "code"),
    [
        # sequence gap on a fresh stream
        (lambda: fr.encode(FrameType.DATA, 1, 5, b"x"), ErrorCode.SEQUENCE_ERROR),
        # DATA after END_STREAM
        (lambda: fr.encode(FrameType.DATA, 1, 0, b"", fr.Flags.END_STREAM)
         + fr.encode(FrameType.DATA, 1, 1, b"x"), ErrorCode.STREAM_ERROR),
        # more than the window
        (lambda: b"".join(fr.encode(FrameType.DATA, 1, i, b"x" * 65536) for i in range(WIN))
         + fr.encode(FrameType.DATA, 1, WIN, b"x"), ErrorCode.FLOW_CONTROL_ERROR),
        # server-parity stream the server never opened
        (lambda: fr.encode(FrameType.DATA, 2, 0, b"x"), ErrorCode.STREAM_ERROR),
        # control sequence replayed
        (lambda: fr.encode(FrameType.PING, 0, 0, bytes(8)), ErrorCode.SEQUENCE_ERROR),
        # a bad header
        (lambda: b"\x09" + bytes(19), ErrorCode.FRAME_ERROR),
        # bad ACK payload
        (lambda: fr.encode(FrameType.ACK, 1, 0, b"abc"), ErrorCode.FRAME_ERROR),
        # window overflow via ACK
        (lambda: fr.encode(FrameType.ACK, 0, 1, fr.ack_payload(0x7FFFFFFF)),
         ErrorCode.FLOW_CONTROL_ERROR),
    ],
)
def test_peer_protocol_violations_close_with_an_error_frame(
    raw_after_open: object, code: ErrorCode
) -> None:
    c, s = open_pair()
    assert callable(raw_after_open)
    # the client's control seq 0 was its preface; use raw frames after it
    inject(c, s, raw_after_open())
    term = terminated(s)
    assert term.error_code == code and not term.by_peer and not term.during_handshake
    assert s.closed
    c.receive_data(s.data_to_send(), 0.0)  # the ERROR frame + close_notify reach the client
    seen = terminated(c)
    assert seen.error_code == code and seen.by_peer
    assert seen.reason == term.reason


def test_streams_over_the_limit_are_refused_one_by_one() -> None:
    cfg = QstpConfiguration(max_streams=3)
    c, s = open_pair(cfg)
    for _ in range(3):
        c.send_data(c.open_stream(), b"x")
    pump(c, s)
    assert len([e for e in drain(s) if isinstance(e, ev.StreamOpened)]) == 3
    extra = c.open_stream()
    c.send_data(extra, b"x")
    c.send_data(extra, b"y")  # already in flight when the refusal arrives: dropped
    pump(c, s)
    assert not any(isinstance(e, ev.StreamOpened) for e in drain(s))
    assert not s.closed
    (reset,) = [e for e in drain(c) if isinstance(e, ev.StreamReset)]
    assert reset.stream_id == extra and reset.code == ErrorCode.STREAM_LIMIT
    assert c.stream_state(extra) is None


def test_reset_goaway_ping_and_flow() -> None:
    c, s = open_pair()
    sid = c.open_stream()
    c.send_data(sid, b"x")
    c.ping(1.0)
    c.pause(0, reason=9, retry_after=1.5)
    pump(c, s, now=1.25)
    events = drain(s)
    assert ev.FlowPaused(0, 9, 1.5) in events
    assert s.peer_paused(0) == ev.FlowPaused(0, 9, 1.5)
    (ack,) = [e for e in drain(c) if isinstance(e, ev.PingAcknowledged)]
    assert ack.rtt == pytest.approx(0.25)
    s.reset_stream(sid, ErrorCode.CANCELLED, "not wanted")
    s.goaway(ErrorCode.NO_ERROR, "draining")
    pump(c, s)
    events = drain(c)
    assert ev.StreamReset(sid, ErrorCode.CANCELLED, "not wanted") in events
    assert ev.GoAwayReceived(sid, 1, 0, "draining") in events
    with pytest.raises(TunnelClosed, match="going away"):
        c.open_stream()


def test_timers_handshake_idle_and_rekey() -> None:
    cfg = QstpConfiguration(handshake_timeout=5, idle_timeout=30, rekey_interval=10,
                            keepalive=False)
    c, s = new_pair(cfg)
    c.start(100.0)
    assert c.get_timer() == 105.0
    c.handle_timer(104.9)
    assert not c.closed
    c.handle_timer(105.0)
    term = terminated(c)
    assert term.error_code == ErrorCode.HANDSHAKE_TIMEOUT and term.during_handshake

    c, s = new_pair(cfg)
    c.start(0.0)
    s.start(0.0)
    pump(c, s, now=0.0)
    drain(c)
    drain(s)
    assert c.get_timer() == 10.0  # rekey comes before idle
    c.handle_timer(10.0)
    assert ev.KeyUpdated(local=True) in drain(c)
    sid = c.open_stream()
    c.send_data(sid, b"after rekey")
    pump(c, s, now=11.0)
    events = drain(s)
    assert ev.KeyUpdated(local=False) in events
    assert any(isinstance(e, ev.DataReceived) and e.data == b"after rekey" for e in events)
    assert s.get_timer() == 10.0  # the server's own rekey timer
    c.handle_timer(41.0)  # 30 s after the last bytes from the server (keepalive off)
    assert terminated(c).error_code == ErrorCode.IDLE_TIMEOUT
    pump(c, s, now=41.0)
    got = drain(s)
    assert any(isinstance(e, ev.GoAwayReceived) and e.code == ErrorCode.IDLE_TIMEOUT
               for e in got)


def test_eof_without_close_notify_is_reported_as_truncation() -> None:
    _c, s = open_pair()
    s.receive_eof(0.0)
    term = terminated(s)
    assert "truncated" in term.reason and term.by_peer


def test_clean_close_is_seen_by_the_peer() -> None:
    c, s = open_pair()
    c.close()
    assert terminated(c).error_code == 0
    pump(c, s)
    events = drain(s)
    assert isinstance(events[-1], ev.ConnectionTerminated) and events[-1].error_code == 0


def test_stream_transition_table_covers_every_pair() -> None:
    for state, what in itertools.product(StreamState, StreamInput):
        stream = _Stream(1)
        stream.state = state
        if (state, what) in STREAM_TRANSITIONS:
            stream.transition(what)
            assert stream.state is STREAM_TRANSITIONS[(state, what)]
            continue
        expected = RemoteProtocolError if what.name.startswith("RECV") else LocalProtocolError
        with pytest.raises(expected) as info:
            stream.transition(what)
        assert type(info.value) is expected
        assert info.value.code == ErrorCode.STREAM_ERROR


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=80), max_size=6), st.booleans())
def test_arbitrary_plaintext_from_a_peer_never_escapes_as_an_exception(
    chunks: list[bytes], with_valid_prefix: bool
) -> None:
    c, s = open_pair()
    if with_valid_prefix:
        chunks = [fr.encode(FrameType.DATA, 1, 0, b"ok"), *chunks]
    for chunk in chunks:
        if s.closed:
            break
        if chunk:
            inject(c, s, chunk)
    events = drain(s)
    assert sum(isinstance(e, ev.ConnectionTerminated) for e in events) <= 1
    if s.closed:
        term = events[-1]
        assert isinstance(term, ev.ConnectionTerminated) and term.error_code != 0
        c.receive_data(s.data_to_send(), 0.0)
        assert c.closed


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=1, max_size=400))
def test_arbitrary_bytes_instead_of_tls_end_the_handshake_cleanly(data: bytes) -> None:
    _c, s = new_pair()
    s.start(0.0)
    s.receive_data(data, 0.0)
    s.data_to_send()
    events = drain(s)
    if s.closed:
        (term,) = events
        assert isinstance(term, ev.ConnectionTerminated) and term.during_handshake
    else:
        assert events == []  # a plausible prefix: still waiting for more


def test_keepalive_ping_keeps_a_quiet_tunnel_open_and_a_dead_peer_times_out() -> None:
    cfg = QstpConfiguration(idle_timeout=30, rekey_interval=0)
    c, s = new_pair(cfg)
    c.start(0.0)
    s.start(0.0)
    pump(c, s, now=0.0)
    drain(c)
    drain(s)
    assert c.get_timer() == 15.0
    c.handle_timer(15.0)  # quiet for half the idle timeout: PING
    assert c.get_timer() == 30.0
    pump(c, s, now=16.0)  # the live peer answers
    assert not c.closed and c.get_timer() == 16.0 + 15.0
    assert not any(isinstance(e, ev.PingAcknowledged) for e in drain(c))  # internal only
    c.handle_timer(31.0)  # PING again; this time the peer stays silent
    c.data_to_send()
    c.handle_timer(46.0)
    assert terminated(c).error_code == ErrorCode.IDLE_TIMEOUT


def test_streams_may_be_first_used_out_of_order() -> None:
    c, s = open_pair()
    a, b, d = c.open_stream(), c.open_stream(), c.open_stream()
    c.send_data(d, b"third")
    c.send_data(a, b"first")
    pump(c, s)
    c.send_data(b, b"second")
    pump(c, s)
    got = [(e.stream_id, e.data) for e in drain(s) if isinstance(e, ev.DataReceived)]
    assert got == [(d, b"third"), (a, b"first"), (b, b"second")]
    assert not s.closed
    # an id that was used and finished stays finished: late DATA is dropped, no reopen
    c.send_data(a, b"", end_stream=True)
    s.end_stream(a)
    pump(c, s)
    assert s.stream_state(a) is None
    inject(c, s, fr.encode(FrameType.DATA, a, 1, b"late"))
    assert not [e for e in drain(s) if isinstance(e, ev.StreamOpened)]


def test_skipping_too_many_stream_ids_is_a_protocol_error() -> None:
    c, s = open_pair(QstpConfiguration(max_streams=3))
    inject(c, s, fr.encode(FrameType.DATA, 99, 0, b"x"))
    assert terminated(s).error_code == ErrorCode.STREAM_LIMIT


def test_a_stream_opened_and_ended_in_one_frame_gets_no_window_grant() -> None:
    c, s = open_pair()
    sid = c.open_stream()
    c.send_data(sid, b"one-shot request", end_stream=True)
    s.receive_data(c.data_to_send(), 0.0)
    assert s.data_to_send() == b""  # nothing to say: the peer will send no more
    sid2 = c.open_stream()
    c.send_data(sid2, b"more to come")
    s.receive_data(c.data_to_send(), 0.0)
    assert s.data_to_send() != b""  # the window grant for a stream that stays open
    ends = [(e.stream_id, e.end_stream) for e in drain(s) if isinstance(e, ev.DataReceived)]
    assert ends == [(sid, True), (sid2, False)]


def test_handshake_buffers_are_dropped_and_data_still_flows() -> None:
    """After the handshake both sides swap their memory BIOs for empty ones (a BIO keeps
    the capacity of the largest ML-DSA flight forever otherwise); records, rekeys and
    streams work as before on the new pair."""
    c, s = open_pair()
    pump(c, s)
    assert not c._bios_to_shrink and not s._bios_to_shrink
    sid = c.open_stream()
    c.send_data(sid, b"after the swap" * 1000, end_stream=True)
    pump(c, s)
    got = [e for e in drain(s) if isinstance(e, ev.DataReceived)]
    assert b"".join(e.data for e in got) == b"after the swap" * 1000
    assert got[-1].end_stream
