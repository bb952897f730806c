"""Errors of node identity: certificates, the CA, CSRs, CRLs and key stores."""

from __future__ import annotations

from pqcnet.errors import PqcnetError

__all__ = ["IdentityError", "PassphraseRequired", "PolicyViolation"]


class IdentityError(PqcnetError):
    """Certificates, CA, CSRs, CRLs or the key store."""


class PassphraseRequired(IdentityError):
    """A key file is encrypted and no passphrase was given (callers name where to set one)."""


class PolicyViolation(IdentityError):
    """A request (CSR, issuance, peer identity) falls outside the configured policy."""
