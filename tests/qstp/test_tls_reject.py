"""Every refusal the TLS policy promises, over memory BIOs, with a clear reason each.

"Nothing leaked" is checked concretely: after a refusal the refusing side never
returns application bytes the refused side tried to send, and the refused side's
``verify_peer`` (or handshake) fails too.
"""

from __future__ import annotations

import datetime as dt

import pytest
from OpenSSL import SSL

from pqcnet.identity import MeshCA, NodeIdentity, dev_identities
from pqcnet.identity.certs import utcnow
from pqcnet.qstp import _ossl
from pqcnet.qstp.errors import HandshakeError
from pqcnet.qstp.tls import (
    HandshakeRefused,
    PeerGate,
    TlsPolicy,
    build_context,
    handshake_error,
    new_connection,
    resumable_session,
    verify_peer,
)
from tests.qstp.tlsutil import HandshakeOutcome, handshake_pair, transfer

pytestmark = pytest.mark.timeout(60)

TD = "mesh.test"
SENTRY = f"spiffe://{TD}/acme/sentry/s1"
RELAYER = f"spiffe://{TD}/acme/relayer/r1"


@pytest.fixture(scope="module")
def mesh() -> tuple[MeshCA, NodeIdentity, NodeIdentity]:
    ca, (sentry, relayer) = dev_identities(TD, SENTRY, RELAYER)
    return ca, sentry, relayer


def run(
    client_id: NodeIdentity,
    server_id: NodeIdentity,
    client_policy: TlsPolicy | None = None,
    server_policy: TlsPolicy | None = None,
    *,
    client_ctx: SSL.Context | None = None,
) -> tuple[HandshakeOutcome, SSL.Connection, SSL.Connection]:
    cp, sp = client_policy or TlsPolicy(), server_policy or TlsPolicy()
    server = new_connection(build_context(server_id, sp, server=True), server=True)
    client = new_connection(client_ctx or build_context(client_id, cp, server=False), server=False)
    return handshake_pair(client, server), client, server


def assert_nothing_leaked(sender: SSL.Connection, receiver: SSL.Connection) -> None:
    """Whatever the refused side tries to send, the refusing side yields no plaintext."""
    try:
        sender.send(b"secret application data")
    except SSL.Error:
        return  # sender already knows it is dead: nothing was sent
    transfer(sender, receiver)
    with pytest.raises((SSL.Error, HandshakeError)):
        receiver.recv(65536)


def test_unknown_ca_refused_by_server(mesh) -> None:  # type: ignore[no-untyped-def]
    ca, sentry, _ = mesh
    _, (stranger,) = dev_identities(TD, f"spiffe://{TD}/acme/relayer/evil")
    # the stranger trusts the real CA, but its own certificate comes from another one
    stranger = stranger.with_crl(None).with_trust_bundle(ca.trust_bundle_pem())
    outcome, client, server = run(stranger, sentry)
    assert outcome.server_error is not None
    assert isinstance(outcome.server_error, HandshakeRefused)
    assert outcome.server_error.reason == "unknown-ca"
    assert "peer certificate rejected" in str(outcome.server_error)
    assert outcome.client_error is not None  # the client learns it was refused
    assert_nothing_leaked(client, server)


def test_unknown_ca_refused_by_client(mesh) -> None:  # type: ignore[no-untyped-def]
    _, _, relayer = mesh
    _, (fake_sentry,) = dev_identities(TD, SENTRY)
    outcome, _, server = run(relayer, fake_sentry)
    assert isinstance(outcome.client_error, HandshakeRefused)
    assert outcome.client_error.reason == "unknown-ca"
    assert outcome.server_error is not None
    with pytest.raises(HandshakeError):
        verify_peer(server, fake_sentry, TlsPolicy())


@pytest.mark.parametrize(
    ("shift", "reason"),
    [(-dt.timedelta(hours=13), "expired"), (dt.timedelta(hours=1), "not-yet-valid")],
)
def test_cert_outside_validity_window_refused(mesh, shift, reason) -> None:  # type: ignore[no-untyped-def]
    ca, sentry, _ = mesh
    sid = f"spiffe://{TD}/acme/relayer/r-time"
    bad = ca.issue(sid, dt.timedelta(hours=12), now=utcnow() + shift)
    outcome, client, server = run(bad, sentry)
    assert isinstance(outcome.server_error, HandshakeRefused)
    assert outcome.server_error.reason == reason
    assert outcome.client_error is not None
    assert_nothing_leaked(client, server)


def test_revoked_client_refused_by_server(mesh) -> None:  # type: ignore[no-untyped-def]
    ca = MeshCA.create(TD)
    sentry = ca.issue(SENTRY)
    victim = ca.issue(f"spiffe://{TD}/acme/relayer/stolen")
    ca.revoke(victim, "key_compromise")
    sentry = sentry.with_crl(ca.crl_pem())
    outcome, client, server = run(victim, sentry)
    assert isinstance(outcome.server_error, HandshakeRefused)
    assert outcome.server_error.reason == "revoked"
    assert "revoked" in str(outcome.server_error)
    assert isinstance(outcome.client_error, HandshakeRefused)
    assert outcome.client_error.reason == "revoked"  # precise alert from OpenSSL's CRL check
    assert "alert certificate revoked" in str(outcome.client_error)
    assert_nothing_leaked(client, server)
    # the same client without the revocation in the server's CRL gets in
    fresh = ca.issue(f"spiffe://{TD}/acme/relayer/fine")
    assert run(fresh, sentry)[0].ok


def test_revoked_server_refused_by_client(mesh) -> None:  # type: ignore[no-untyped-def]
    ca = MeshCA.create(TD)
    sentry = ca.issue(SENTRY)
    relayer = ca.issue(RELAYER)
    ca.revoke(sentry.serial, "superseded")
    relayer = relayer.with_crl(ca.crl_pem())
    outcome, _, _ = run(relayer, sentry)
    assert isinstance(outcome.client_error, HandshakeRefused)
    assert outcome.client_error.reason == "revoked"
    assert outcome.server_error is not None


def test_spiffe_id_not_allowed(mesh) -> None:  # type: ignore[no-untyped-def]
    _ca, sentry, relayer = mesh
    only_other = TlsPolicy(allowed_peers=(f"spiffe://{TD}/acme/relayer/r2",))
    outcome, client, server = run(relayer, sentry, server_policy=only_other)
    assert isinstance(outcome.server_error, HandshakeRefused)
    assert outcome.server_error.reason == "spiffe-not-allowed"
    assert RELAYER in str(outcome.server_error)
    # the refused client learns it was its certificate (bad_certificate alert),
    # not an "internal error" of the server
    assert isinstance(outcome.client_error, HandshakeRefused)
    assert outcome.client_error.reason == "certificate-refused"
    assert "bad certificate" in str(outcome.client_error)
    assert_nothing_leaked(client, server)
    # a glob that covers it lets it in; a glob must not cross '/'
    assert run(relayer, sentry, server_policy=TlsPolicy(
        allowed_peers=(f"spiffe://{TD}/acme/relayer/*",)))[0].ok
    assert not run(relayer, sentry, server_policy=TlsPolicy(
        allowed_peers=(f"spiffe://{TD}/acme/sentry/*",)))[0].ok
    # a shorter pattern is another SPIFFE shape: it never matches a 3-segment ID
    assert not run(relayer, sentry, server_policy=TlsPolicy(
        allowed_peers=(f"spiffe://{TD}/acme/*",)))[0].ok
    with pytest.raises(HandshakeError, match="invalid segment"):
        TlsPolicy(allowed_peers=(f"spiffe://{TD}/acme/",))


def test_other_trust_domain_refused_even_with_shared_anchor() -> None:
    # same CA cert trusted, but the default policy only accepts our own trust domain
    ca_a = MeshCA.create("a.test")
    server_id = ca_a.issue("spiffe://a.test/t/sentry/s")
    client_id = ca_a.issue("spiffe://a.test/t/relayer/r")
    strict_server = TlsPolicy(allowed_peers=("spiffe://b.test/t/relayer/*",))
    outcome, _, _ = run(client_id, server_id, server_policy=strict_server)
    assert isinstance(outcome.server_error, HandshakeRefused)
    assert outcome.server_error.reason == "spiffe-not-allowed"


def test_classical_only_client_refused_by_default_server(mesh) -> None:  # type: ignore[no-untyped-def]
    _, sentry, relayer = mesh
    cctx = build_context(relayer, TlsPolicy(), server=False)
    _ossl.set_groups(cctx, ["X25519", "secp256r1"])
    outcome, _, _ = run(relayer, sentry, client_ctx=cctx)
    assert isinstance(outcome.server_error, HandshakeRefused)
    assert outcome.server_error.reason == "no-shared-group"
    assert isinstance(outcome.client_error, HandshakeRefused)
    assert outcome.client_error.reason in ("peer-refused", "no-shared-group")


def test_strict_server_refuses_hybrid_only_client(mesh) -> None:  # type: ignore[no-untyped-def]
    _, sentry, relayer = mesh
    outcome, _, _ = run(relayer, sentry, server_policy=TlsPolicy(groups="strict"))
    assert isinstance(outcome.server_error, HandshakeRefused)
    assert outcome.server_error.reason == "no-shared-group"
    assert outcome.client_error is not None


@pytest.mark.parametrize("group", ["MLKEM1024", "SecP384r1MLKEM1024"])
def test_strict_policy_negotiates_mlkem1024(mesh, group) -> None:  # type: ignore[no-untyped-def]
    _, sentry, relayer = mesh
    strict = TlsPolicy(groups="strict")
    cctx = build_context(relayer, strict, server=False)
    _ossl.set_groups(cctx, [group])
    outcome, client, server = run(relayer, sentry, server_policy=strict, client_ctx=cctx)
    assert outcome.ok, outcome
    assert verify_peer(server, sentry, strict).group == group
    assert verify_peer(client, relayer, strict).post_quantum


def test_classical_allowed_negotiates_and_counts(mesh) -> None:  # type: ignore[no-untyped-def]
    from prometheus_client import REGISTRY

    _, sentry, relayer = mesh
    lax = TlsPolicy(groups="classical-allowed")
    cctx = build_context(relayer, lax, server=False)
    _ossl.set_groups(cctx, ["X25519"])
    labels = {"group": "x25519", "side": "server"}  # OpenSSL's spelling
    before = REGISTRY.get_sample_value("pqcnet_qstp_classical_handshakes_total", labels) or 0.0
    outcome, _client, server = run(relayer, sentry, server_policy=lax, client_ctx=cctx)
    assert outcome.ok, outcome
    info = verify_peer(server, sentry, lax)
    assert info.group.lower() == "x25519" and not info.post_quantum
    after = REGISTRY.get_sample_value("pqcnet_qstp_classical_handshakes_total", labels)
    assert after == before + 1
    # and a hybrid client against the same lax server still gets ML-KEM
    outcome, _, server = run(relayer, sentry, server_policy=lax)
    assert outcome.ok
    assert verify_peer(server, sentry, lax).group == "X25519MLKEM768"


def test_wrong_alpn_refused(mesh) -> None:  # type: ignore[no-untyped-def]
    _, sentry, relayer = mesh
    outcome, client, server = run(relayer, sentry, client_policy=TlsPolicy(alpn=b"h2"))
    assert isinstance(outcome.server_error, HandshakeRefused)
    assert outcome.server_error.reason == "alpn"
    assert "h2" in str(outcome.server_error)
    assert isinstance(outcome.client_error, HandshakeRefused)
    assert outcome.client_error.reason in ("alpn", "peer-refused")
    assert_nothing_leaked(client, server)


def test_handshake_error_maps_foreign_exceptions() -> None:
    assert handshake_error(SSL.ZeroReturnError()).reason == "closed"  # type: ignore[attr-defined]
    err = handshake_error(ValueError("boom"))
    assert isinstance(err, HandshakeError) and "boom" in str(err)


def test_policy_validation() -> None:
    with pytest.raises(HandshakeError):
        TlsPolicy(groups="none")  # type: ignore[arg-type]
    with pytest.raises(HandshakeError):
        TlsPolicy(allowed_peers=("https://x",))
    with pytest.raises(HandshakeError):
        TlsPolicy(allowed_peers="spiffe://a/b/c/d")  # type: ignore[arg-type]
    with pytest.raises(HandshakeError):
        TlsPolicy(cipher_suites=("TLS_NULL",))
    with pytest.raises(HandshakeError):
        TlsPolicy(alpn=b"")


def test_require_crl_refuses_without_crl(mesh) -> None:  # type: ignore[no-untyped-def]
    _, sentry, relayer = mesh
    must = TlsPolicy(require_crl=True)
    outcome, _, _ = run(relayer, sentry.with_crl(None), server_policy=must)
    assert isinstance(outcome.server_error, HandshakeRefused)
    assert outcome.server_error.reason == "revoked" and "requires" in str(outcome.server_error)
    assert run(relayer, sentry, server_policy=must)[0].ok  # sentry holds a CRL


def test_foreign_or_garbage_crl_is_refused_at_context_build(mesh) -> None:  # type: ignore[no-untyped-def]
    _, sentry, _ = mesh
    other_ca, _ = dev_identities(TD)
    for bad in (other_ca.crl_pem(), b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n"):
        with pytest.raises(HandshakeError, match="CRL is unusable"):
            build_context(sentry.with_crl(bad), TlsPolicy(), server=True)


def test_stale_crl_still_applies(caplog) -> None:  # type: ignore[no-untyped-def]
    ca = MeshCA.create(TD)
    sentry = ca.issue(SENTRY)
    victim = ca.issue(RELAYER)
    ca.revoke(victim)
    stale = ca.crl_pem(now=utcnow() - dt.timedelta(hours=3))  # nextUpdate 2 h ago
    outcome, _, _ = run(victim, sentry.with_crl(stale))
    assert isinstance(outcome.server_error, HandshakeRefused)
    assert outcome.server_error.reason == "revoked"
    assert any("still applied" in r.getMessage() for r in caplog.records)


def test_ca_rotation_accepts_old_and_new_with_new_crl() -> None:
    old, new = MeshCA.create(TD), MeshCA.create(TD)
    new.extra_anchors.append(old.certificate)
    bundle = new.trust_bundle_pem()
    old_relayer = old.issue(RELAYER).with_crl(None).with_trust_bundle(bundle)
    new_sentry = new.issue(SENTRY).with_trust_bundle(bundle).with_crl(new.crl_pem())
    outcome, _, server = run(old_relayer, new_sentry)
    assert outcome.ok, outcome
    assert str(verify_peer(server, new_sentry, TlsPolicy()).spiffe_id) == RELAYER
    # ... unless the policy demands a CRL for every issuer
    outcome, _, _ = run(old_relayer, new_sentry, server_policy=TlsPolicy(require_crl=True))
    assert outcome.server_error is not None


def test_client_without_certificate_refused(mesh) -> None:  # type: ignore[no-untyped-def]
    _, sentry, _ = mesh
    bare = SSL.Context(SSL.TLS_METHOD)
    bare.set_min_proto_version(SSL.TLS1_3_VERSION)
    bare.set_alpn_protos([b"qstp/1"])
    _ossl.set_groups(bare, ["X25519MLKEM768"])
    outcome, client, server = run(sentry, sentry, client_ctx=bare)
    assert isinstance(outcome.server_error, HandshakeRefused)
    assert outcome.server_error.reason == "no-peer-certificate"
    assert outcome.client_error is not None
    assert_nothing_leaked(client, server)


def test_tls12_only_client_refused(mesh) -> None:  # type: ignore[no-untyped-def]
    _, sentry, relayer = mesh
    cctx = build_context(relayer, TlsPolicy(), server=False)
    cctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    cctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    outcome, _, _ = run(relayer, sentry, client_ctx=cctx)
    assert isinstance(outcome.server_error, HandshakeRefused)
    assert outcome.server_error.reason == "protocol-version"


def test_gate_denial_is_a_bad_certificate_alert_and_resumption_is_refused_too(
        mesh) -> None:  # type: ignore[no-untyped-def]
    _ca, sentry, relayer = mesh
    gate = PeerGate()
    policy = TlsPolicy(gate=gate)
    sctx = build_context(sentry, policy, server=True)
    cctx = build_context(relayer, TlsPolicy(), server=False)
    client, server = new_connection(cctx, server=False), new_connection(sctx, server=True)
    assert handshake_pair(client, server).ok
    transfer(server, client)
    with pytest.raises(SSL.WantReadError):
        client.recv(1)  # takes in the session ticket
    session = resumable_session(client)
    assert session is not None
    gate.deny("r1", "slashed")
    outcome, _, _ = run(relayer, sentry, server_policy=policy, client_ctx=cctx)
    assert isinstance(outcome.server_error, HandshakeRefused)
    assert outcome.server_error.reason == "denied"
    assert isinstance(outcome.client_error, HandshakeRefused)
    assert outcome.client_error.reason == "certificate-refused"
    # a resumed session exchanges no certificate: verify_peer is the check there
    server2 = new_connection(sctx, server=True)
    client2 = new_connection(cctx, server=False, session=session)
    assert handshake_pair(client2, server2).ok
    assert _ossl.session_reused(server2)
    with pytest.raises(HandshakeRefused, match=r"slashed \[denied\]"):
        verify_peer(server2, sentry, policy)
