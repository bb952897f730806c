"""The shared principal policy: first match, allow and deny, per tenant, own tenant."""

from __future__ import annotations

import pytest

from pqcnet._util.schema import validate
from pqcnet.identity.errors import IdentityError
from pqcnet.identity.policy import PrincipalPolicy, PrincipalRule, RuleSpec, matches
from pqcnet.identity.spiffe import SpiffeId

TD = "pqcnet.test"


def sid(tenant: str, role: str = "publisher", node: str = "n1") -> SpiffeId:
    return SpiffeId(TD, tenant, role, node)


def test_globs_are_segment_aware() -> None:
    assert matches("POST /rpc/*", "POST /rpc/x")
    assert not matches("POST /rpc/*", "POST /rpc/x/y")
    assert matches("POST /rpc/**", "POST /rpc/x/y")
    assert matches("**", "anything / at all")
    assert matches("orders", "orders") and not matches("orders", "orders2")


def test_first_match_wins_deny_before_allow() -> None:
    policy = PrincipalPolicy({"acme": (
        PrincipalRule.deny([f"spiffe://{TD}/acme/sidecar/legacy-*"], ["**"]),
        PrincipalRule.allow([f"spiffe://{TD}/acme/sidecar/*"], ["POST /rpc/*"]),
    )})
    assert policy.allows("acme", sid("acme", "sidecar", "web"), "POST /rpc/x")
    denied = policy.decide("acme", sid("acme", "sidecar", "legacy-1"), "POST /rpc/x")
    assert not denied.allowed and "acme[0]" in denied.reason
    assert not policy.allows("acme", sid("acme", "sidecar", "web"), "GET /status")
    # no rule: denied (fail closed), whatever the tenant
    assert not PrincipalPolicy().allows("acme", sid("acme"), "publish", "c")


def test_rules_are_per_tenant_then_any_tenant() -> None:
    policy = PrincipalPolicy({
        "acme": (PrincipalRule.allow([f"spiffe://{TD}/partner/*/*"], ["publish"], ["orders"]),),
        "*": (PrincipalRule.allow([f"spiffe://{TD}/ops/*/*"], ["subscribe"]),),
    })
    assert policy.allows("acme", sid("partner"), "publish", "orders")
    assert not policy.allows("acme", sid("partner"), "publish", "payroll")
    assert not policy.allows("other", sid("partner"), "publish", "orders")
    assert policy.allows("other", sid("ops"), "subscribe", "x")


def test_own_tenant_default_and_a_deny_that_restricts_it() -> None:
    own = frozenset({"publish", "subscribe"})
    policy = PrincipalPolicy({}, own)
    assert policy.allows("acme", sid("acme"), "publish", "orders")
    assert not policy.allows("acme", sid("mallory"), "publish", "orders")
    assert not policy.allows("acme", sid("acme"), "delete", "orders")
    strict = PrincipalPolicy({"acme": (
        PrincipalRule.deny([f"spiffe://{TD}/acme/*/*"], ["publish"], ["audit"]),)}, own)
    assert not strict.allows("acme", sid("acme"), "publish", "audit")
    assert strict.allows("acme", sid("acme"), "publish", "orders")


def test_trust_domain_is_literal() -> None:
    policy = PrincipalPolicy({"acme": (PrincipalRule.allow([f"spiffe://{TD}/*/*/*"], ["**"]),)})
    assert not policy.allows("acme", SpiffeId("evil.test", "acme", "publisher", "n"), "publish")


def test_rule_spec_validates_and_compiles() -> None:
    spec = validate(RuleSpec, {"action": "deny", "from": [f"spiffe://{TD}/a/*/*"],
                               "methods": ["publish"]}, ValueError)
    rule = PrincipalRule.from_spec(spec)
    assert rule.action == "deny" and rule.channels == ("**",)
    with pytest.raises(ValueError, match="from"):
        validate(RuleSpec, {"from": ["https://x"], "methods": ["**"]}, ValueError)
    with pytest.raises(ValueError, match="methods"):
        validate(RuleSpec, {"from": [f"spiffe://{TD}/a/*/*"], "methods": []}, ValueError)
    with pytest.raises(ValueError, match="action"):
        validate(RuleSpec, {"action": "maybe", "from": [f"spiffe://{TD}/a/*/*"],
                            "methods": ["**"]}, ValueError)
    with pytest.raises(IdentityError):
        PrincipalRule.allow(["spiffe://*/a/b/c"], ["**"])
