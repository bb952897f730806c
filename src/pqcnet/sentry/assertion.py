"""Session assertions: issue, encode, verify — and cache, so per-RPC cost is a lookup.

An assertion says "subject S of tenant T may use this QSTP tunnel until E". It is
signed with ML-DSA by the tenant's issuer under the FIPS 204 context string
:data:`CONTEXT`, so no other pqcnet signature can be replayed as an assertion. It is
*bound to one tunnel*: ``channel_binding`` is that tunnel's TLS exporter value, so an
assertion lifted from one tunnel is refused on every other (checked on every RPC,
cache hit or not).

Verification is the expensive part (≈0.16 ms for ML-DSA-65); every RPC carries the
assertion, so :class:`AssertionVerifier` remembers a verified assertion by the
SHA-256 of its bytes until it expires. A cache hit still re-checks expiry, tenant
and channel binding — only the signature check is skipped, which is sound because
the digest pins the exact signed bytes. The cache is bounded (:data:`DEFAULT_CACHE_SIZE`)
and is dropped whole when the trusted issuer keys change (hot reload).

The clock is always passed in (``now``), never read here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from pqcnet.crypto.errors import SignatureInvalid
from pqcnet.crypto.pqc import SigningKey, VerifyKey
from pqcnet.proto import sentry_pb2
from pqcnet.sentry.errors import (
    AssertionExpired,
    BadSignature,
    ChannelBindingMismatch,
    MalformedAssertion,
    UnknownIssuer,
    WrongTenant,
)
from pqcnet.sentry.memo import Memo

#: FIPS 204 context string: domain separation for assertion signatures.
CONTEXT = b"pqcnet/sentry/assertion/v1"
VERSION = 1
#: HTTP header / gRPC metadata key carrying the base64url assertion.
HEADER = "x-pqcnet-assertion"
#: Bound on an encoded assertion (ML-DSA-87 signature is 4,627 bytes); refuses
#: memory-inflating garbage before any parsing.
MAX_ASSERTION_BYTES = 16 * 1024
#: Bound on the verified-assertion cache (entries); oldest evicted first.
DEFAULT_CACHE_SIZE = 100_000
#: Tolerated clock difference between issuer and sentry, seconds.
DEFAULT_CLOCK_SKEW = 30.0
#: Longest lifetime a sentry accepts, seconds (a leaked assertion is bounded in time).
DEFAULT_MAX_TTL = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class SessionAssertion:
    """A decoded assertion body (the signed part)."""

    #: who: a user, service or SPIFFE ID
    subject: str
    #: tenant namespace the subject belongs to
    tenant: str
    #: random session identifier
    session_id: bytes
    #: scopes granted, passed to backends as information
    scopes: tuple[str, ...]
    #: unix seconds
    issued_at: int
    #: unix seconds
    expires_at: int
    #: TLS exporter value of the tunnel this assertion is bound to
    channel_binding: bytes
    #: SHA-256 of the issuer's raw public key
    issuer_key_id: bytes


def issue(
    issuer: SigningKey,
    *,
    subject: str,
    tenant: str,
    channel_binding: bytes,
    now: float,
    ttl: float = 300.0,
    scopes: Iterable[str] = (),
    session_id: bytes | None = None,
) -> bytes:
    """Sign a new assertion; returns the serialized ``SessionAssertion`` protobuf."""
    if not subject or not tenant:
        raise MalformedAssertion("an assertion needs a subject and a tenant")
    if ttl <= 0:
        raise MalformedAssertion(f"ttl must be positive, got {ttl}")
    body = sentry_pb2.SessionAssertionBody(
        version=VERSION,
        subject=subject,
        tenant=tenant,
        session_id=session_id if session_id is not None else os.urandom(16),
        scopes=list(scopes),
        issued_at=int(now),
        expires_at=int(now + ttl),
        channel_binding=channel_binding,
        issuer_key_id=issuer.key_id,
    ).SerializeToString(deterministic=True)
    sig = issuer.sign(body, context=CONTEXT)
    return sentry_pb2.SessionAssertion(body=body, signature=sig).SerializeToString()


def to_header(raw: bytes) -> str:
    """base64url without padding, for an HTTP header or gRPC metadata value."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def from_header(value: str) -> bytes:
    """Inverse of :func:`to_header`; strict alphabet, bounded size."""
    if len(value) > MAX_ASSERTION_BYTES * 4 // 3 + 4:
        raise MalformedAssertion(f"assertion header longer than {MAX_ASSERTION_BYTES} bytes")
    try:
        data = value.encode("ascii")
        return base64.b64decode(data + b"=" * (-len(data) % 4), altchars=b"-_", validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise MalformedAssertion("assertion is not valid base64url") from None


def decode(raw: bytes) -> tuple[SessionAssertion, bytes, bytes]:
    """Parse without verifying: (assertion, signed body bytes, signature)."""
    if len(raw) > MAX_ASSERTION_BYTES:
        raise MalformedAssertion(f"assertion longer than {MAX_ASSERTION_BYTES} bytes")
    try:
        outer = sentry_pb2.SessionAssertion.FromString(raw)
        body = sentry_pb2.SessionAssertionBody.FromString(outer.body)
    except DecodeError:
        raise MalformedAssertion("assertion is not a valid SessionAssertion protobuf") from None
    if body.version != VERSION:
        raise MalformedAssertion(f"unsupported assertion version {body.version}")
    if not body.subject or not body.tenant or not outer.signature:
        raise MalformedAssertion("assertion lacks subject, tenant or signature")
    if len(body.issuer_key_id) != 32:
        raise MalformedAssertion("assertion issuer_key_id must be 32 bytes")
    return (
        SessionAssertion(
            subject=body.subject,
            tenant=body.tenant,
            session_id=body.session_id,
            scopes=tuple(body.scopes),
            issued_at=body.issued_at,
            expires_at=body.expires_at,
            channel_binding=body.channel_binding,
            issuer_key_id=body.issuer_key_id,
        ),
        outer.body,
        outer.signature,
    )


class AssertionVerifier:
    """Verifies assertions against per-tenant issuer keys, with a digest cache.

    ``issuers`` maps tenant -> its trusted issuer keys. Not thread-safe; one per loop.
    """

    def __init__(
        self,
        issuers: Mapping[str, Iterable[VerifyKey]],
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
        clock_skew: float = DEFAULT_CLOCK_SKEW,
        max_ttl: float = DEFAULT_MAX_TTL,
    ) -> None:
        self._issuers: dict[str, dict[bytes, VerifyKey]] = {}
        self._cache: OrderedDict[bytes, SessionAssertion] = OrderedDict()
        self.cache_size = cache_size
        self.clock_skew = clock_skew
        self.max_ttl = max_ttl
        self.hits = 0
        self.misses = 0
        # raw assertion -> its SHA-256: a tunnel's requests carry the very same bytes
        # object (the wire decoder memoises heads), whose hash Python caches, so this
        # lookup costs far less than hashing ~3.4 KB (ML-DSA signature) per RPC
        self._digests: Memo[bytes, bytes] = Memo()
        self.set_issuers(issuers)

    def set_issuers(self, issuers: Mapping[str, Iterable[VerifyKey]]) -> None:
        """Replace the trusted keys (hot reload). Drops the cache if anything changed."""
        new = {t: {k.key_id: k for k in keys} for t, keys in issuers.items()}
        if new != self._issuers:
            self._cache.clear()
        self._issuers = new

    @property
    def cache_len(self) -> int:
        """Entries currently cached."""
        return len(self._cache)

    def verify(
        self, raw: bytes, *, tenant: str, channel_binding: bytes, now: float
    ) -> SessionAssertion:
        """Return the assertion if it is valid for this tenant, tunnel and time; else raise."""
        digest = self._digests.get(raw)
        if digest is None:
            digest = hashlib.sha256(raw).digest()
            if len(raw) <= self._digests.max_item:
                self._digests.put(raw, digest)
        cached = self._cache.get(digest)
        if cached is not None:
            self.hits += 1
            assertion = cached
        else:
            self.misses += 1
            assertion = self._verify_signature(raw)
        self._check_claims(assertion, tenant=tenant, channel_binding=channel_binding, now=now)
        if cached is None:
            self._cache[digest] = assertion
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return assertion

    def _verify_signature(self, raw: bytes) -> SessionAssertion:
        assertion, body, sig = decode(raw)
        keys = self._issuers.get(assertion.tenant, {})
        key = keys.get(assertion.issuer_key_id)
        if key is None:
            raise UnknownIssuer(
                f"issuer {assertion.issuer_key_id.hex()[:16]} is not trusted for tenant "
                f"{assertion.tenant!r}"
            )
        try:
            key.verify(sig, body, context=CONTEXT)
        except SignatureInvalid:
            raise BadSignature("assertion signature does not verify") from None
        return assertion

    def _check_claims(
        self, a: SessionAssertion, *, tenant: str, channel_binding: bytes, now: float
    ) -> None:
        if a.expires_at - a.issued_at > self.max_ttl:
            raise AssertionExpired(
                f"assertion lifetime {a.expires_at - a.issued_at}s exceeds {self.max_ttl:.0f}s"
            )
        if now + self.clock_skew < a.issued_at:
            raise AssertionExpired("assertion is not yet valid (issued in the future)")
        if now >= a.expires_at:
            raise AssertionExpired(f"assertion expired {now - a.expires_at:.0f}s ago")
        if a.tenant != tenant:
            raise WrongTenant(f"assertion is for tenant {a.tenant!r}, tunnel is {tenant!r}")
        if not hmac.compare_digest(a.channel_binding, channel_binding):
            raise ChannelBindingMismatch("assertion is bound to a different tunnel")

    def evict_expired(self, now: float) -> int:
        """Drop expired entries; returns how many. Called periodically by the server."""
        dead = [d for d, a in self._cache.items() if a.expires_at <= now]
        for d in dead:
            del self._cache[d]
        return len(dead)
