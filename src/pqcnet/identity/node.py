"""What one node presents and trusts: its key, its leaf chain, the trust bundle, the CRL.

A :class:`NodeIdentity` is everything :func:`pqcnet.qstp.tls.build_context` needs and is
immutable: renewal and CRL refresh produce a *new* identity, so a context built
from the old one keeps working until the caller swaps it (overlap without races).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from cryptography import x509

from pqcnet.crypto.pqc import SigningKey
from pqcnet.identity.certs import (
    CLOCK_SKEW,
    MAX_PEM_BYTES,
    certs_pem,
    load_certs,
    spiffe_id_of,
)
from pqcnet.identity.errors import IdentityError
from pqcnet.identity.keystore import (
    KeyStore,
    atomic_write,
    read_bounded,
    read_private_key,
    write_private_key,
)
from pqcnet.identity.spiffe import SpiffeId

KEY_FILE = "key.pem"
CERT_FILE = "cert.pem"
BUNDLE_FILE = "bundle.pem"
CRL_FILE = "crl.pem"
#: Renew once this fraction of a certificate's lifetime has passed; the rest is
#: the overlap during which old and new certificates are both valid.
DEFAULT_RENEW_AT = 0.5


@dataclass(frozen=True, eq=False)
class NodeIdentity:
    """A node's key, leaf certificate chain, trust bundle and (optional) current CRL.

    Build with :meth:`from_pem` (which derives and checks ``spiffe_id`` and
    ``not_after``), :meth:`load`, or :meth:`pqcnet.identity.MeshCA.issue`.
    """

    key: SigningKey
    #: leaf first, then any intermediates (PEM)
    cert_chain_pem: bytes
    #: the CA certificates this node trusts (PEM)
    trust_bundle_pem: bytes
    #: the latest signed CRL from the CA (PEM), if the node has one
    crl_pem: bytes | None
    spiffe_id: SpiffeId
    not_after: dt.datetime

    @classmethod
    def from_pem(
        cls,
        key: SigningKey,
        cert_chain_pem: bytes,
        trust_bundle_pem: bytes,
        crl_pem: bytes | None = None,
    ) -> NodeIdentity:
        """Assemble an identity, checking the key matches the leaf and the leaf names a node."""
        chain = load_certs(cert_chain_pem, "certificate chain")
        if not chain:
            raise IdentityError("certificate chain is empty")
        if not load_certs(trust_bundle_pem, "trust bundle"):
            raise IdentityError("trust bundle is empty")
        if crl_pem is not None and len(crl_pem) > MAX_PEM_BYTES:
            raise IdentityError(f"CRL larger than {MAX_PEM_BYTES} bytes")
        leaf = chain[0]
        if leaf.public_key() != key.public_key.cryptography_key:
            raise IdentityError("private key does not match the leaf certificate")
        return cls(
            key=key,
            cert_chain_pem=certs_pem(chain),
            trust_bundle_pem=trust_bundle_pem,
            crl_pem=crl_pem,
            spiffe_id=spiffe_id_of(leaf),
            not_after=leaf.not_valid_after_utc,
        )

    @cached_property
    def chain(self) -> list[x509.Certificate]:
        """Parsed certificate chain, leaf first."""
        return load_certs(self.cert_chain_pem, "certificate chain")

    @property
    def certificate(self) -> x509.Certificate:
        """The parsed leaf certificate."""
        return self.chain[0]

    @cached_property
    def trust_anchors(self) -> list[x509.Certificate]:
        """Parsed trust bundle."""
        return load_certs(self.trust_bundle_pem, "trust bundle")

    @property
    def not_before(self) -> dt.datetime:
        """Start of the leaf's validity window (UTC)."""
        return self.certificate.not_valid_before_utc

    @property
    def serial(self) -> int:
        """The leaf certificate's serial number (what a CRL names)."""
        return self.certificate.serial_number

    def renew_after(self, renew_at: float = DEFAULT_RENEW_AT) -> dt.datetime:
        """The moment from which :meth:`needs_renewal` is true."""
        if not 0.0 < renew_at < 1.0:
            raise IdentityError("renew_at must be between 0 and 1 (exclusive)")
        start = self.issued_at
        return start + (self.not_after - start) * renew_at

    @property
    def issued_at(self) -> dt.datetime:
        """When the certificate was issued: the mesh CA backdates ``notBefore`` by
        :data:`~pqcnet.identity.certs.CLOCK_SKEW`, which would otherwise count as
        lifetime (a 20 s certificate would look 5 min 20 s long and be renewed after it
        expired). A certificate too short to have been backdated keeps its notBefore."""
        shifted = self.not_before + CLOCK_SKEW
        return shifted if shifted < self.not_after else self.not_before

    def needs_renewal(self, now: dt.datetime, renew_at: float = DEFAULT_RENEW_AT) -> bool:
        """True once ``renew_at`` of the lifetime has passed (or the cert expired)."""
        return now >= self.renew_after(renew_at)

    def with_crl(self, crl_pem: bytes | None) -> NodeIdentity:
        """A copy carrying a newer CRL (verify it first with :func:`load_crl`)."""
        return dataclasses.replace(self, crl_pem=crl_pem)

    def with_trust_bundle(self, trust_bundle_pem: bytes) -> NodeIdentity:
        """A copy trusting a different bundle (CA rotation)."""
        return NodeIdentity.from_pem(self.key, self.cert_chain_pem, trust_bundle_pem, self.crl_pem)

    def save(
        self, directory: Path, passphrase: bytes | None = None, *,
        key_store: KeyStore | None = None,
    ) -> None:
        """Write key (0600, encrypted when a passphrase is given), chain, bundle, CRL.

        With ``key_store`` the key goes there instead of ``key.pem`` (``passphrase``
        is then unused)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if key_store is not None:
            key_store.store(self.key)
        else:
            write_private_key(directory / KEY_FILE, self.key, passphrase)
        atomic_write(directory / CERT_FILE, self.cert_chain_pem)
        atomic_write(directory / BUNDLE_FILE, self.trust_bundle_pem)
        if self.crl_pem is not None:
            atomic_write(directory / CRL_FILE, self.crl_pem)
        else:
            (directory / CRL_FILE).unlink(missing_ok=True)

    @classmethod
    def load(
        cls, directory: Path, passphrase: bytes | None = None, *,
        key_store: KeyStore | None = None,
    ) -> NodeIdentity:
        """Inverse of :meth:`save`; any missing or mismatched part is an IdentityError.

        The key comes from ``key_store`` when given (file, PKCS#11, Shamir), else
        from ``key.pem`` under ``passphrase``."""
        directory = Path(directory)
        # public files first: a missing one is named even when the key's passphrase
        # is missing too (the user then fixes both at once)
        chain = read_bounded(directory / CERT_FILE, MAX_PEM_BYTES, "certificate")
        bundle = read_bounded(directory / BUNDLE_FILE, MAX_PEM_BYTES, "trust bundle")
        if key_store is not None:
            key = key_store.load()
        else:
            key = read_private_key(directory / KEY_FILE, passphrase)
        crl_path = directory / CRL_FILE
        crl = read_bounded(crl_path, MAX_PEM_BYTES, "CRL") if crl_path.exists() else None
        return cls.from_pem(key, chain, bundle, crl)

    def __repr__(self) -> str:
        return f"NodeIdentity({self.spiffe_id}, not_after={self.not_after.isoformat()})"
