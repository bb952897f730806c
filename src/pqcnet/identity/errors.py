"""Errors of node identity: certificates, the CA, CSRs, CRLs and key stores."""

from __future__ import annotations

from pqcnet.errors import PqcnetError

__all__ = ["IdentityError", "PolicyViolation"]


class IdentityError(PqcnetError):
    """Certificates, CA, CSRs, CRLs or the key store."""


class PolicyViolation(IdentityError):
    """A request (CSR, issuance, peer identity) falls outside the configured policy."""
