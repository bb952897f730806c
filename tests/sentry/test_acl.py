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
