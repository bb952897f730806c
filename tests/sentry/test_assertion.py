"""Session assertions: every rejection reason is typed; the cache skips only the signature."""

from __future__ import annotations

import pytest

from pqcnet.crypto.pqc import SigningKey
from pqcnet.proto import sentry_pb2
from pqcnet.sentry import assertion as sa
from pqcnet.sentry.errors import (
    AssertionExpired,
    BadSignature,
    ChannelBindingMismatch,
    MalformedAssertion,
    UnknownIssuer,
    WrongTenant,
)

NOW = 1_800_000_000.0
CB = b"\x01" * 32


@pytest.fixture(scope="module")
def issuer() -> SigningKey:
    return SigningKey.from_seed(b"\x07" * 32)


def verifier(issuer: SigningKey) -> sa.AssertionVerifier:
    return sa.AssertionVerifier({"acme": [issuer.public_key]})


def mint(issuer: SigningKey, **kw: object) -> bytes:
    args: dict[str, object] = {"subject": "alice", "tenant": "acme", "channel_binding": CB,
                               "now": NOW, "ttl": 60.0}
    args.update(kw)
    return sa.issue(issuer, **args)  # type: ignore[arg-type]


def test_valid_assertion_roundtrips_through_header(issuer: SigningKey) -> None:
    raw = mint(issuer, scopes=["read", "write"])
    assert sa.from_header(sa.to_header(raw)) == raw
    a = verifier(issuer).verify(raw, tenant="acme", channel_binding=CB, now=NOW + 1)
    assert (a.subject, a.tenant, a.scopes) == ("alice", "acme", ("read", "write"))
    assert a.expires_at - a.issued_at == 60


def test_cache_hit_skips_signature_but_still_checks_claims(issuer: SigningKey) -> None:
    v = verifier(issuer)
    raw = mint(issuer)
    v.verify(raw, tenant="acme", channel_binding=CB, now=NOW)
    v.verify(raw, tenant="acme", channel_binding=CB, now=NOW + 1)
    assert (v.hits, v.misses) == (1, 1)
    with pytest.raises(ChannelBindingMismatch):
        v.verify(raw, tenant="acme", channel_binding=b"\x02" * 32, now=NOW + 2)
    with pytest.raises(AssertionExpired):
        v.verify(raw, tenant="acme", channel_binding=CB, now=NOW + 60)
    assert v.hits == 3
    assert v.evict_expired(NOW + 61) == 1 and v.cache_len == 0


def test_expired_and_future(issuer: SigningKey) -> None:
    v = verifier(issuer)
    with pytest.raises(AssertionExpired, match="expired"):
        v.verify(mint(issuer), tenant="acme", channel_binding=CB, now=NOW + 61)
    with pytest.raises(AssertionExpired, match="not yet valid"):
        v.verify(mint(issuer, now=NOW + 3600), tenant="acme", channel_binding=CB, now=NOW)
    with pytest.raises(AssertionExpired, match="lifetime"):
        v.verify(mint(issuer, ttl=10 * 86400.0), tenant="acme", channel_binding=CB, now=NOW)


def test_wrong_tenant_unknown_issuer_bad_signature(issuer: SigningKey) -> None:
    other = SigningKey.from_seed(b"\x08" * 32)
    v = sa.AssertionVerifier({"acme": [issuer.public_key], "globex": [other.public_key]})
    with pytest.raises(WrongTenant):
        v.verify(mint(other, tenant="globex"), tenant="acme", channel_binding=CB, now=NOW)
    with pytest.raises(UnknownIssuer):
        v.verify(mint(other), tenant="acme", channel_binding=CB, now=NOW)
    raw = mint(issuer)
    outer = sentry_pb2.SessionAssertion.FromString(raw)
    tampered = bytearray(outer.signature)
    tampered[10] ^= 1
    bad = sentry_pb2.SessionAssertion(body=outer.body, signature=bytes(tampered))
    with pytest.raises(BadSignature):
        v.verify(bad.SerializeToString(), tenant="acme", channel_binding=CB, now=NOW)
    # a body edited after signing: same signature, different bytes
    body = sentry_pb2.SessionAssertionBody.FromString(outer.body)
    body.subject = "mallory"
    forged = sentry_pb2.SessionAssertion(body=body.SerializeToString(), signature=outer.signature)
    with pytest.raises(BadSignature):
        v.verify(forged.SerializeToString(), tenant="acme", channel_binding=CB, now=NOW)


def test_signature_with_other_context_is_refused(issuer: SigningKey) -> None:
    raw = mint(issuer)
    outer = sentry_pb2.SessionAssertion.FromString(raw)
    sig = issuer.sign(outer.body, context=b"pqcnet/attestation/v1")
    other = sentry_pb2.SessionAssertion(body=outer.body, signature=sig).SerializeToString()
    with pytest.raises(BadSignature):
        verifier(issuer).verify(other, tenant="acme", channel_binding=CB, now=NOW)


@pytest.mark.parametrize("value", ["***", "a", "é" * 4, "A" * 40_000, "AAAA=AAA"])
def test_malformed_header(value: str) -> None:
    with pytest.raises(MalformedAssertion):
        sa.decode(sa.from_header(value))


@pytest.mark.parametrize("raw", [b"\xff\xff\xff", b"", b"\x0a\x00", b"\x00" * 20_000])
def test_malformed_protobuf(raw: bytes) -> None:
    with pytest.raises(MalformedAssertion):
        sa.decode(raw)


def test_reload_of_issuers_drops_cache(issuer: SigningKey) -> None:
    v = verifier(issuer)
    raw = mint(issuer)
    v.verify(raw, tenant="acme", channel_binding=CB, now=NOW)
    v.set_issuers({"acme": []})
    with pytest.raises(UnknownIssuer):
        v.verify(raw, tenant="acme", channel_binding=CB, now=NOW)


def test_cache_is_bounded(issuer: SigningKey) -> None:
    v = sa.AssertionVerifier({"acme": [issuer.public_key]}, cache_size=3)
    for i in range(5):
        v.verify(mint(issuer, subject=f"u{i}"), tenant="acme", channel_binding=CB, now=NOW)
    assert v.cache_len == 3
