"""ACL: who (SPIFFE ID of the tunnel peer) may call what (method), in which tenant.

``allow_from`` entries are SPIFFE IDs or per-segment SPIFFE globs, matched by
:func:`pqcnet.identity.spiffe.spiffe_matches` (the trust domain is always literal).
``allow_methods`` entries are segment-aware globs so a wildcard cannot silently widen
across a path boundary: ``*`` matches within one ``/``-separated segment, ``**``
matches any rest (including ``/``). Exact strings match exactly. Examples::

    allow_from:    spiffe://pqcnet.test/acme/sidecar/*      any acme sidecar node
                   spiffe://pqcnet.test/*/*/*               anyone in the trust domain
    allow_methods: GET /status      POST /rpc/*      /pqcnet.echo.Echo/Say
                   /pqcnet.echo.Echo/*               TCP tcp-echo

The *method key* of a request is ``"<HTTP METHOD> <path without query>"`` for HTTP,
the gRPC path for gRPC, and ``"TCP <backend>"`` for raw TCP streams. Tenant namespace
isolation (a tenant's requests only reach backends serving that tenant) is checked by
:meth:`AclPolicy.check_tenant`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from pqcnet.identity.errors import IdentityError
from pqcnet.identity.spiffe import SpiffeId, spiffe_matches, validate_pattern
from pqcnet.sentry.errors import Denied, SentryConfigError


@functools.lru_cache(maxsize=4096)
def _compile(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z", re.DOTALL)


def matches(pattern: str, value: str) -> bool:
    """Segment-aware glob match (see module docstring)."""
    if "*" not in pattern:
        return pattern == value
    return _compile(pattern).match(value) is not None


def method_key(kind: str, method: str, path: str) -> str:
    """The string ACL method patterns are matched against."""
    if kind == "http":
        return f"{method.upper()} {path.split('?', 1)[0]}"
    if kind == "tcp":
        return f"TCP {path}"
    return path


#: Bound on remembered allowed (peer, method) pairs; the memo is dropped when full.
ACL_MEMO_MAX = 4096


@dataclass(frozen=True, slots=True)
class AclPolicy:
    """One sentry's ACL. Empty lists deny everything (fail closed)."""

    allow_from: tuple[str, ...]
    allow_methods: tuple[str, ...]
    #: (peer, method key) pairs already allowed; glob matching per request showed up
    #: in profiles. A reload builds a new AclPolicy, so the memo never outlives it.
    _allowed: dict[tuple[SpiffeId, str], bool] = field(default_factory=dict, compare=False,
                                                  repr=False)

    @classmethod
    def of(cls, allow_from: Iterable[str], allow_methods: Iterable[str]) -> AclPolicy:
        """Build from any iterables, validating the SPIFFE patterns."""
        try:
            peers = tuple(validate_pattern(p) for p in allow_from)
        except IdentityError as exc:
            raise SentryConfigError(f"acl.allow_from: {exc}") from None
        return cls(peers, tuple(allow_methods))

    def check(self, peer: SpiffeId, key: str) -> None:
        """Raise :class:`Denied` unless ``peer`` may call ``key``."""
        memo = (peer, key)
        if memo in self._allowed:
            return
        if not any(spiffe_matches(p, peer) for p in self.allow_from):
            raise Denied(f"peer {peer} is not in allow_from")
        if not any(matches(p, key) for p in self.allow_methods):
            raise Denied(f"method {key!r} is not allowed")
        if len(self._allowed) >= ACL_MEMO_MAX:
            self._allowed.clear()
        self._allowed[memo] = True

    @staticmethod
    def check_tenant(tenant: str, backend: str, backend_tenants: Iterable[str]) -> None:
        """Raise :class:`Denied` if ``backend`` does not serve ``tenant``'s namespace."""
        if tenant not in backend_tenants:
            raise Denied(f"backend {backend!r} is not in tenant {tenant!r}'s namespace")
