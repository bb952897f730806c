"""Mesh identity: SPIFFE IDs, CA issuance and policy, CSRs, renewal, CRLs, key store."""

from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from pqcnet.crypto.pqc import SigningKey
from pqcnet.identity import (
    IssuancePolicy,
    MeshCA,
    NodeIdentity,
    SpiffeId,
    build_csr,
    dev_identities,
    load_crl,
    spiffe_id_of,
    spiffe_matches,
)
from pqcnet.identity.certs import utcnow
from pqcnet.identity.errors import IdentityError, PassphraseRequired, PolicyViolation
from pqcnet.identity.keystore import is_encrypted, read_private_key, write_private_key

pytestmark = pytest.mark.timeout(120)

TD = "mesh.test"

# ---------------------------------------------------------------------------- SPIFFE

segment = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABC0123456789._-", min_size=1, max_size=20)
segment = segment.filter(lambda s: s not in (".", ".."))


@given(segment, segment, segment)
def test_spiffe_roundtrip(tenant: str, role: str, node: str) -> None:
    sid = SpiffeId(TD, tenant, role, node)
    assert SpiffeId.parse(str(sid)) == sid
    assert sid.matches(str(sid))
    assert sid.matches(f"spiffe://{TD}/{tenant}/{role}/*")
    assert sid.matches(f"spiffe://{TD}/*/*/*")
    assert not sid.matches(f"spiffe://other.test/{tenant}/{role}/*")


@pytest.mark.parametrize(
    "bad",
    [
        "https://mesh.test/a/b/c",
        "spiffe://mesh.test",
        "spiffe://mesh.test/",
        "spiffe://mesh.test/a/b/",
        "spiffe://Mesh.Test/a/b/c",
        "spiffe://mesh.test/a//c",
        "spiffe://mesh.test/a/../c",
        "spiffe://mesh.test/a/b c/d",
        "spiffe://mesh.test/a/b/" + "x" * 3000,
        "",
    ],
)
def test_spiffe_parse_rejects(bad: str) -> None:
    with pytest.raises(IdentityError):
        SpiffeId.parse(bad)


def test_glob_never_crosses_segments_or_domains() -> None:
    sid = SpiffeId.parse("spiffe://mesh.test/acme/sentry/s1")
    assert spiffe_matches("spiffe://mesh.test/acme/sentry/s?", sid)
    assert spiffe_matches("spiffe://mesh.test/acme/sen*/s1", sid)
    assert not spiffe_matches("spiffe://mesh.test/acme/*", sid)
    assert not spiffe_matches("spiffe://mesh.test/*", sid)
    assert not spiffe_matches("spiffe://*.test/acme/sentry/s1", sid)
    assert not spiffe_matches("spiffe://mesh.test/acme/relayer/*", sid)


# ---------------------------------------------------------------------------- CA


@pytest.fixture(scope="module")
def ca() -> MeshCA:
    return MeshCA.create(TD, policy=IssuancePolicy(allowed_roles=("sentry", "relayer")))


def test_issued_certificate_shape(ca: MeshCA) -> None:
    node = ca.issue(f"spiffe://{TD}/acme/sentry/s1")
    cert = node.certificate
    assert spiffe_id_of(cert) == node.spiffe_id
    assert cert.signature_algorithm_oid.dotted_string == "2.16.840.1.101.3.4.3.18"  # ML-DSA-65
    assert node.key.algorithm == "ML-DSA-65"
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(ca.certificate)
    life = node.not_after - node.not_before
    assert dt.timedelta(hours=12) <= life <= dt.timedelta(hours=12, minutes=6)  # + clock skew
    assert node.trust_bundle_pem == ca.trust_bundle_pem()
    assert node.crl_pem is not None


def test_issue_policy(ca: MeshCA) -> None:
    with pytest.raises(PolicyViolation, match="role"):
        ca.issue(f"spiffe://{TD}/acme/validator/v1")
    with pytest.raises(PolicyViolation, match="trust domain"):
        ca.issue("spiffe://other.test/acme/sentry/s1")
    with pytest.raises(PolicyViolation, match="cap"):
        ca.issue(f"spiffe://{TD}/acme/sentry/s1", dt.timedelta(hours=25))
    with pytest.raises(PolicyViolation, match="algorithm"):
        ca.issue(f"spiffe://{TD}/acme/sentry/s1", key=SigningKey.generate("ML-DSA-44"))


def test_sign_csr_with_policy(ca: MeshCA) -> None:
    key = SigningKey.generate()
    csr = build_csr(key, f"spiffe://{TD}/tenant-b/relayer/r9")
    pem = ca.sign_csr(csr, ttl=dt.timedelta(hours=2))
    node = NodeIdentity.from_pem(key, pem, ca.trust_bundle_pem())
    assert str(node.spiffe_id) == f"spiffe://{TD}/tenant-b/relayer/r9"
    assert node.not_after - node.not_before <= dt.timedelta(hours=2, minutes=6)
    only_acme = IssuancePolicy(allowed_tenants=("acme",), max_ttl=dt.timedelta(hours=1),
                               default_ttl=dt.timedelta(hours=1))
    with pytest.raises(PolicyViolation, match="tenant"):
        ca.sign_csr(csr, only_acme)
    acme_csr = build_csr(key, f"spiffe://{TD}/acme/relayer/r9")
    with pytest.raises(PolicyViolation, match="TTL"):
        ca.sign_csr(acme_csr, only_acme, ttl=dt.timedelta(hours=2))
    with pytest.raises(PolicyViolation, match="cap"):  # laxer per-call policy cannot exceed CA cap
        ca.sign_csr(acme_csr, IssuancePolicy(max_ttl=dt.timedelta(days=9)),
                    ttl=dt.timedelta(days=8))


def test_sign_csr_rejects_bad_requests(ca: MeshCA) -> None:
    with pytest.raises(IdentityError, match="parse"):
        ca.sign_csr(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"
                    b"-----END CERTIFICATE REQUEST-----\n")
    # classical key
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "r")]))
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(f"spiffe://{TD}/acme/relayer/r")]), critical=True)
        .sign(ec_key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(PolicyViolation, match="ML-DSA"):
        ca.sign_csr(ec_csr)
    # no SAN / extra DNS SAN
    key = SigningKey.generate()
    no_san = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "r")]))
        .sign(key.cryptography_key, None).public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(PolicyViolation, match="subjectAltName"):
        ca.sign_csr(no_san)
    dns = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "r")]))
        .add_extension(x509.SubjectAlternativeName([
            x509.UniformResourceIdentifier(f"spiffe://{TD}/acme/relayer/r"),
            x509.DNSName("evil.example")]), critical=True)
        .sign(key.cryptography_key, None).public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(PolicyViolation, match="only"):
        ca.sign_csr(dns)
    # tampered CSR: signature no longer verifies (proof of possession)
    good = build_csr(key, f"spiffe://{TD}/acme/relayer/r")
    der = x509.load_pem_x509_csr(good).public_bytes(serialization.Encoding.DER)
    idx = der.find(b"acme")
    tampered_der = der[:idx] + b"acmf" + der[idx + 4:]
    tampered = x509.load_der_x509_csr(tampered_der).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(PolicyViolation, match="signature"):
        ca.sign_csr(tampered)


def test_renewal_overlap(ca: MeshCA) -> None:
    t0 = utcnow()
    old = ca.issue(f"spiffe://{TD}/acme/relayer/r1", dt.timedelta(hours=12), now=t0)
    assert not old.needs_renewal(t0 + dt.timedelta(hours=5))
    assert old.needs_renewal(t0 + dt.timedelta(hours=7))
    new = ca.renew(old, now=t0 + dt.timedelta(hours=7))
    assert new.spiffe_id == old.spiffe_id
    assert new.serial != old.serial
    assert new.key.public_key != old.key.public_key  # key rotated by default
    assert new.not_after > old.not_after
    overlap_start, overlap_end = new.not_before, old.not_after
    assert overlap_end - overlap_start >= dt.timedelta(hours=4)  # both valid in between
    same_key = ca.renew(old, rotate_key=False)
    assert same_key.key is old.key
    ca.revoke(old, "superseded")
    with pytest.raises(PolicyViolation, match="revoked"):
        ca.renew(old)


def test_crl_roundtrip_any_node_can_verify() -> None:
    ca, (a, b) = dev_identities(TD, f"spiffe://{TD}/t/sentry/a", f"spiffe://{TD}/t/relayer/b")
    first = load_crl(ca.crl_pem(), a.trust_bundle_pem)
    assert not first.is_revoked(b.serial)
    ca.revoke(b, "key_compromise")
    crl_pem = ca.crl_pem()
    crl = load_crl(crl_pem, a.trust_bundle_pem)  # bytes verified with just the bundle
    assert crl.is_revoked(b.serial) and not crl.is_revoked(a.serial)
    assert crl.is_newer_than(first) and not first.is_newer_than(crl)
    parsed = x509.load_pem_x509_crl(crl_pem)
    entry = parsed.get_revoked_certificate_by_serial_number(b.serial)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == (
        x509.ReasonFlags.key_compromise
    )
    # another CA's CRL, or a tampered one, is refused
    other, _ = dev_identities(TD)
    with pytest.raises(IdentityError, match="not in the trust bundle"):
        load_crl(other.crl_pem(), a.trust_bundle_pem)
    der = bytearray(parsed.public_bytes(serialization.Encoding.DER))
    der[-40] ^= 1
    bad = x509.load_der_x509_crl(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(IdentityError, match="signature"):
        load_crl(bad, a.trust_bundle_pem)
    with pytest.raises(IdentityError, match="parse"):
        load_crl(b"garbage", a.trust_bundle_pem)
    # staleness is reported, revocations still apply
    assert crl.is_stale(utcnow() + dt.timedelta(hours=2))


def test_a_checked_crl_is_remembered_only_for_the_same_bytes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Nodes re-read the CRL they hold every second: the ML-DSA check runs once per
    distinct (CRL, bundle) pair, and a cached success never vouches for other bytes."""
    from pqcnet.identity import crl as crl_mod

    ca, (a,) = dev_identities(TD, f"spiffe://{TD}/t/sentry/a")
    crl_mod._checked_crl.cache_clear()
    checks: list[int] = []
    real = crl_mod._signed_by
    monkeypatch.setattr(crl_mod, "_signed_by",
                        lambda c, anchor: checks.append(1) or real(c, anchor))
    pem = ca.crl_pem()
    first = load_crl(pem, a.trust_bundle_pem)
    assert load_crl(bytearray(pem), a.trust_bundle_pem) is first  # same bytes, any type
    assert len(checks) == 1
    # one flipped signature byte after the good CRL was cached: checked, refused
    der = bytearray(x509.load_pem_x509_crl(pem).public_bytes(serialization.Encoding.DER))
    der[-40] ^= 1
    bad = x509.load_der_x509_crl(bytes(der)).public_bytes(serialization.Encoding.PEM)
    for _ in range(2):  # failures are not remembered either
        with pytest.raises(IdentityError, match="signature"):
            load_crl(bad, a.trust_bundle_pem)
    assert len(checks) == 3
    # the cached CRL under a bundle without its CA: refused, not answered from the cache
    other, (o,) = dev_identities(TD, f"spiffe://{TD}/t/sentry/o")
    with pytest.raises(IdentityError, match="not in the trust bundle"):
        load_crl(pem, o.trust_bundle_pem)
    # bounded: many distinct CRLs never hold more than CRL_CACHE_SIZE entries
    numbers = {load_crl(other.crl_pem(), o.trust_bundle_pem).number
               for _ in range(crl_mod.CRL_CACHE_SIZE + 3)}  # each call signs a new one
    assert len(numbers) == crl_mod.CRL_CACHE_SIZE + 3
    assert crl_mod._checked_crl.cache_info().currsize == crl_mod.CRL_CACHE_SIZE


def test_revoke_by_spiffe_id_and_serial() -> None:
    ca = MeshCA.create(TD)
    n1 = ca.issue(f"spiffe://{TD}/t/relayer/x")
    n2 = ca.issue(f"spiffe://{TD}/t/relayer/x")
    revs = ca.revoke_spiffe_id(f"spiffe://{TD}/t/relayer/x", "cessation_of_operation")
    assert {r.serial for r in revs} == {n1.serial, n2.serial}
    with pytest.raises(IdentityError, match="no unexpired"):
        ca.revoke_spiffe_id(f"spiffe://{TD}/t/relayer/nobody")
    with pytest.raises(IdentityError, match="reason"):
        ca.revoke(n1.serial, "because")
    with pytest.raises(IdentityError):
        ca.revoke(-1)
    foreign = dev_identities(TD, f"spiffe://{TD}/t/relayer/y")[1][0]
    with pytest.raises(IdentityError, match="not issued by this CA"):
        ca.revoke(foreign)


# ---------------------------------------------------------------------------- storage


def test_key_store_encrypts_with_passphrase(tmp_path: Path) -> None:
    key = SigningKey.generate()
    path = tmp_path / "k.pem"
    write_private_key(path, key, b"correct horse")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert is_encrypted(path)
    raw = key.cryptography_key.private_bytes_raw()
    assert raw not in path.read_bytes()
    assert read_private_key(path, b"correct horse").public_key == key.public_key
    with pytest.raises(IdentityError, match="wrong passphrase"):
        read_private_key(path, b"wrong")
    with pytest.raises(PassphraseRequired, match="passphrase is required"):
        read_private_key(path, None)
    with pytest.raises(IdentityError, match="not found"):
        read_private_key(tmp_path / "missing.pem", None)
    (tmp_path / "junk.pem").write_bytes(b"not a key")
    with pytest.raises(IdentityError):
        read_private_key(tmp_path / "junk.pem", None)


def test_node_identity_save_load(tmp_path: Path) -> None:
    ca, (node,) = dev_identities(TD, f"spiffe://{TD}/t/sentry/s")
    node.save(tmp_path / "n", b"pw")
    back = NodeIdentity.load(tmp_path / "n", b"pw")
    assert back.spiffe_id == node.spiffe_id
    assert back.not_after == node.not_after
    assert back.crl_pem == node.crl_pem
    assert back.key.public_key == node.key.public_key
    with pytest.raises(IdentityError):
        NodeIdentity.load(tmp_path / "n", b"nope")
    # a key that does not match the certificate is refused
    other = ca.issue(f"spiffe://{TD}/t/sentry/o")
    (tmp_path / "n" / "cert.pem").write_bytes(other.cert_chain_pem)
    with pytest.raises(IdentityError, match="does not match"):
        NodeIdentity.load(tmp_path / "n", b"pw")


def test_a_missing_file_is_named_before_the_passphrase_is_asked_for(tmp_path: Path) -> None:
    _ca, (node,) = dev_identities(TD, f"spiffe://{TD}/t/sentry/s")
    node.save(tmp_path / "n", b"pw")
    (tmp_path / "n" / "bundle.pem").unlink()
    for passphrase in (b"pw", None):
        with pytest.raises(IdentityError) as info:
            NodeIdentity.load(tmp_path / "n", passphrase)
        assert str(info.value) == f"trust bundle file not found: {tmp_path / 'n' / 'bundle.pem'}"
        assert not isinstance(info.value, PassphraseRequired)


def test_ca_save_load_keeps_state(tmp_path: Path) -> None:
    ca = MeshCA.create(TD, policy=IssuancePolicy(allowed_roles=("sentry",)))
    node = ca.issue(f"spiffe://{TD}/t/sentry/s")
    ca.revoke(node, "key_compromise")
    ca.crl_pem()
    ca.save(tmp_path, b"ca-pass")
    assert is_encrypted(tmp_path / "ca-key.pem")
    back = MeshCA.load(tmp_path, b"ca-pass")
    assert back.policy.allowed_roles == ("sentry",)
    assert node.serial in back.revocations
    assert back.crl_number == ca.crl_number
    crl = load_crl(back.crl_pem(), node.trust_bundle_pem)
    assert crl.is_revoked(node.serial) and crl.number == ca.crl_number + 1
    with pytest.raises(IdentityError, match="wrong passphrase"):
        MeshCA.load(tmp_path, b"bad")
    (tmp_path / "ca-state.json").write_text("{not json")
    with pytest.raises(IdentityError, match="corrupt"):
        MeshCA.load(tmp_path, b"ca-pass")


def test_trust_bundle_with_rotation_anchor() -> None:
    old = MeshCA.create(TD)
    new = MeshCA.create(TD)
    new.extra_anchors.append(old.certificate)
    old_node = old.issue(f"spiffe://{TD}/t/sentry/old")
    bundle = new.trust_bundle_pem()
    assert len(x509.load_pem_x509_certificates(bundle)) == 2
    rebased = old_node.with_crl(None).with_trust_bundle(bundle)
    assert len(rebased.trust_anchors) == 2
    with pytest.raises(IdentityError, match="trust bundle"):
        old_node.with_trust_bundle(b"")


@given(st.text(max_size=300))
def test_spiffe_parse_or_typed_error(text: str) -> None:
    try:
        sid = SpiffeId.parse(text)
    except IdentityError:
        return
    assert str(sid) == text


@given(st.text(max_size=100))
def test_pattern_match_never_raises(pattern: str) -> None:
    sid = SpiffeId.parse("spiffe://mesh.test/acme/sentry/s1")
    assert isinstance(spiffe_matches(pattern, sid), bool)
