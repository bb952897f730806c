"""QSTP TLS policy over memory BIOs: the happy path, channel binding, resumption."""

from __future__ import annotations

import contextlib

import pytest
from OpenSSL import SSL

from pqcnet.identity import dev_identities
from pqcnet.qstp import _ossl
from pqcnet.qstp.tls import (
    CHANNEL_BINDING_LABEL,
    HandshakeRefused,
    PeerInfo,
    TlsPolicy,
    build_context,
    channel_binding,
    export_keying_material,
    new_connection,
    resumable_session,
    verify_peer,
)
from tests.qstp.tlsutil import exchange, handshake_pair

pytestmark = pytest.mark.timeout(60)

TD = "mesh.test"
SENTRY = f"spiffe://{TD}/acme/sentry/s1"
RELAYER = f"spiffe://{TD}/acme/relayer/r1"


@pytest.fixture(scope="module")
def mesh():  # type: ignore[no-untyped-def]
    ca, (sentry, relayer) = dev_identities(TD, SENTRY, RELAYER)
    return ca, sentry, relayer


def test_mutual_handshake_reports_group_and_spiffe_ids(mesh) -> None:  # type: ignore[no-untyped-def]
    _, sentry, relayer = mesh
    policy = TlsPolicy()
    server = new_connection(build_context(sentry, policy, server=True), server=True)
    client = new_connection(build_context(relayer, policy, server=False), server=False)
    outcome = handshake_pair(client, server)
    assert outcome.ok, outcome
    s_peer = verify_peer(server, sentry, policy)
    c_peer = verify_peer(client, relayer, policy)
    assert isinstance(s_peer, PeerInfo)
    assert str(s_peer.spiffe_id) == RELAYER
    assert str(c_peer.spiffe_id) == SENTRY
    for peer in (s_peer, c_peer):
        assert peer.group == "X25519MLKEM768"
        assert peer.post_quantum
        assert peer.tls_version == "TLSv1.3"
        assert peer.cipher == "TLS_AES_256_GCM_SHA384"
        assert peer.alpn == "qstp/1"
        assert not peer.resumed
    assert c_peer.cert_not_after == sentry.not_after
    assert exchange(client, server, b"ping") == b"ping"
    assert exchange(server, client, b"pong" * 5000) == b"pong" * 5000


def test_channel_binding_matches_and_differs_per_connection(mesh) -> None:  # type: ignore[no-untyped-def]
    _, sentry, relayer = mesh
    policy = TlsPolicy()
    sctx = build_context(sentry, policy, server=True)
    cctx = build_context(relayer, policy, server=False)
    bindings = []
    for _ in range(2):
        server = new_connection(sctx, server=True)
        client = new_connection(cctx, server=False)
        assert handshake_pair(client, server).ok
        cb = channel_binding(client)
        assert len(cb) == 32
        assert cb == channel_binding(server)
        assert cb == export_keying_material(server, CHANNEL_BINDING_LABEL)
        other = export_keying_material(client, b"EXPORTER-other", 48, b"ctx")
        assert len(other) == 48 and other[:32] != cb
        assert other == export_keying_material(server, b"EXPORTER-other", 48, b"ctx")
        bindings.append(cb)
    assert bindings[0] != bindings[1]


def _connect(sctx, cctx, session=None):  # type: ignore[no-untyped-def]
    server = new_connection(sctx, server=True)
    client = new_connection(cctx, server=False, session=session)
    assert handshake_pair(client, server).ok
    return client, server


def test_session_resumption_skips_certificates_and_still_verifies(mesh) -> None:  # type: ignore[no-untyped-def]
    _, sentry, relayer = mesh
    policy = TlsPolicy()
    sctx = build_context(sentry, policy, server=True)
    cctx = build_context(relayer, policy, server=False)
    client, server = _connect(sctx, cctx)
    assert not verify_peer(server, sentry, policy).resumed
    session = resumable_session(client)
    assert session is not None
    client2, server2 = _connect(sctx, cctx, session)
    s_peer = verify_peer(server2, sentry, policy)
    c_peer = verify_peer(client2, relayer, policy)
    assert s_peer.resumed and c_peer.resumed
    assert str(s_peer.spiffe_id) == RELAYER and str(c_peer.spiffe_id) == SENTRY
    assert s_peer.group == "X25519MLKEM768"  # psk_dhe_ke: still a fresh ML-KEM exchange
    assert channel_binding(client2) == channel_binding(server2) != channel_binding(client)
    assert exchange(client2, server2, b"after resumption") == b"after resumption"


def test_resumed_session_rechecked_against_new_crl() -> None:
    ca, (sentry, relayer) = dev_identities(TD, SENTRY, RELAYER)
    policy = TlsPolicy()
    sctx = build_context(sentry, policy, server=True)
    cctx = build_context(relayer, policy, server=False)
    client, _ = _connect(sctx, cctx)
    session = resumable_session(client)
    ca.revoke(relayer, "key_compromise")
    sentry_now = sentry.with_crl(ca.crl_pem())
    # the old context resumes (no certificate is exchanged on resumption) ...
    _, server2 = _connect(sctx, cctx, session)
    # ... but verify_peer with the current CRL refuses the resumed peer
    with pytest.raises(HandshakeRefused) as info:
        verify_peer(server2, sentry_now, policy)
    assert info.value.reason == "revoked"


def test_no_resumption_without_tickets(mesh) -> None:  # type: ignore[no-untyped-def]
    _, sentry, relayer = mesh
    policy = TlsPolicy(session_tickets=False)
    sctx = build_context(sentry, policy, server=True)
    cctx = build_context(relayer, policy, server=False)
    client, _ = _connect(sctx, cctx)
    session = resumable_session(client)
    client2, server2 = _connect(sctx, cctx, session)
    assert not verify_peer(server2, sentry, policy).resumed
    assert not verify_peer(client2, relayer, policy).resumed


def test_chacha_suite_policy(mesh) -> None:  # type: ignore[no-untyped-def]
    _, sentry, relayer = mesh
    policy = TlsPolicy(cipher_suites=("TLS_CHACHA20_POLY1305_SHA256",))
    client, _ = _connect(
        build_context(sentry, policy, server=True), build_context(relayer, policy, server=False)
    )
    assert verify_peer(client, relayer, policy).cipher == "TLS_CHACHA20_POLY1305_SHA256"


def _flights(client, server) -> list[int]:  # type: ignore[no-untyped-def]
    """Drive a handshake one flight at a time; the byte size of each flight."""
    sizes: list[int] = []
    sides = [client, server]
    for turn in range(6):
        me, peer = sides[turn % 2], sides[(turn + 1) % 2]
        with contextlib.suppress(SSL.WantReadError):
            me.do_handshake()
        try:
            data = me.bio_read(1 << 20)
        except SSL.WantReadError:
            data = b""
        sizes.append(len(data))
        if data:
            peer.bio_write(data)
    return sizes


def test_full_handshake_sends_only_the_leaf_and_one_ticket(mesh) -> None:  # type: ignore[no-untyped-def]
    """Each ML-DSA-65 certificate is ~5 KiB: no auto-built chain with the root in it,
    and one session ticket per handshake (OpenSSL's default would send two)."""
    _, sentry, relayer = mesh
    policy = TlsPolicy()
    sctx = build_context(sentry, policy, server=True)
    cctx = build_context(relayer, policy, server=False)
    server = new_connection(sctx, server=True)
    client = new_connection(cctx, server=False)
    full = _flights(client, server)
    assert len(client.get_peer_cert_chain() or []) == 1
    # on a server OpenSSL lists the chain *without* the peer's leaf: nothing else came
    assert server.get_peer_certificate() is not None
    assert not server.get_peer_cert_chain()
    with pytest.raises(SSL.WantReadError):
        client.recv(1)  # the client takes in the ticket
    session = resumable_session(client)
    assert session is not None
    server2 = new_connection(sctx, server=True)
    client2 = new_connection(cctx, server=False, session=session)
    resumed = _flights(client2, server2)
    # the server's post-handshake flight is its ticket(s); a resumed handshake
    # always sends one ticket of the same session, so the sizes must match
    assert full[3] > 1000 and resumed[3] > 1000
    assert abs(full[3] - resumed[3]) < 1000, (full, resumed)
    assert _ossl.session_reused(client2)
