"""ACL: who (SPIFFE ID of the tunnel peer) may call what (method), per tenant.

Rules are the shared principal policy (:mod:`pqcnet.identity.policy`, the same kind
the relayer's data-plane authorization uses): per tenant (``*``: every tenant), read
top to bottom, first match wins, ``allow`` or ``deny``, nothing matching is denied::

    acl:
      rules:
        acme:
          - {action: deny,  from: ["spiffe://pqcnet.test/acme/sidecar/legacy-*"], methods: ["**"]}
          - {action: allow, from: ["spiffe://pqcnet.test/acme/sidecar/*"], methods: ["POST /rpc/*"]}
        "*":
          - {action: allow, from: ["spiffe://pqcnet.test/*/sidecar/*"], methods: ["GET /status"]}

The tenant a request is decided in is its authenticated tenant (the session
assertion's, which must be the tunnel peer's). ``from`` entries are SPIFFE IDs or
per-segment SPIFFE globs (the trust domain is always literal); ``methods`` entries
are segment-aware globs (``*`` within one ``/`` segment, ``**`` any rest). The
*method key* of a request is ``"<HTTP METHOD> <path without query>"`` for HTTP, the
gRPC path for gRPC, ``"TCP <backend>"`` for raw TCP streams and ``"WS <path without
query>"`` for a WebSocket (its own key: a rule allowing ``GET /feed`` does not allow
holding a pipe open on it). Examples::

    from:    spiffe://pqcnet.test/acme/sidecar/*      any acme sidecar node
             spiffe://pqcnet.test/*/*/*               anyone in the trust domain
    methods: GET /status      POST /rpc/*      /pqcnet.echo.Echo/Say
             /pqcnet.echo.Echo/*               TCP tcp-echo      WS /feed

The older form — ``allow_from`` + ``allow_methods``, one list for every tenant —
still loads: it is exactly one ``allow`` rule under ``*`` (and keeps its refusal
messages). Giving both forms is a configuration error naming the migration.
Tenant namespace isolation (a tenant's requests only reach backends serving that
tenant) is checked by :meth:`AclPolicy.check_tenant`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pqcnet.identity.errors import IdentityError
from pqcnet.identity.policy import (
    ANY_TENANT,
    PrincipalPolicy,
    PrincipalRule,
    RuleSpec,
    matches,
)
from pqcnet.identity.spiffe import SpiffeId, spiffe_matches, validate_pattern
from pqcnet.sentry.errors import Denied, SentryConfigError

__all__ = ["AclPolicy", "matches", "method_key"]


def method_key(kind: str, method: str, path: str) -> str:
    """The string ACL method patterns are matched against."""
    if kind == "http":
        return f"{method.upper()} {path.split('?', 1)[0]}"
    if kind == "tcp":
        return f"TCP {path}"
    if kind == "ws":  # a long-lived pipe: allowed by its own key, never by "GET /path"
        return f"WS {path.split('?', 1)[0]}"
    return path


@dataclass(frozen=True, slots=True)
class AclPolicy:
    """One sentry's ACL. No rule denies everything (fail closed). Decisions are
    memoised by the policy (bounded by :data:`pqcnet.identity.policy.DECISION_MEMO_MAX`);
    a reload builds a new AclPolicy, so the memo never outlives it."""

    policy: PrincipalPolicy
    #: built from the older allow_from/allow_methods keys (refusals say which missed)
    legacy: tuple[tuple[str, ...], tuple[str, ...]] | None = None

    @classmethod
    def of(cls, allow_from: Iterable[str], allow_methods: Iterable[str]) -> AclPolicy:
        """The older global form: one allow rule for every tenant (patterns validated)."""
        try:
            peers = tuple(validate_pattern(p) for p in allow_from)
        except IdentityError as exc:
            raise SentryConfigError(f"acl.allow_from: {exc}") from None
        methods = tuple(allow_methods)
        rules = ({ANY_TENANT: (PrincipalRule("allow", peers, methods),)}
                 if peers and methods else {})
        return cls(PrincipalPolicy(rules), (peers, methods))

    @classmethod
    def from_rules(cls, rules: Mapping[str, Iterable[RuleSpec]]) -> AclPolicy:
        """Per-tenant rule lists (validated :class:`RuleSpec`)."""
        for tenant, lst in rules.items():
            for i, spec in enumerate(lst):
                if spec.channels != ["**"]:
                    raise SentryConfigError(f"acl.rules.{tenant}[{i}].channels: channels are "
                                            "a relayer rule field; a sentry rule has methods")
        try:
            return cls(PrincipalPolicy.from_specs(rules))
        except IdentityError as exc:
            raise SentryConfigError(f"acl.rules: {exc}") from None

    def check(self, peer: SpiffeId, key: str, tenant: str | None = None) -> None:
        """Raise :class:`Denied` unless ``peer`` may call ``key`` in ``tenant`` (default:
        the peer's own tenant)."""
        scope = peer.tenant if tenant is None else tenant
        decision = self.policy.decide(scope, peer, key)
        if decision.allowed:
            return
        if self.legacy is not None:
            peers, _methods = self.legacy
            if not any(spiffe_matches(p, peer) for p in peers):
                raise Denied(f"peer {peer} is not in allow_from")
            raise Denied(f"method {key!r} is not allowed")
        raise Denied(f"method {key!r} is not allowed for {peer} in tenant {scope!r} "
                     f"({decision.reason})")

    @staticmethod
    def check_tenant(tenant: str, backend: str, backend_tenants: Iterable[str]) -> None:
        """Raise :class:`Denied` if ``backend`` does not serve ``tenant``'s namespace."""
        if tenant not in backend_tenants:
            raise Denied(f"backend {backend!r} is not in tenant {tenant!r}'s namespace")
