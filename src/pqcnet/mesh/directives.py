"""Governance directives: what they say, who must sign them, who consumes them.

A directive is signed by governance keys *inside* its own ``SignedDirective``
(context ``pqcnet/mesh/directive/v1``), separately from the control envelope that
carries it. That is what lets the directive be anchored in the QS-DAG verbatim and
re-verified by anyone later, and what makes a threshold possible: ``k`` of the
configured governance keys must sign (:func:`cosign` adds one signature at a time).

Consumers — sentries, relayers, QSTP servers — implement :class:`DirectiveHandler`;
the :class:`~pqcnet.mesh.applier.DirectiveApplier` calls them only after the directive
has verified *and* been anchored in this node's ledger. Each handler answers with an
:class:`Outcome` — ``applied`` (it changed something), ``ignored`` (the directive does
not concern it) or ``failed`` — and that answer, not the mere call, is what the
metrics count: a relayer that has nothing to do with a rate limit says ``ignored``.

A directive is valid for a bounded window: ``issued_ms`` (minus a clock-skew
allowance) to ``expires_ms``, at most :data:`MAX_LIFETIME_MS` long. The bound is what
makes replay protection across restarts affordable: a node only has to remember (in
its QS-DAG) the directives anchored during the last lifetime.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from pqcnet.crypto.pqc import SigningKey, VerifyKey
from pqcnet.mesh._pb import parse
from pqcnet.mesh.errors import DirectiveError, DirectiveExpired, UnderThreshold
from pqcnet.proto import mesh_pb2

CONTEXT_DIRECTIVE = b"pqcnet/mesh/directive/v1"
#: Most signatures a directive may carry (bounds verification work per message).
MAX_SIGNATURES = 16
#: Longest validity window of a directive. Bounds how far back a restarted node must
#: look in its QS-DAG to refuse a replay of one it already applied.
MAX_LIFETIME_MS = 7 * 24 * 3_600_000
#: A directive issued this far in our future is still accepted (issuer clock skew).
ISSUE_SKEW_MS = 60_000


@dataclass(frozen=True, slots=True)
class RateLimitUpdate:
    """New limiter settings for requests matching ``scope`` ("*" = everyone)."""

    scope: str
    rate_per_s: float
    burst: int


@dataclass(frozen=True, slots=True)
class ForceRekey:
    """``target`` must rotate to a key version >= ``min_key_version``."""

    target: str
    min_key_version: int


@dataclass(frozen=True, slots=True)
class SlashNotice:
    """``target``'s key is disabled everywhere until it re-attests."""

    target: str
    reason: str
    evidence_digest: bytes = b""


Action = RateLimitUpdate | ForceRekey | SlashNotice


@dataclass(frozen=True, slots=True)
class Directive:
    directive_id: bytes
    issued_ms: int
    expires_ms: int
    action: Action

    @classmethod
    def create(cls, action: Action, *, now_ms: int, ttl_ms: int = 3_600_000,
               directive_id: bytes | None = None) -> Directive:
        """A new directive; ``directive_id`` fixes the id (16 bytes) so independent
        issuers of the same decision (a slash for one piece of evidence) make one
        directive, applied once."""
        if directive_id is not None and len(directive_id) != 16:
            raise DirectiveError("directive id must be 16 bytes")
        return cls(directive_id or os.urandom(16), now_ms, now_ms + ttl_ms, action)

    @property
    def action_name(self) -> str:
        return {RateLimitUpdate: "rate_limit", ForceRekey: "force_rekey",
                SlashNotice: "slash"}[type(self.action)]

    def encode(self) -> bytes:
        pb = mesh_pb2.GovernanceDirective(directive_id=self.directive_id,
                                          issued_ms=self.issued_ms, expires_ms=self.expires_ms)
        a = self.action
        if isinstance(a, RateLimitUpdate):
            pb.rate_limit.CopyFrom(mesh_pb2.RateLimitUpdate(
                scope=a.scope, rate_per_s=a.rate_per_s, burst=a.burst))
        elif isinstance(a, ForceRekey):
            pb.force_rekey.CopyFrom(mesh_pb2.ForceRekey(
                target=a.target, min_key_version=a.min_key_version))
        else:
            pb.slash.CopyFrom(mesh_pb2.SlashNotice(
                target=a.target, reason=a.reason, evidence_digest=a.evidence_digest))
        return pb.SerializeToString()

    @classmethod
    def decode(cls, data: bytes) -> Directive:
        pb = parse(mesh_pb2.GovernanceDirective, data, DirectiveError,
                   "directive does not decode")
        which = pb.WhichOneof("action")
        action: Action
        if which == "rate_limit":
            r = pb.rate_limit
            if not r.rate_per_s > 0 or r.burst < 1:
                raise DirectiveError("rate limit must be > 0 with burst >= 1")
            action = RateLimitUpdate(r.scope or "*", r.rate_per_s, r.burst)
        elif which == "force_rekey":
            if not pb.force_rekey.target:
                raise DirectiveError("force_rekey needs a target")
            action = ForceRekey(pb.force_rekey.target, pb.force_rekey.min_key_version)
        elif which == "slash":
            if not pb.slash.target:
                raise DirectiveError("slash needs a target")
            action = SlashNotice(pb.slash.target, pb.slash.reason, pb.slash.evidence_digest)
        else:
            raise DirectiveError("directive carries no action")
        if len(pb.directive_id) != 16:
            raise DirectiveError("directive id must be 16 bytes")
        return cls(pb.directive_id, pb.issued_ms, pb.expires_ms, action)


@dataclass(frozen=True, slots=True)
class SignedDirective:
    directive: Directive
    #: the exact bytes signed (as received)
    raw: bytes
    #: (governance key id, signature)
    signatures: tuple[tuple[bytes, bytes], ...]

    def encode(self) -> bytes:
        return mesh_pb2.SignedDirective(directive=self.raw, signatures=[
            mesh_pb2.GovernanceSignature(key_id=k, signature=s) for k, s in self.signatures
        ]).SerializeToString()

    @classmethod
    def decode(cls, data: bytes) -> SignedDirective:
        pb = parse(mesh_pb2.SignedDirective, data, DirectiveError,
                   "signed directive does not decode")
        if len(pb.signatures) > MAX_SIGNATURES:
            raise DirectiveError(f"more than {MAX_SIGNATURES} signatures")
        return cls(Directive.decode(pb.directive), pb.directive,
                   tuple((s.key_id, s.signature) for s in pb.signatures))


def sign_directive(directive: Directive, *keys: SigningKey) -> SignedDirective:
    """Sign ``directive`` with each of ``keys``."""
    raw = directive.encode()
    return SignedDirective(directive, raw, tuple(
        (k.key_id, k.sign(raw, context=CONTEXT_DIRECTIVE)) for k in keys))


def cosign(signed: SignedDirective, key: SigningKey) -> SignedDirective:
    """Add one more governance signature (threshold collection)."""
    if any(k == key.key_id for k, _ in signed.signatures):
        return signed
    sig = key.sign(signed.raw, context=CONTEXT_DIRECTIVE)
    return SignedDirective(signed.directive, signed.raw, (*signed.signatures, (key.key_id, sig)))


class GovernancePolicy:
    """The governance keys and how many of them must sign."""

    def __init__(self, keys: list[VerifyKey], threshold: int = 1) -> None:
        if not keys or not 1 <= threshold <= len(keys):
            raise DirectiveError(f"threshold {threshold} impossible with {len(keys)} keys")
        self.keys = {k.key_id: k for k in keys}
        self.threshold = threshold

    def valid_signers(self, signed: SignedDirective) -> set[bytes]:
        """Key ids of the governance keys whose signature on ``signed`` verifies."""
        good = set()
        for key_id, sig in signed.signatures:
            vk = self.keys.get(key_id)
            if vk is not None and vk.is_valid(sig, signed.raw, context=CONTEXT_DIRECTIVE):
                good.add(key_id)
        return good

    def verify(self, signed: SignedDirective, now_ms: int) -> Directive:
        """The directive if ``threshold`` distinct governance keys signed it and it is
        inside its (bounded) validity window; else a typed :class:`DirectiveError`."""
        good = self.valid_signers(signed)
        if len(good) < self.threshold:
            raise UnderThreshold(
                f"directive has {len(good)} valid governance signatures; need {self.threshold}",
                valid=len(good))
        d = signed.directive
        if not d.expires_ms or d.expires_ms - d.issued_ms > MAX_LIFETIME_MS:
            raise DirectiveExpired(
                f"directive lifetime must be set and at most {MAX_LIFETIME_MS} ms")
        if now_ms >= d.expires_ms:
            raise DirectiveExpired("directive expired")
        if d.issued_ms > now_ms + ISSUE_SKEW_MS:
            raise DirectiveExpired("directive issued in the future")
        return d


class Outcome(StrEnum):
    """What one handler did with one directive (the label of the outcome counters)."""

    #: it changed something on this node
    APPLIED = "applied"
    #: the directive does not concern it (another node's rekey, a limit it has no use for)
    IGNORED = "ignored"
    #: it tried and could not (the error is logged and counted)
    FAILED = "failed"


#: A handler method's answer: an :class:`Outcome` (``None`` is read as ``ignored``: only
#: a handler that says ``applied`` is counted as having applied anything), possibly async.
HandlerResult = Outcome | None | Awaitable[Outcome | None]


class DirectiveHandler(Protocol):
    """What a sentry, relayer or QSTP server implements to obey directives.

    Methods may be plain or ``async``; the applier awaits whatever they return and
    counts the :class:`Outcome` (an exception counts as ``failed``).
    """

    def on_rate_limit(self, update: RateLimitUpdate) -> HandlerResult: ...

    def on_force_rekey(self, target: ForceRekey) -> HandlerResult: ...

    def on_slash(self, target: SlashNotice) -> HandlerResult: ...
