"""Certificate signing requests: how a node gets a certificate without sending its key.

The node keeps its ML-DSA key; the CSR carries the public key, the requested
SPIFFE ID as the only SAN, and an ML-DSA signature proving possession. The CA
side is :meth:`pqcnet.identity.MeshCA.sign_csr`.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from pqcnet.crypto.pqc import SigningKey
from pqcnet.identity.spiffe import SpiffeId


def build_csr(key: SigningKey, spiffe_id: str | SpiffeId) -> bytes:
    """A PEM CSR for ``spiffe_id`` signed by ``key``."""
    sid = spiffe_id if isinstance(spiffe_id, SpiffeId) else SpiffeId.parse(spiffe_id)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sid.node_id[:64])]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(sid))]), critical=True
        )
        .sign(key.cryptography_key, None)
    )
    return csr.public_bytes(serialization.Encoding.PEM)
