"""Principal policy: who (an authenticated SPIFFE ID) may do what, per tenant.

One module decides for every role that authorizes a peer by its certificate: the
sentry's per-principal ACL (``what`` = the request's method key, ``POST /rpc/x``) and
the relayer's data-plane authorization (``what`` = ``publish`` / ``subscribe``, on a
customer's ``channel``). The rules are Istio AuthorizationPolicy-style, read top to
bottom, **first match wins**, and anything no rule matches is denied::

    # one tenant's (or customer's) rule list
    - action: deny                                  # a deny placed first wins
      from: [spiffe://pqcnet.test/acme/sidecar/legacy-*]
      methods: ["**"]
    - action: allow
      from: [spiffe://pqcnet.test/acme/sidecar/*]
      methods: ["GET /status", "POST /rpc/*"]
    - action: allow                                 # relayer: a grant to another tenant
      from: [spiffe://pqcnet.test/partner/publisher/*]
      methods: [publish]
      channels: [orders, "invoices-*"]

Matching:

* ``from`` entries are SPIFFE IDs or per-segment globs
  (:func:`pqcnet.identity.spiffe.spiffe_matches`: the trust domain is literal and a
  ``*`` never crosses a ``/``);
* ``methods`` and ``channels`` entries are segment-aware globs (:func:`matches`): ``*``
  stays inside one ``/``-separated segment, ``**`` matches anything, other strings
  match exactly. ``channels`` left out means every channel.

Evaluation order for a decision in tenant ``T``: ``T``'s own list, then the ``"*"``
list (rules for every tenant), then the *own-tenant default* — a principal whose
tenant is ``T`` may do the methods in :attr:`PrincipalPolicy.own_tenant` (the
relayer's "a tenant is its own customer"; empty for the sentry) — then deny. A
``deny`` rule in ``T``'s list therefore also restricts ``T``'s own principals.

Policies are immutable: a reload builds a new one (validated first, so a bad file
never replaces a good policy) and swaps it in; the decision memo lives and dies with
its policy.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field, field_validator

from pqcnet._util.schema import Schema
from pqcnet.identity.errors import IdentityError
from pqcnet.identity.spiffe import SpiffeId, SpiffeLayout, spiffe_matches, validate_pattern

Effect = Literal["allow", "deny"]
#: the rule list that applies to every tenant (after the tenant's own)
ANY_TENANT = "*"
#: remembered decisions per policy (dropped when full); a memo entry is one
#: (tenant, principal, method, channel) tuple, so this bounds memory per policy
DECISION_MEMO_MAX = 8192
#: rules one tenant's list may hold (a policy is read top to bottom per decision)
MAX_RULES_PER_TENANT = 1024


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
    """Segment-aware glob: ``*`` within one ``/`` segment, ``**`` across; else exact."""
    if "*" not in pattern:
        return pattern == value
    return _compile(pattern).match(value) is not None


class RuleSpec(Schema):
    """One rule as written in a config file (``from`` is a Python keyword: ``from_``)."""

    action: Effect = "allow"
    """allow or deny; the first rule matching a request decides."""
    from_: list[str] = Field(alias="from", min_length=1)
    """SPIFFE IDs or per-segment SPIFFE globs of the principals this rule is about."""
    methods: list[str] = Field(min_length=1)
    """What they do: sentry method keys (``POST /rpc/*``, ``/pkg.Svc/*``, ``TCP name``),
    relayer ``publish`` / ``subscribe``; ``**`` means anything."""
    channels: list[str] = Field(default_factory=lambda: ["**"])
    """Relayer channels the rule covers (globs; default every channel)."""

    model_config = {**Schema.model_config, "populate_by_name": True}

    @field_validator("from_")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        for p in value:
            try:
                validate_pattern(p)
            except IdentityError as exc:
                raise ValueError(str(exc)) from None
        return value


class SpiffeLayoutSpec(Schema):
    """Where tenant, role and node sit in SPIFFE IDs of another shape (config form of
    :class:`~pqcnet.identity.spiffe.SpiffeLayout`)."""

    template: str
    """``spiffe://<trust-domain>/...`` with ``{tenant}``, ``{role}``, ``{node}``
    placeholders, literals and per-segment globs, e.g.
    ``spiffe://corp.example/ns/{tenant}/sa/{node}``."""
    role: str = ""
    """Fixed role when the template has no ``{role}``."""
    tenant: str = ""
    """Fixed tenant when the template has no ``{tenant}``."""

    @field_validator("template")
    @classmethod
    def _template(cls, value: str) -> str:
        if not value.startswith("spiffe://"):
            raise ValueError(f"must be a spiffe:// template, got {value!r}")
        return value

    def layout(self) -> SpiffeLayout:
        """The compiled layout (:class:`IdentityError` on a mistake)."""
        return SpiffeLayout.of(self.template, role=self.role, tenant=self.tenant)


def compile_layouts(specs: Iterable[SpiffeLayoutSpec], where: str = "spiffe_layouts"
                    ) -> tuple[SpiffeLayout, ...]:
    """Compile config layouts; a mistake raises :class:`IdentityError` naming ``where``."""
    out = []
    for i, spec in enumerate(specs):
        try:
            out.append(spec.layout())
        except IdentityError as exc:
            raise IdentityError(f"{where}[{i}]: {exc}") from None
    return tuple(out)


@dataclass(frozen=True, slots=True)
class PrincipalRule:
    """A compiled rule (see :class:`RuleSpec` for the fields)."""

    action: Effect
    principals: tuple[str, ...]
    methods: tuple[str, ...]
    channels: tuple[str, ...] = ("**",)

    @classmethod
    def allow(cls, principals: Iterable[str], methods: Iterable[str],
              channels: Iterable[str] = ("**",)) -> PrincipalRule:
        """An allow rule (patterns validated)."""
        return cls._of("allow", principals, methods, channels)

    @classmethod
    def deny(cls, principals: Iterable[str], methods: Iterable[str],
             channels: Iterable[str] = ("**",)) -> PrincipalRule:
        """A deny rule (patterns validated)."""
        return cls._of("deny", principals, methods, channels)

    @classmethod
    def _of(cls, action: Effect, principals: Iterable[str], methods: Iterable[str],
            channels: Iterable[str]) -> PrincipalRule:
        return cls(action, tuple(validate_pattern(p) for p in principals), tuple(methods),
                   tuple(channels))

    @classmethod
    def from_spec(cls, spec: RuleSpec) -> PrincipalRule:
        """Compile a validated :class:`RuleSpec`."""
        return cls(spec.action, tuple(spec.from_), tuple(spec.methods), tuple(spec.channels))

    def matches(self, principal: SpiffeId, method: str, channel: str) -> bool:
        """Whether this rule is about ``principal`` doing ``method`` on ``channel``."""
        return (any(matches(m, method) for m in self.methods)
                and any(matches(c, channel) for c in self.channels)
                and any(spiffe_matches(p, principal) for p in self.principals))


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer for one (tenant, principal, method, channel)."""

    allowed: bool
    #: which rule decided, for logs and refusal messages
    reason: str


@dataclass(frozen=True, slots=True)
class PrincipalPolicy:
    """Rule lists per tenant plus the own-tenant default (see the module docstring)."""

    rules: Mapping[str, tuple[PrincipalRule, ...]] = field(default_factory=dict)
    #: methods a principal may always do in its own tenant unless a rule says otherwise
    own_tenant: frozenset[str] = frozenset()
    _memo: dict[tuple[str, SpiffeId, str, str], Decision] = field(
        default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_specs(cls, specs: Mapping[str, Iterable[RuleSpec]], *,
                   own_tenant: Iterable[str] = ()) -> PrincipalPolicy:
        """Compile validated config rules."""
        rules = {t: tuple(PrincipalRule.from_spec(s) for s in lst) for t, lst in specs.items()}
        for tenant, lst in rules.items():
            if len(lst) > MAX_RULES_PER_TENANT:
                raise IdentityError(f"{len(lst)} rules for {tenant!r}; "
                                    f"max {MAX_RULES_PER_TENANT}")
        return cls(rules, frozenset(own_tenant))

    def decide(self, tenant: str, principal: SpiffeId, method: str,
               channel: str = "") -> Decision:
        """First matching rule of ``tenant``'s list, then ``"*"``'s, then the own-tenant
        default; deny when nothing matches."""
        key = (tenant, principal, method, channel)
        got = self._memo.get(key)
        if got is not None:
            return got
        decision = self._decide(tenant, principal, method, channel)
        if len(self._memo) >= DECISION_MEMO_MAX:
            self._memo.clear()
        self._memo[key] = decision
        return decision

    def _decide(self, tenant: str, principal: SpiffeId, method: str,
                channel: str) -> Decision:
        for scope in (tenant, ANY_TENANT):
            for i, rule in enumerate(self.rules.get(scope, ())):
                if rule.matches(principal, method, channel):
                    return Decision(rule.action == "allow",
                                    f"rule {scope}[{i}] ({rule.action})")
        if principal.tenant == tenant and method in self.own_tenant:
            return Decision(True, "own tenant")
        return Decision(False, "no rule allows it")

    def allows(self, tenant: str, principal: SpiffeId, method: str, channel: str = "") -> bool:
        """``decide(...).allowed``."""
        return self.decide(tenant, principal, method, channel).allowed


__all__ = [
    "ANY_TENANT",
    "DECISION_MEMO_MAX",
    "MAX_RULES_PER_TENANT",
    "Decision",
    "Effect",
    "PrincipalPolicy",
    "PrincipalRule",
    "RuleSpec",
    "SpiffeLayoutSpec",
    "compile_layouts",
    "matches",
]
