"""Errors of node identity: certificates, the CA, CSRs, CRLs and key stores::

    IdentityError
    ├── PolicyViolation        a CSR / issuance / peer falls outside the policy
    └── KeyStoreError          a key store cannot load or store a key
        ├── HsmError           the PKCS#11 token refused (no token, wrong PIN, no KEK, ...)
        └── ShareError         Shamir shares cannot give the key
            ├── NotEnoughShares     fewer valid shares than the threshold
            └── ShareTampered       a share fails its integrity checks
"""

from __future__ import annotations

from pqcnet.errors import PqcnetError

__all__ = [
    "HsmError",
    "IdentityError",
    "KeyStoreError",
    "NotEnoughShares",
    "PassphraseRequired",
    "PolicyViolation",
    "ShareError",
    "ShareTampered",
]


class IdentityError(PqcnetError):
    """Certificates, CA, CSRs, CRLs or the key store."""


class PassphraseRequired(IdentityError):
    """A key file is encrypted and no passphrase was given (callers name where to set one)."""


class PolicyViolation(IdentityError):
    """A request (CSR, issuance, peer identity) falls outside the configured policy."""


class KeyStoreError(IdentityError):
    """A key store (file, PKCS#11, Shamir) cannot load or store a key."""


class HsmError(KeyStoreError):
    """The PKCS#11 module or token refused: missing token, wrong PIN, missing KEK, bad blob."""


class ShareError(KeyStoreError):
    """Shamir shares cannot be split or combined."""


class NotEnoughShares(ShareError):
    """Fewer valid shares than the threshold were available."""


class ShareTampered(ShareError):
    """A share fails its integrity checks (manifest digest, SLIP-39 checksum or digest,
    or the combined key does not match the expected public key)."""
