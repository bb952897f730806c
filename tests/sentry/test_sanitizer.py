"""IdentitySanitizer: the output is exactly the policy's transformation (property tests)."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pqcnet.sentry.errors import SentryConfigError, WireError
from pqcnet.sentry.sanitizer import Action, SanitizerPolicy, parse_policy

KEY = b"k" * 32
names = st.sampled_from(["x-forwarded-for", "X-User-Id", "x-wallet", "accept", "x-trace",
                         "X-Real-IP", "user-agent"])
values = st.text(max_size=40)
actions = st.one_of(st.just(Action("strip")), st.just(Action("hash")),
                    st.builds(lambda v: Action("replace", v), values))


def expected_value(action: Action, value: str) -> str | None:
    if action.kind == "strip":
        return None
    if action.kind == "replace":
        return action.value
    mac = hmac.new(KEY, value.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()
    return "hmac256:" + mac


@given(st.lists(st.tuples(names, values), max_size=12),
       st.dictionaries(names, actions, max_size=5))
def test_headers_get_exactly_the_policy(headers: list[tuple[str, str]],
                                        rules: dict[str, Action]) -> None:
    policy = SanitizerPolicy(KEY, headers=rules)
    lowered = {k.lower(): v for k, v in rules.items()}
    want = []
    for name, value in headers:
        action = lowered.get(name.lower())
        if action is None:
            want.append((name, value))
        else:
            new = expected_value(action, value)
            if new is not None:
                want.append((name, new))
    assert policy.sanitize_headers(headers) == want


fields = st.sampled_from(["ip", "user_id", "wallet", "method", "id"])
json_values = st.one_of(st.text(max_size=20), st.integers(), st.booleans(), st.none())


@given(st.dictionaries(fields, json_values, max_size=5),
       st.dictionaries(fields, json_values, max_size=5),
       st.dictionaries(fields, actions, max_size=3),
       st.booleans())
def test_json_fields_get_exactly_the_policy(top: dict[str, object], nested: dict[str, object],
                                            rules: dict[str, Action], batch: bool) -> None:
    # rules apply at top level and inside "params"
    policy = SanitizerPolicy(KEY, json_fields={**rules,
                                               **{f"params.{k}": a for k, a in rules.items()}})
    doc = {**top, "params": nested}
    body = json.dumps([doc, doc] if batch else doc).encode()

    def model(d: dict[str, object]) -> dict[str, object]:
        out = dict(d)
        for k, action in rules.items():
            if k in out:
                old = out[k]
                text = old if isinstance(old, str) else json.dumps(old, sort_keys=True)
                new = expected_value(action, text)
                if new is None:
                    del out[k]
                else:
                    out[k] = new
        return out

    one = {**model(top), "params": model(nested)}
    got = json.loads(policy.sanitize_body(body))
    assert got == ([one, one] if batch else one)


def test_hash_is_keyed() -> None:
    a = SanitizerPolicy(b"a" * 16).keyed_hash("10.0.0.1")
    b = SanitizerPolicy(b"b" * 16).keyed_hash("10.0.0.1")
    assert a != b and a.startswith("hmac256:")
    assert a != "hmac256:" + hashlib.sha256(b"10.0.0.1").hexdigest()


def test_non_json_body_is_refused_when_json_rules_exist() -> None:
    policy = SanitizerPolicy(KEY, json_fields={"ip": Action("strip")})
    with pytest.raises(WireError):
        policy.sanitize_body(b"ip=1.2.3.4")
    assert SanitizerPolicy(KEY).sanitize_body(b"ip=1.2.3.4") == b"ip=1.2.3.4"
    deep = b"[" * 100 + b"]" * 100
    with pytest.raises(WireError):
        policy.sanitize_body(deep)


def test_digest_changes_with_rules_and_key_and_parse_errors() -> None:
    p1 = parse_policy(KEY, {"headers": {"x-ip": "hash"}})
    p2 = parse_policy(KEY, {"headers": {"x-ip": "strip"}})
    p3 = parse_policy(b"z" * 32, {"headers": {"x-ip": "hash"}})
    assert len({p1.digest, p2.digest, p3.digest}) == 3
    assert parse_policy(KEY, {"headers": {"X-IP": "hash"}}).digest == p1.digest
    with pytest.raises(SentryConfigError):
        parse_policy(KEY, {"headers": {"x": "encrypt"}})
    with pytest.raises(SentryConfigError):
        parse_policy(KEY, {"heders": {}})
    with pytest.raises(SentryConfigError):
        SanitizerPolicy(b"short")
