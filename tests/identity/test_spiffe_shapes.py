"""Issue 12 §4: SPIFFE IDs of any spec-allowed path shape under a trust domain, with
tenant/role extraction configured (SpiffeLayout), not hard-wired."""

from __future__ import annotations

import pytest

from pqcnet.identity import dev_identities
from pqcnet.identity.errors import IdentityError
from pqcnet.identity.policy import PrincipalPolicy, PrincipalRule
from pqcnet.identity.spiffe import SpiffeId, SpiffeLayout, apply_layouts, spiffe_matches

K8S = "spiffe://corp.test/ns/acme/sa/web"


def test_other_shapes_parse_with_no_tenant_until_a_layout_says() -> None:
    sid = SpiffeId.parse(K8S)
    assert str(sid) == K8S and sid.segments == ("ns", "acme", "sa", "web")
    assert (sid.tenant, sid.role, sid.node_id) == ("", "", "web")
    assert str(SpiffeId.parse("spiffe://corp.test/web")) == "spiffe://corp.test/web"
    # tenant-based policy fails closed for an ID nobody said how to read
    own = PrincipalPolicy({}, frozenset({"publish"}))
    assert not own.allows("acme", sid, "publish", "c")
    layout = SpiffeLayout.of("spiffe://corp.test/ns/{tenant}/sa/{node}", role="sidecar")
    got = apply_layouts(sid, (layout,))
    assert (got.tenant, got.role, got.node_id, str(got)) == ("acme", "sidecar", "web", K8S)
    assert own.allows("acme", got, "publish", "c")
    # another trust domain or shape is left alone
    other = SpiffeId.parse("spiffe://else.test/ns/acme/sa/web")
    assert apply_layouts(other, (layout,)) == other
    assert apply_layouts(SpiffeId.parse("spiffe://corp.test/ns/acme"), (layout,)).tenant == ""


def test_patterns_match_per_segment_on_any_shape() -> None:
    sid = SpiffeId.parse(K8S)
    assert spiffe_matches("spiffe://corp.test/ns/*/sa/web", sid)
    assert not spiffe_matches("spiffe://corp.test/ns/*/sa", sid)
    assert not spiffe_matches("spiffe://corp.test/*/*/*", sid)
    rule = PrincipalRule.allow(["spiffe://corp.test/ns/acme/sa/*"], ["POST /rpc/*"])
    assert PrincipalPolicy({"*": (rule,)}).allows("x", sid, "POST /rpc/a")


def test_layout_mistakes_are_typed() -> None:
    for bad, kw in (("https://corp.test/{tenant}", {}),
                    ("spiffe://corp.test/ns/{tenant}/sa/{node}", {}),  # no role
                    ("spiffe://corp.test/{node}", {"role": "r"}),       # no tenant
                    ("spiffe://Corp/{tenant}/{role}", {}),
                    ("spiffe://corp.test/a b/{tenant}", {"role": "r"})):
        with pytest.raises(IdentityError):
            SpiffeLayout.of(bad, **kw)


def test_a_ca_issues_and_qstp_carries_another_shape() -> None:
    _ca, (node,) = dev_identities("corp.test", K8S)
    assert str(node.spiffe_id) == K8S and node.spiffe_id.path
