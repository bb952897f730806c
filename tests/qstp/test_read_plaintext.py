"""Every exit of ``pqcnet.qstp._ossl.read_plaintext`` through a real TLS 1.3 session.

The reader stops for exactly four reasons: it needs more bytes (WANT_READ), it
filled its bounded buffer (``4 * max_frame_payload``), the peer closed
(close_notify), or TLS failed (bad record MAC, an alert). Each is driven here
with real records, including the mixed case where good plaintext and the failure
arrive in one read: the good frames are delivered, nothing after the failure is.
"""

from __future__ import annotations

from functools import partial

import pytest
from OpenSSL import SSL

from pqcnet.qstp import events as ev
from pqcnet.qstp.config import QstpConfiguration
from pqcnet.qstp.connection import Connection, ConnectionState
from pqcnet.qstp.frames import ErrorCode
from pqcnet.qstp.tls import new_connection, verify_peer

from .test_connection import CCTX, MESH, POLICY, SCTX, drain, open_pair, pump, terminated

pytestmark = pytest.mark.timeout(60)


def _data(events: list[ev.Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, ev.DataReceived))


def _flip_last_byte(record: bytes) -> bytes:
    return record[:-1] + bytes([record[-1] ^ 0x01])  # the AEAD tag no longer matches


def test_a_record_split_across_reads_waits_for_its_tail() -> None:
    c, s = open_pair()
    sid = c.open_stream()
    c.send_data(sid, b"split me")
    wire = c.data_to_send()
    s.receive_data(wire[:9], 0.0)  # WANT_READ: nothing decrypted yet, nothing lost
    assert drain(s) == [] and not s.closed
    s.receive_data(wire[9:], 0.0)
    assert _data(drain(s)) == b"split me"


def test_more_plaintext_than_one_read_holds_is_read_in_bounded_steps() -> None:
    cfg = QstpConfiguration(max_frame_payload=1024, max_data_chunk=1024)  # limit 4 KiB
    c, s = open_pair(cfg)
    sid = c.open_stream()
    body = bytes(range(256)) * 235  # 60160 bytes: 59 frames, ~15 full reads
    c.send_data(sid, body)
    s.receive_data(c.data_to_send(), 0.0)  # one call, many limit-sized reads
    events = drain(s)
    assert _data(events) == body
    assert sum(isinstance(e, ev.DataReceived) for e in events) == 59
    assert not s.closed


def _opened(body: bytes) -> tuple[Connection, Connection, bytes]:
    """A pair whose client stream was granted its full window, and ``body`` sent on it
    (the TLS records, not yet delivered)."""
    c, s = open_pair()
    sid = c.open_stream()
    c.send_data(sid, b".")
    s.receive_data(c.data_to_send(), 0.0)
    c.receive_data(s.data_to_send(), 0.0)  # the stream's window grant
    drain(s), drain(c)
    c.send_data(sid, body)
    return c, s, c.data_to_send()


def test_a_large_read_is_a_view_on_the_reused_buffer_and_frames_survive_its_reuse() -> None:
    """Reads of at least VIEW_MIN_BYTES skip the copy into ``bytes``: the view is only
    valid until the next read, so the frames decoded from it must own their bytes."""
    from pqcnet.qstp import _ossl

    first = bytes(range(256)) * 512  # 128 KiB: two 64 KiB DATA frames
    zeros = b"\x00" * len(first)
    _c, s, wire = _opened(first)
    s.tls.bio_write(wire)
    limit = 4 * s.config.max_frame_payload
    plain, failure = _ossl.read_plaintext(s.tls, limit)
    assert failure is None and type(plain) is memoryview
    assert len(plain) >= _ossl.VIEW_MIN_BYTES
    seen = bytes(plain)
    _c2, s2, wire2 = _opened(zeros)
    s2.tls.bio_write(wire2)
    second, _ = _ossl.read_plaintext(s2.tls, limit)
    assert bytes(plain) != seen and bytes(plain) == bytes(second)  # one reused buffer
    # through the connection: each tunnel gets its own bytes, the same thread's
    # buffer serving both reads
    _c3, s3, wire3 = _opened(first)
    _c4, s4, wire4 = _opened(zeros)
    s3.receive_data(wire3, 0.0)
    s4.receive_data(wire4, 0.0)
    got = [e for e in drain(s3) if isinstance(e, ev.DataReceived)]
    assert all(type(e.data) is bytes for e in got)
    assert b"".join(e.data for e in got) == first
    assert _data(drain(s4)) == zeros


def test_a_small_read_is_copied_into_bytes() -> None:
    from pqcnet.qstp import _ossl

    c, s = open_pair()
    sid = c.open_stream()
    c.send_data(sid, b"small")
    s.tls.bio_write(c.data_to_send())
    plain, failure = _ossl.read_plaintext(s.tls, 4 * s.config.max_frame_payload)
    assert failure is None and type(plain) is bytes and b"small" in plain


def test_data_then_close_notify_in_one_read() -> None:
    c, s = open_pair()
    sid = c.open_stream()
    c.send_data(sid, b"last words")
    c.close()
    s.receive_data(c.data_to_send(), 0.0)
    events = drain(s)
    assert _data(events) == b"last words"
    (term,) = [e for e in events if isinstance(e, ev.ConnectionTerminated)]
    assert term.by_peer and term.error_code == ErrorCode.NO_ERROR
    assert not term.during_handshake


def test_good_records_then_a_bad_mac_in_one_read() -> None:
    c, s = open_pair()
    sid = c.open_stream()
    c.send_data(sid, b"good")
    good = c.data_to_send()
    c.send_data(sid, b"tampered")
    bad = _flip_last_byte(c.data_to_send())
    c.send_data(sid, b"never seen")
    after = c.data_to_send()
    s.receive_data(good + bad + after, 0.0)
    events = drain(s)
    assert _data(events) == b"good"  # delivered before the failure; nothing after it
    (term,) = [e for e in events if isinstance(e, ev.ConnectionTerminated)]
    # our TLS stack refused the record: a local decision, not the peer ending it
    assert term.error_code == ErrorCode.TLS_ERROR and not term.by_peer
    assert "bad record mac" in term.reason.lower() or "decrypt" in term.reason.lower()
    assert s.closed
    s.receive_data(after, 0.0)  # input after the end is ignored, not an exception
    assert drain(s) == []


def test_a_fatal_alert_from_the_peer_ends_the_tunnel_with_its_text() -> None:
    c, s = open_pair()
    sid = c.open_stream()
    c.send_data(sid, b"tampered")
    s.receive_data(_flip_last_byte(c.data_to_send()), 0.0)  # s answers with an alert
    terminated(s)
    alert = s.data_to_send()
    assert alert  # the bad_record_mac alert
    c.receive_data(alert, 0.0)
    term = terminated(c)
    assert term.error_code == ErrorCode.TLS_ERROR and term.by_peer
    assert "alert" in term.reason.lower()


def test_close_notify_instead_of_the_server_preface() -> None:
    """A server that finishes TLS but closes before its first frame: the client
    never reports the handshake complete and says why."""
    client = Connection(new_connection(CCTX, server=False), client=True,
                        verify=partial(verify_peer, identity=MESH.client, policy=POLICY))
    server = new_connection(SCTX, server=True)  # bare TLS, no QSTP frame layer
    client.start(0.0)
    for _ in range(4):
        server.bio_write(client.data_to_send())
        try:
            server.do_handshake()
        except SSL.WantReadError:
            pass
        else:
            break
        client.receive_data(server.bio_read(1 << 20), 0.0)
    assert client.state is ConnectionState.AWAIT_PREFACE
    server.shutdown()  # tickets + close_notify, but no QSTP preface
    client.receive_data(server.bio_read(1 << 20), 0.0)
    events = drain(client)
    assert not any(isinstance(e, ev.HandshakeCompleted) for e in events)
    (term,) = [e for e in events if isinstance(e, ev.ConnectionTerminated)]
    assert term.during_handshake and term.by_peer
    assert "during the handshake" in term.reason


def test_tampered_record_instead_of_the_server_preface_is_a_handshake_failure() -> None:
    client = Connection(new_connection(CCTX, server=False), client=True,
                        verify=partial(verify_peer, identity=MESH.client, policy=POLICY))
    server = Connection(new_connection(SCTX, server=True), client=False,
                        verify=partial(verify_peer, identity=MESH.server, policy=POLICY))
    client.start(0.0)
    server.start(0.0)
    server.receive_data(client.data_to_send(), 0.0)
    client.receive_data(server.data_to_send(), 0.0)
    assert client.state is ConnectionState.AWAIT_PREFACE
    server.receive_data(client.data_to_send(), 0.0)
    flight = server.data_to_send()  # tickets, then the preface record last
    client.receive_data(_flip_last_byte(flight), 0.0)
    events = drain(client)
    assert not any(isinstance(e, ev.HandshakeCompleted) for e in events)
    (term,) = [e for e in events if isinstance(e, ev.ConnectionTerminated)]
    assert term.during_handshake and term.error_code == ErrorCode.HANDSHAKE_FAILED
    pump(client, server)  # the alert reaches the server, which ends too
    assert server.closed
