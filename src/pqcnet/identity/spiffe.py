"""SPIFFE IDs as pqcnet uses them: ``spiffe://<trust-domain>/<tenant>/<role>/<node-id>``.

A node's identity *is* this URI: it sits in the URI SAN of its certificate and every
authorization decision (which peers a sentry accepts, which roles a CA will sign)
is made on its parsed parts, never on a string prefix. Patterns are globbed per
path segment so ``spiffe://td/acme/sentry/*`` can never match
``spiffe://td/acme/sentry/x/y`` or a different trust domain.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from pqcnet.identity.errors import IdentityError

SCHEME = "spiffe://"
#: SPIFFE caps an ID at 2048 bytes; we keep the same bound so a hostile SAN cannot
#: make us hold arbitrarily long strings.
MAX_SPIFFE_ID_LEN = 2048
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]{1,255}$")
_SEGMENT = re.compile(r"^[A-Za-z0-9._-]{1,255}$")
_PATTERN_SEGMENT = re.compile(r"^[A-Za-z0-9._*?\[\]!-]{1,255}$")


@dataclass(frozen=True, slots=True, order=True)
class SpiffeId:
    """A parsed pqcnet SPIFFE ID. ``str(x)`` gives the canonical URI."""

    trust_domain: str
    tenant: str
    role: str
    node_id: str

    def __post_init__(self) -> None:
        if not _TRUST_DOMAIN.match(self.trust_domain):
            raise IdentityError(
                f"invalid trust domain {self.trust_domain!r} (lowercase letters, digits, . _ -)"
            )
        for name, seg in (("tenant", self.tenant), ("role", self.role), ("node id", self.node_id)):
            if not _SEGMENT.match(seg) or seg in (".", ".."):
                raise IdentityError(f"invalid {name} {seg!r} in SPIFFE ID (letters, digits, . _ -)")

    @classmethod
    def parse(cls, value: str) -> SpiffeId:
        """Parse ``spiffe://td/tenant/role/node``; anything else raises :class:`IdentityError`."""
        if not isinstance(value, str):
            raise IdentityError(f"SPIFFE ID must be a string, got {type(value).__name__}")
        if len(value) > MAX_SPIFFE_ID_LEN:
            raise IdentityError(f"SPIFFE ID longer than {MAX_SPIFFE_ID_LEN} characters")
        if not value.startswith(SCHEME):
            raise IdentityError(f"not a SPIFFE ID (must start with {SCHEME}): {value!r}")
        parts = value[len(SCHEME) :].split("/")
        if len(parts) != 4:
            raise IdentityError(
                f"SPIFFE ID must be spiffe://<trust-domain>/<tenant>/<role>/<node-id>: {value!r}"
            )
        return cls(*parts)

    def __str__(self) -> str:
        return f"{SCHEME}{self.trust_domain}/{self.tenant}/{self.role}/{self.node_id}"

    @property
    def trust_domain_id(self) -> str:
        """``spiffe://<trust-domain>``: the URI naming the trust domain (the CA's SAN)."""
        return f"{SCHEME}{self.trust_domain}"

    def matches(self, pattern: str) -> bool:
        """True when this ID equals ``pattern`` or matches it as a per-segment glob."""
        return spiffe_matches(pattern, self)


def validate_pattern(pattern: str) -> str:
    """Check an allowed-peer pattern is well formed; return it unchanged."""
    if not pattern.startswith(SCHEME) or len(pattern) > MAX_SPIFFE_ID_LEN:
        raise IdentityError(f"peer pattern must be a spiffe:// URI: {pattern!r}")
    parts = pattern[len(SCHEME) :].split("/")
    if len(parts) != 4:
        raise IdentityError(
            f"peer pattern must have 4 parts (trust domain, tenant, role, node): {pattern!r}"
        )
    if not _TRUST_DOMAIN.match(parts[0]):
        raise IdentityError(f"peer pattern trust domain must be literal: {pattern!r}")
    for seg in parts[1:]:
        if not _PATTERN_SEGMENT.match(seg):
            raise IdentityError(f"invalid segment {seg!r} in peer pattern {pattern!r}")
    return pattern


def spiffe_matches(pattern: str, spiffe_id: SpiffeId) -> bool:
    """Exact or glob match; ``*`` / ``?`` / ``[...]`` never cross a ``/``.

    The trust domain is always compared literally: a glob there would let a
    pattern meant for one mesh accept identities from another.
    """
    if pattern == str(spiffe_id):
        return True
    if not pattern.startswith(SCHEME):
        return False
    parts = pattern[len(SCHEME) :].split("/")
    if len(parts) != 4 or parts[0] != spiffe_id.trust_domain:
        return False
    values = (spiffe_id.tenant, spiffe_id.role, spiffe_id.node_id)
    return all(fnmatch.fnmatchcase(v, p) for p, v in zip(parts[1:], values))
