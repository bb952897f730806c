"""X.509 building and reading for the mesh: ML-DSA-signed CA and leaf certificates.

Kept apart from :mod:`pqcnet.identity.ca` so that everything that *reads* a
certificate (the TLS verifier, ``NodeIdentity.load``, the CLI) shares one parser
for the SPIFFE URI SAN and one definition of what a pqcnet leaf looks like.
"""

from __future__ import annotations

import datetime as dt
import os

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pqcnet.crypto.errors import CryptoError
from pqcnet.crypto.pqc import MLDSAPublic, SigningKey, VerifyKey, algorithm_of
from pqcnet.identity.errors import IdentityError
from pqcnet.identity.spiffe import SpiffeId

#: Certificates are backdated by this much so a peer whose clock runs slightly
#: behind ours does not reject a certificate we issued a moment ago.
CLOCK_SKEW = dt.timedelta(minutes=5)
#: Bound on how many certificates a PEM bundle (chain, trust bundle) may hold.
MAX_BUNDLE_CERTS = 64
#: Bound on the size of any PEM blob we parse (certs, CRLs, CSRs).
MAX_PEM_BYTES = 4 * 1024 * 1024


def utcnow() -> dt.datetime:
    """Timezone-aware current UTC time (the one clock read in identity code)."""
    return dt.datetime.now(dt.UTC)


def random_serial() -> int:
    """A positive 159-bit serial (RFC 5280 allows at most 20 octets)."""
    return int.from_bytes(os.urandom(20), "big") >> 1 or 1


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])]
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization[:64]))
    return x509.Name(attrs)


def build_ca_certificate(
    key: SigningKey, trust_domain: str, *, not_before: dt.datetime, not_after: dt.datetime
) -> x509.Certificate:
    """A self-signed mesh root: CA:TRUE, pathlen 0, keyCertSign + cRLSign."""
    # the key id in the name keeps two CAs of one trust domain (rotation) distinct
    name = _name(f"pqcnet mesh CA {trust_domain} {key.key_id.hex()[:12]}", "pqcnet")
    pub = key.public_key.cryptography_key
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(pub)
        .serial_number(random_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
        .sign(key.cryptography_key, None)
    )


def build_leaf_certificate(
    ca_key: SigningKey,
    ca_cert: x509.Certificate,
    subject_key: MLDSAPublic,
    spiffe_id: SpiffeId,
    *,
    not_before: dt.datetime,
    not_after: dt.datetime,
    serial: int | None = None,
) -> x509.Certificate:
    """An X509-SVID style leaf: SPIFFE URI SAN only, usable for TLS client and server."""
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(_name(spiffe_id.node_id, spiffe_id.tenant))
        .issuer_name(ca_cert.subject)
        .public_key(subject_key)
        .serial_number(serial or random_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]),
            critical=True,
        )
        .sign(ca_key.cryptography_key, None)
    )


def spiffe_id_of(cert: x509.Certificate) -> SpiffeId:
    """The single SPIFFE URI SAN of a leaf; zero or several is an :class:`IdentityError`."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise IdentityError("certificate has no subjectAltName (no SPIFFE ID)") from None
    uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier)
            if u.startswith("spiffe://")]
    if len(uris) != 1:
        raise IdentityError(f"certificate must carry exactly one SPIFFE URI SAN, has {len(uris)}")
    return SpiffeId.parse(uris[0])


def verify_key_of(cert: x509.Certificate) -> VerifyKey:
    """The certificate's ML-DSA public key; any other key type is an :class:`IdentityError`."""
    pub = cert.public_key()
    try:
        algorithm_of(pub)
    except CryptoError:
        raise IdentityError(
            f"certificate key is {type(pub).__name__}, pqcnet requires ML-DSA"
        ) from None
    return VerifyKey(pub)  # type: ignore[arg-type]


def load_certs(pem: bytes, what: str = "certificate bundle") -> list[x509.Certificate]:
    """Parse one or more PEM certificates with bounds and a clear error."""
    if len(pem) > MAX_PEM_BYTES:
        raise IdentityError(f"{what} larger than {MAX_PEM_BYTES} bytes")
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise IdentityError(f"cannot parse {what}: {exc}") from None
    if len(certs) > MAX_BUNDLE_CERTS:
        raise IdentityError(f"{what} holds {len(certs)} certificates (max {MAX_BUNDLE_CERTS})")
    return certs


def certs_pem(certs: list[x509.Certificate]) -> bytes:
    """PEM-encode certificates in order."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def check_validity(cert: x509.Certificate, now: dt.datetime, what: str = "certificate") -> None:
    """Raise :class:`IdentityError` naming the problem when ``now`` is outside the window."""
    if now < cert.not_valid_before_utc:
        raise IdentityError(
            f"{what} is not yet valid (valid from {cert.not_valid_before_utc.isoformat()})"
        )
    if now > cert.not_valid_after_utc:
        raise IdentityError(f"{what} expired at {cert.not_valid_after_utc.isoformat()}")


def is_signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True when ``issuer`` names and signed ``cert`` (ML-DSA signature checked)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True
