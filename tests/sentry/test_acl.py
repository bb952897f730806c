"""ACL patterns: SPIFFE globs per segment, method globs per path segment."""

from __future__ import annotations

import pytest

from pqcnet.identity.spiffe import SpiffeId
from pqcnet.sentry.acl import AclPolicy, matches, method_key
from pqcnet.sentry.errors import Denied, SentryConfigError

ALICE = SpiffeId.parse("spiffe://pqcnet.test/acme/sidecar/n1")
EVE = SpiffeId.parse("spiffe://other.test/acme/sidecar/n1")


def test_method_globs() -> None:
    assert matches("GET /status", "GET /status")
    assert not matches("GET /status", "GET /status/x")
    assert matches("POST /rpc/*", "POST /rpc/eth")
    assert not matches("POST /rpc/*", "POST /rpc/eth/x")
    assert matches("POST /rpc/**", "POST /rpc/eth/x")
    assert matches("/pqcnet.echo.Echo/*", "/pqcnet.echo.Echo/Say")
    assert method_key("http", "get", "/status?x=1") == "GET /status"
    assert method_key("tcp", "", "raw") == "TCP raw"


def test_policy() -> None:
    acl = AclPolicy.of(["spiffe://pqcnet.test/acme/sidecar/*"], ["GET /status", "TCP raw"])
    acl.check(ALICE, "GET /status")
    with pytest.raises(Denied, match="allow_from"):
        acl.check(EVE, "GET /status")
    with pytest.raises(Denied, match="not allowed"):
        acl.check(ALICE, "POST /status")
    with pytest.raises(Denied):
        AclPolicy.of([], []).check(ALICE, "GET /status")
    with pytest.raises(Denied, match="namespace"):
        AclPolicy.check_tenant("globex", "acme-rpc", ["acme"])
    with pytest.raises(SentryConfigError):
        AclPolicy.of(["spiffe://*/acme/x/y"], [])


def test_per_tenant_rules_first_match_allow_and_deny() -> None:
    from pqcnet._util.schema import validate
    from pqcnet.identity.policy import RuleSpec

    def rules(raw: list[dict[str, object]]) -> list[RuleSpec]:
        return [validate(RuleSpec, r, ValueError) for r in raw]

    acl = AclPolicy.from_rules({
        "acme": rules([
            {"action": "deny", "from": ["spiffe://pqcnet.test/acme/sidecar/legacy-*"],
             "methods": ["**"]},
            {"from": ["spiffe://pqcnet.test/acme/sidecar/*"], "methods": ["POST /rpc/*"]}]),
        "*": rules([{"from": ["spiffe://pqcnet.test/*/sidecar/*"], "methods": ["GET /status"]}]),
    })
    acl.check(ALICE, "POST /rpc/x", "acme")
    acl.check(ALICE, "GET /status", "acme")  # from the "*" list
    legacy = SpiffeId("pqcnet.test", "acme", "sidecar", "legacy-1")
    with pytest.raises(Denied, match=r"acme\[0\] \(deny\)"):
        acl.check(legacy, "POST /rpc/x", "acme")
    with pytest.raises(Denied, match="no rule allows it"):
        acl.check(ALICE, "POST /admin", "acme")
    globex = SpiffeId("pqcnet.test", "globex", "sidecar", "g1")
    with pytest.raises(Denied):  # acme's rules are acme's: globex only gets the "*" list
        acl.check(globex, "POST /rpc/x", "globex")
    acl.check(globex, "GET /status", "globex")
    with pytest.raises(SentryConfigError, match="channels"):
        AclPolicy.from_rules({"acme": rules([{"from": ["spiffe://pqcnet.test/a/b/c"],
                                              "methods": ["**"], "channels": ["x"]}])})


def test_config_forms_and_the_migration_error() -> None:
    from pqcnet.sentry.schema import AclSpec

    AclSpec(allow_from=["spiffe://pqcnet.test/a/b/c"], allow_methods=["**"])  # older form
    AclSpec.model_validate({"rules": {"*": [{"from": ["spiffe://pqcnet.test/a/b/c"],
                                             "methods": ["**"]}]}})
    with pytest.raises(ValueError, match="to migrate"):
        AclSpec.model_validate({"allow_from": ["spiffe://pqcnet.test/a/b/c"],
                                "allow_methods": ["**"], "rules": {}})
    with pytest.raises(ValueError, match="needs both"):
        AclSpec.model_validate({"allow_from": ["spiffe://pqcnet.test/a/b/c"]})
    with pytest.raises(ValueError, match="required"):
        AclSpec.model_validate({})
