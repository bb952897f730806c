"""The OpenSSL shims pyOpenSSL lacks: groups, session reuse, TLS KeyUpdate.

The self-check that gates KeyUpdate is in ``test_ossl_selfcheck.py``; the inventory of
private names in ``test_ossl_symbols.py``.
"""

from __future__ import annotations

import pytest
from OpenSSL import SSL

from pqcnet.crypto.errors import CryptoError
from pqcnet.identity import dev_identities
from pqcnet.qstp import _ossl
from pqcnet.qstp.tls import TlsPolicy, build_context, new_connection, resumable_session
from tests.qstp.tlsutil import exchange, handshake_pair, transfer

pytestmark = pytest.mark.timeout(60)

TD = "mesh.test"


@pytest.fixture(scope="module")
def contexts() -> tuple[SSL.Context, SSL.Context]:
    _, (s, c) = dev_identities(TD, f"spiffe://{TD}/t/sentry/s", f"spiffe://{TD}/t/relayer/c")
    return build_context(s, TlsPolicy(), server=True), build_context(c, TlsPolicy(), server=False)


def pair(contexts, session=None):  # type: ignore[no-untyped-def]
    sctx, cctx = contexts
    server = new_connection(sctx, server=True)
    client = new_connection(cctx, server=False, session=session)
    assert handshake_pair(client, server).ok
    return client, server


def test_set_groups_rejects_unknown_group() -> None:
    ctx = SSL.Context(SSL.TLS_METHOD)
    with pytest.raises(CryptoError, match="NoSuchGroup"):
        _ossl.set_groups(ctx, ["NoSuchGroup"])
    _ossl.set_groups(ctx, ["X25519MLKEM768", "MLKEM1024", "SecP384r1MLKEM1024"])


def test_negotiated_group_and_reuse(contexts) -> None:  # type: ignore[no-untyped-def]
    fresh = new_connection(contexts[1], server=False)
    assert fresh.get_group_name() is None  # pyOpenSSL guards the pre-session call
    client, server = pair(contexts)
    assert client.get_group_name() == server.get_group_name() == "X25519MLKEM768"
    assert not _ossl.session_reused(client) and not _ossl.session_reused(server)
    client2, server2 = pair(contexts, resumable_session(client))
    assert _ossl.session_reused(client2) and _ossl.session_reused(server2)


def _bytes_for(sender: SSL.Connection, data: bytes) -> bytes:
    sender.send(data)
    out = b""
    while True:
        try:
            chunk = sender.bio_read(65536)
        except SSL.WantReadError:
            return out
        out += chunk


@pytest.mark.skipif(not _ossl.key_update_supported(), reason="SSL_key_update not resolvable")
def test_key_update_keeps_data_flowing_and_peer_answers(contexts) -> None:  # type: ignore[no-untyped-def]
    client, server = pair(contexts)
    # a 1-byte record is 5 header + 1 + 1 content type + 16 tag = 23 bytes
    plain = _bytes_for(client, b"a")
    server.bio_write(plain)
    assert server.recv(10) == b"a"
    assert len(plain) == 23
    _ossl.key_update(client, request_peer=True)
    wire = _bytes_for(client, b"b")
    # KeyUpdate record (5 + 4 handshake header + 1 body + 1 + 16) precedes the data
    assert len(wire) == 23 + 27
    server.bio_write(wire)
    assert server.recv(10) == b"b"  # server switched its read key
    # the server was asked to update too: its next write carries its own KeyUpdate
    answer = _bytes_for(server, b"c")
    assert len(answer) == 23 + 27
    client.bio_write(answer)
    assert client.recv(10) == b"c"
    # and traffic continues both ways on the new keys, repeatedly
    for i in range(3):
        _ossl.key_update(server, request_peer=False)
        msg = b"round %d" % i
        assert exchange(server, client, msg) == msg
        assert exchange(client, server, msg) == msg
    transfer(client, server)


@pytest.mark.skipif(not _ossl.key_update_supported(), reason="SSL_key_update not resolvable")
def test_key_update_before_handshake_is_crypto_error(contexts) -> None:  # type: ignore[no-untyped-def]
    conn = new_connection(contexts[1], server=False)
    with pytest.raises(CryptoError, match="refused"):
        _ossl.key_update(conn)


def test_key_update_is_supported_here() -> None:
    # on this machine's cryptography wheel the symbol is resolvable; if a future
    # wheel strips it, QSTP falls back to reconnecting and this test says so loudly
    assert _ossl.key_update_supported()


def test_pending_out_counts_the_write_bio_exactly() -> None:
    """``data_to_send`` skips pyOpenSSL's ``bio_read`` when this says 0: it must be 0
    only when the BIO is empty, and equal what a read then drains."""
    from tests.qstp.test_connection import drain, open_pair

    c, s = open_pair()
    assert _ossl.pending_out(c.tls) == 0
    assert c.data_to_send() == b""
    sid = c.open_stream()
    c.send_data(sid, b"x" * 1000)
    c._flush_plain()  # plaintext into TLS: ciphertext now waits in the write BIO
    waiting = _ossl.pending_out(c.tls)
    assert waiting > 1000
    wire = c.data_to_send()
    assert len(wire) == waiting and _ossl.pending_out(c.tls) == 0
    s.receive_data(wire, 0.0)
    assert any(getattr(e, "data", b"") == b"x" * 1000 for e in drain(s))
