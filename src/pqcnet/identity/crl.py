"""Certificate revocation lists: signed by the mesh CA, verifiable by any node.

A CRL travels as PEM bytes over any channel (control-plane gossip, a file, the
CLI). A node accepts it only after :func:`load_crl` has checked the ML-DSA
signature against a CA in its trust bundle, so an attacker who can inject bytes
can neither forge revocations nor hide them (an older CRL, by ``crl_number``,
never replaces a newer one: see :meth:`RevocationList.is_newer_than`).

Checking costs a PEM parse of the CRL and the trust bundle plus an ML-DSA-65 verify
(≈ 0.6 ms), and a running node re-reads the CRL it holds every second (tunnel sweep,
identity poll) on its event loop: successful checks are remembered by the exact bytes
of both inputs (:data:`CRL_CACHE_SIZE` of them), so unchanged inputs are not
re-verified and any changed byte is checked afresh. Failures are never remembered.
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass, field

from cryptography import x509

from pqcnet.identity.certs import MAX_PEM_BYTES, load_certs
from pqcnet.identity.errors import IdentityError

#: Bound on revoked entries in one CRL; a CA with more should shorten TTLs instead.
MAX_CRL_ENTRIES = 100_000
#: Signature-checked CRLs remembered by (CRL bytes, trust-bundle bytes): a node holds
#: one and meets a few more (gossip, renewal), so a handful covers steady state.
CRL_CACHE_SIZE = 16


@dataclass(frozen=True, slots=True)
class RevocationList:
    """A signature-checked CRL, reduced to what verification needs."""

    issuer: x509.Name
    number: int
    last_update: dt.datetime
    next_update: dt.datetime | None
    revoked: frozenset[int]
    pem: bytes = field(repr=False)

    def is_revoked(self, serial: int) -> bool:
        """Whether the certificate with ``serial`` is listed."""
        return serial in self.revoked

    def is_stale(self, now: dt.datetime) -> bool:
        """Past ``nextUpdate``: still applied (revocations stay), but a fresh one is due."""
        return self.next_update is not None and now > self.next_update

    def is_newer_than(self, other: RevocationList | None) -> bool:
        """True when this CRL should replace ``other`` (higher CRL number)."""
        return other is None or self.number > other.number


def load_crl(pem: bytes, trust_bundle_pem: bytes) -> RevocationList:
    """Parse ``pem`` and check it is signed by a CA in ``trust_bundle_pem`` (raises
    IdentityError if not; a success for the same bytes is answered from a cache)."""
    return _checked_crl(bytes(pem), bytes(trust_bundle_pem))


@functools.lru_cache(maxsize=CRL_CACHE_SIZE)
def _checked_crl(pem: bytes, trust_bundle_pem: bytes) -> RevocationList:
    if len(pem) > MAX_PEM_BYTES:
        raise IdentityError(f"CRL larger than {MAX_PEM_BYTES} bytes")
    try:
        crl = x509.load_pem_x509_crl(pem)
    except ValueError as exc:
        raise IdentityError(f"cannot parse CRL: {exc}") from None
    anchors = [c for c in load_certs(trust_bundle_pem, "trust bundle") if c.subject == crl.issuer]
    if not anchors:
        raise IdentityError(f"CRL issuer {crl.issuer.rfc4514_string()} is not in the trust bundle")
    if not any(_signed_by(crl, ca) for ca in anchors):
        raise IdentityError("CRL signature does not verify under the trusted CA")
    if len(crl) > MAX_CRL_ENTRIES:
        raise IdentityError(f"CRL has {len(crl)} entries (max {MAX_CRL_ENTRIES})")
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        number = 0
    return RevocationList(
        issuer=crl.issuer,
        number=number,
        last_update=crl.last_update_utc,
        next_update=crl.next_update_utc,
        revoked=frozenset(r.serial_number for r in crl),
        pem=pem,
    )


def _signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    try:
        return crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
