"""SPIFFE IDs as pqcnet uses them: ``spiffe://<trust-domain>/<tenant>/<role>/<node-id>``.

A node's identity *is* this URI: it sits in the URI SAN of its certificate and every
authorization decision (which peers a sentry accepts, which roles a CA will sign)
is made on its parsed parts, never on a string prefix. Patterns are globbed per
path segment so ``spiffe://td/acme/sentry/*`` can never match
``spiffe://td/acme/sentry/x/y`` or a different trust domain.

Any path shape the SPIFFE spec allows is accepted (``spiffe://td/ns/default/sa/web``):
such an ID keeps its ``path``; its tenant and role are empty — so every tenant- or
role-based policy refuses it — until a configured :class:`SpiffeLayout` for its trust
domain says where they are (``spiffe://td/ns/{tenant}/sa/{node}`` with role
``sidecar``). :func:`apply_layouts` does the extraction; QSTP applies the layouts of
its ``TlsPolicy`` to every verified peer. The three-segment shape needs no layout.
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


#: most path segments a SPIFFE ID may have here (the 2048-byte bound allows ~1000)
MAX_PATH_SEGMENTS = 32


def _check_segment(what: str, seg: str) -> None:
    if not _SEGMENT.match(seg) or seg in (".", ".."):
        raise IdentityError(f"invalid {what} {seg!r} in SPIFFE ID (letters, digits, . _ -)")


@dataclass(frozen=True, slots=True, order=True)
class SpiffeId:
    """A parsed pqcnet SPIFFE ID. ``str(x)`` gives the canonical URI.

    ``path`` is set for IDs of another shape than ``tenant/role/node``: it is the ID's
    path, and ``tenant``/``role`` are what a :class:`SpiffeLayout` extracted (empty when
    none did); ``node_id`` defaults to the last segment.
    """

    trust_domain: str
    tenant: str
    role: str
    node_id: str
    path: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _TRUST_DOMAIN.match(self.trust_domain):
            raise IdentityError(
                f"invalid trust domain {self.trust_domain!r} (lowercase letters, digits, . _ -)"
            )
        if self.path:
            if len(self.path) > MAX_PATH_SEGMENTS:
                raise IdentityError(f"SPIFFE ID has more than {MAX_PATH_SEGMENTS} segments")
            for seg in self.path:
                _check_segment("path segment", seg)
            for name, seg in (("tenant", self.tenant), ("role", self.role),
                              ("node id", self.node_id)):
                if seg:
                    _check_segment(name, seg)
            return
        for name, seg in (("tenant", self.tenant), ("role", self.role), ("node id", self.node_id)):
            _check_segment(name, seg)

    @classmethod
    def parse(cls, value: str) -> SpiffeId:
        """Parse a SPIFFE ID of any spec-allowed path shape; anything else raises
        :class:`IdentityError`. ``spiffe://td/tenant/role/node`` fills the three parts;
        another shape keeps its ``path`` (see :func:`apply_layouts`)."""
        if not isinstance(value, str):
            raise IdentityError(f"SPIFFE ID must be a string, got {type(value).__name__}")
        if len(value) > MAX_SPIFFE_ID_LEN:
            raise IdentityError(f"SPIFFE ID longer than {MAX_SPIFFE_ID_LEN} characters")
        if not value.startswith(SCHEME):
            raise IdentityError(f"not a SPIFFE ID (must start with {SCHEME}): {value!r}")
        parts = value[len(SCHEME) :].split("/")
        if len(parts) < 2 or any(p == "" for p in parts[1:]):
            raise IdentityError(
                f"SPIFFE ID needs a path of non-empty segments after the trust domain "
                f"(spiffe://<trust-domain>/<tenant>/<role>/<node-id> or any other "
                f"spec shape): {value!r}")
        if len(parts) == 4:
            return cls(parts[0], parts[1], parts[2], parts[3])
        return cls(parts[0], "", "", parts[-1], tuple(parts[1:]))

    @property
    def segments(self) -> tuple[str, ...]:
        """The path segments (``(tenant, role, node_id)`` for the three-segment shape)."""
        return self.path or (self.tenant, self.role, self.node_id)

    def __str__(self) -> str:
        return f"{SCHEME}{self.trust_domain}/" + "/".join(self.segments)

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
    if len(parts) < 2 or len(parts) > MAX_PATH_SEGMENTS + 1:
        raise IdentityError(
            f"peer pattern must be spiffe://<trust-domain>/<segment>[/<segment>...] "
            f"(e.g. tenant/role/node): {pattern!r}"
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
    values = spiffe_id.segments
    if len(parts) != len(values) + 1 or parts[0] != spiffe_id.trust_domain:
        return False
    return all(fnmatch.fnmatchcase(v, p) for p, v in zip(parts[1:], values))


_PLACEHOLDERS = {"{tenant}": "tenant", "{role}": "role", "{node}": "node_id"}


@dataclass(frozen=True, slots=True)
class SpiffeLayout:
    """Where tenant, role and node sit in the SPIFFE IDs of one trust domain.

    Built from a template URI whose segments are literals, per-segment globs or the
    placeholders ``{tenant}``, ``{role}``, ``{node}``; ``role`` (and ``tenant``) give a
    fixed value when the template has no placeholder for it::

        SpiffeLayout.of("spiffe://corp.example/ns/{tenant}/sa/{node}", role="sidecar")
    """

    trust_domain: str
    template: tuple[str, ...]
    role: str = ""
    tenant: str = ""

    @classmethod
    def of(cls, template: str, *, role: str = "", tenant: str = "") -> SpiffeLayout:
        """Parse and validate a template URI (:class:`IdentityError` on a mistake)."""
        if not template.startswith(SCHEME):
            raise IdentityError(f"SPIFFE layout must be a spiffe:// template: {template!r}")
        parts = template[len(SCHEME):].split("/")
        if len(parts) < 2 or not _TRUST_DOMAIN.match(parts[0]):
            raise IdentityError(f"SPIFFE layout needs a literal trust domain and a path: "
                                f"{template!r}")
        segs = tuple(parts[1:])
        for seg in segs:
            if seg not in _PLACEHOLDERS and not _PATTERN_SEGMENT.match(seg):
                raise IdentityError(f"invalid segment {seg!r} in SPIFFE layout {template!r}")
        named = {_PLACEHOLDERS[s] for s in segs if s in _PLACEHOLDERS}
        if "tenant" not in named and not tenant:
            raise IdentityError(f"SPIFFE layout {template!r} needs {{tenant}} or a fixed tenant")
        if "role" not in named and not role:
            raise IdentityError(f"SPIFFE layout {template!r} needs {{role}} or a fixed role")
        for what, fixed in (("tenant", tenant), ("role", role)):
            if fixed:
                _check_segment(what, fixed)
        return cls(parts[0], segs, role, tenant)

    @property
    def uri(self) -> str:
        """The template as written (``spiffe://td/ns/{tenant}/sa/{node}``)."""
        return f"{SCHEME}{self.trust_domain}/" + "/".join(self.template)

    def admits_pattern(self, pattern: str, role: str) -> bool:
        """True when IDs matching the per-segment glob ``pattern`` can fit this layout
        with role ``role`` (an enrollment token's binding; the ID itself is checked with
        :meth:`extract` when the token is redeemed)."""
        if not pattern.startswith(SCHEME):
            return False
        parts = pattern[len(SCHEME):].split("/")
        if parts[0] != self.trust_domain or len(parts) - 1 != len(self.template):
            return False
        if self.role and self.role != role:
            return False
        for t, p in zip(self.template, parts[1:]):
            if t == "{role}":
                if not fnmatch.fnmatchcase(role, p):
                    return False
            elif t not in _PLACEHOLDERS and not (
                    fnmatch.fnmatchcase(p, t) or fnmatch.fnmatchcase(t, p)):
                return False
        return True

    def extract(self, sid: SpiffeId) -> SpiffeId | None:
        """``sid`` with tenant/role/node from this layout, or None if it does not fit."""
        segs = sid.segments
        if sid.trust_domain != self.trust_domain or len(segs) != len(self.template):
            return None
        got = {"tenant": self.tenant, "role": self.role, "node_id": segs[-1]}
        for t, v in zip(self.template, segs):
            if t in _PLACEHOLDERS:
                got[_PLACEHOLDERS[t]] = v
            elif not fnmatch.fnmatchcase(v, t):
                return None
        return SpiffeId(sid.trust_domain, got["tenant"], got["role"], got["node_id"], segs)


def apply_layouts(sid: SpiffeId, layouts: tuple[SpiffeLayout, ...]) -> SpiffeId:
    """``sid`` read through the first layout that fits it (unchanged when none does)."""
    for layout in layouts:
        got = layout.extract(sid)
        if got is not None:
            return got
    return sid
