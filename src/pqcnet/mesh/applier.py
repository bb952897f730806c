"""Directives on one node: verify, refuse replays, anchor first, then apply honestly.

:class:`DirectiveApplier` is the one path every governance directive takes on a node,
whatever brought it (the governance topic, the node's own ``issue_directive``, or a
vertex another node anchored that arrived by DAG sync). Its rules, in order:

1. **Authority.** ``threshold`` distinct governance keys must have signed it, and it
   must be inside its bounded validity window
   (:meth:`~pqcnet.mesh.directives.GovernancePolicy.verify`). Who relayed it does not
   matter: a peer's say-so is never authority. A directive with *some* but too few
   valid governance signatures is handed to :attr:`DirectiveApplier.partial_listeners`
   (governance nodes cosign it) and never applied.
2. **Replay.** A directive id this node has applied is refused (``replay``). The window
   is *anchored*, not just kept in memory: :meth:`DirectiveApplier.attach` reloads the
   ids of the directives this node anchored during the last
   :data:`~pqcnet.mesh.directives.MAX_LIFETIME_MS`, and an older directive is expired.
3. **Anchor first, on every node.** The signed directive is anchored in this node's
   QS-DAG before anything acts on it. A node without a ledger applies nothing
   (``no_ledger``). A ledger that refuses (typically: this node's own registration has
   not synced yet) puts the directive in a bounded retry queue, retried each tick
   (:meth:`DirectiveApplier.retry_pending`) until anchored or expired.
4. **Honest outcomes.** The agent's own effect (``mesh``: revoke a slashed key, rotate
   our key), then every handler, each answering
   :class:`~pqcnet.mesh.directives.Outcome`; each answer is counted by (action, part,
   outcome) and ``pqcnet_mesh_directives_applied_total`` only counts a directive some
   part actually applied.

Every refusal is a :class:`~pqcnet.mesh.errors.DirectiveError` whose ``reason`` labels
:attr:`DirectiveApplier.rejections` and ``pqcnet_mesh_directives_rejected_total``.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable

from pqcnet.mesh import metrics
from pqcnet.mesh._aio import maybe_await
from pqcnet.mesh.directives import (
    ISSUE_SKEW_MS,
    MAX_LIFETIME_MS,
    Action,
    Directive,
    DirectiveHandler,
    ForceRekey,
    GovernancePolicy,
    HandlerResult,
    Outcome,
    RateLimitUpdate,
    SignedDirective,
)
from pqcnet.mesh.errors import (
    DirectiveError,
    DirectiveExpired,
    DirectiveReplayed,
    LedgerRejected,
    NotAnchored,
    UnderThreshold,
)
from pqcnet.mesh.ledger import LedgerPort

log = logging.getLogger("pqcnet.mesh.agent")

#: Verified directives waiting for this node's ledger to accept them (retried each
#: tick). Bounds what a burst of directives can hold while the ledger lags.
MAX_HELD_DIRECTIVES = 256
#: The agent's own effect of an action (the ``mesh`` part of the outcome counters).
BuiltinEffect = Callable[[Action], Awaitable[Outcome]]
#: Called with (signed directive, via) for a directive under the signature threshold.
PartialListener = Callable[[SignedDirective, str], Awaitable[None] | None]


class DirectiveApplier:
    """Verifies, dedups, anchors and dispatches the directives of one node."""

    def __init__(self, policy: GovernancePolicy | None, builtin: BuiltinEffect, *,
                 clock: Callable[[], int], events: Counter[str], max_applied: int,
                 max_pending: int = MAX_HELD_DIRECTIVES) -> None:
        self.policy = policy
        self.builtin = builtin
        self.clock = clock
        self.events = events
        self.max_applied = max_applied
        self.max_pending = max_pending
        self.ledger: LedgerPort | None = None
        self.handlers: list[DirectiveHandler] = []
        self.partial_listeners: list[PartialListener] = []
        #: directive ids anchored and dispatched here (the in-memory replay window)
        self.applied: OrderedDict[bytes, Directive] = OrderedDict()
        #: refusals by reason
        self.rejections: Counter[str] = Counter()
        #: (action, part, outcome) -> count
        self.outcomes: Counter[tuple[str, str, str]] = Counter()
        self._pending: OrderedDict[bytes, tuple[bytes, str]] = OrderedDict()

    @property
    def pending(self) -> int:
        """Verified directives waiting to be anchored."""
        return len(self._pending)

    def attach(self, ledger: LedgerPort | None) -> int:
        """Use ``ledger``; reload the replay window anchored in it. Returns how many ids."""
        self.ledger = ledger
        if ledger is None:
            return 0
        since = self.clock() - MAX_LIFETIME_MS - ISSUE_SKEW_MS
        loaded = 0
        for body in ledger.anchored_directives(since):
            try:
                d = SignedDirective.decode(body).directive
            except DirectiveError:
                continue
            if d.directive_id not in self.applied:
                self._remember(d)
                loaded += 1
        return loaded

    # ------------------------------------------------------------------ receiving

    async def receive(self, body: bytes, via: str, *, synced: bool = False) -> None:
        """Process one signed directive relayed by ``via``. Raises the
        :class:`DirectiveError` that refused it, after counting it. ``synced``: it came
        from a vertex another node anchored; replays and expired ones are then normal
        (every node anchors its own copy) and skipped quietly."""
        try:
            await self._receive(body, via)
        except DirectiveError as exc:
            if synced and isinstance(exc, DirectiveReplayed | DirectiveExpired):
                self.events["synced_directive_skipped"] += 1
                return
            self.rejections[exc.reason] += 1
            metrics.DIRECTIVES_REJECTED.labels(exc.reason).inc()
            raise

    async def _receive(self, body: bytes, via: str) -> None:
        if self.policy is None:
            raise DirectiveError("no governance policy configured; directive ignored",
                                 reason="no_policy")
        signed = SignedDirective.decode(body)
        try:
            d = self.policy.verify(signed, self.clock())
        except UnderThreshold as exc:
            if exc.valid:
                for pl in self.partial_listeners:
                    await maybe_await(pl(signed, via))
            raise
        if d.directive_id in self.applied:
            raise DirectiveReplayed(f"directive {d.directive_id.hex()} already applied")
        if d.directive_id in self._pending:
            self.events["directive_already_pending"] += 1
            return
        if self.ledger is None:
            raise NotAnchored("this node has no ledger to anchor the directive in; "
                              "not applied", reason="no_ledger")
        try:
            self.ledger.anchor_directive(body, _subject(d))
        except LedgerRejected as exc:
            self._hold(d, body, via, exc)
            return
        await self._apply(d, via)

    def _hold(self, d: Directive, body: bytes, via: str, why: LedgerRejected) -> None:
        if len(self._pending) >= self.max_pending:
            raise NotAnchored(f"ledger refused the directive ({why}) and the retry queue "
                              f"is full ({self.max_pending})", reason="anchor_queue_full")
        self._pending[d.directive_id] = (body, via)
        self.events["directive_anchor_deferred"] += 1
        log.info("directive not anchored yet; will retry", extra={
            "id": d.directive_id.hex(), "error": str(why)})

    async def retry_pending(self) -> int:
        """Try to anchor (then apply) every waiting directive; returns how many went through."""
        done = 0
        now = self.clock()
        for did, (body, via) in list(self._pending.items()):
            d = SignedDirective.decode(body).directive
            if now >= d.expires_ms:
                del self._pending[did]
                self.rejections["expired_unanchored"] += 1
                metrics.DIRECTIVES_REJECTED.labels("expired_unanchored").inc()
                continue
            assert self.ledger is not None  # only held when a ledger refused
            try:
                self.ledger.anchor_directive(body, _subject(d))
            except LedgerRejected:
                continue
            del self._pending[did]
            await self._apply(d, via)
            done += 1
        return done

    # ------------------------------------------------------------------ applying

    def _remember(self, d: Directive) -> None:
        self.applied[d.directive_id] = d
        now = self.clock()
        while len(self.applied) > self.max_applied:
            _, old = self.applied.popitem(last=False)
            if old.expires_ms > now:  # its replay would pass: say so
                self.events["replay_window_evicted_live"] += 1

    async def _apply(self, d: Directive, via: str) -> None:
        self._remember(d)
        action, name = d.action, d.action_name
        try:
            mine = await self.builtin(action)
        except DirectiveError as exc:
            mine = Outcome.FAILED
            log.warning("directive failed on this node", extra={
                "action": name, "id": d.directive_id.hex(), "error": str(exc)})
        self._count(name, "mesh", mine)
        results = [mine]
        if mine is not Outcome.FAILED:  # a rekey that did not rotate: nothing to follow
            for h in self.handlers:
                outcome = await self._call(h, action)
                self._count(name, type(h).__name__, outcome)
                results.append(outcome)
        outcome = (Outcome.APPLIED if Outcome.APPLIED in results else
                   Outcome.FAILED if Outcome.FAILED in results else Outcome.IGNORED)
        if outcome is Outcome.APPLIED:
            metrics.DIRECTIVES.labels(name).inc()
        log.info(f"directive {outcome.value}", extra={
            "action": name, "id": d.directive_id.hex(), "via": via})

    async def _call(self, h: DirectiveHandler, action: Action) -> Outcome:
        try:
            result: HandlerResult
            if isinstance(action, RateLimitUpdate):
                result = h.on_rate_limit(action)
            elif isinstance(action, ForceRekey):
                result = h.on_force_rekey(action)
            else:
                result = h.on_slash(action)
            outcome = await maybe_await(result)
        except Exception as exc:  # a consumer's bug must not stop other consumers
            self.events["handler_error"] += 1
            log.exception("directive handler failed", extra={"error": str(exc)})
            return Outcome.FAILED
        return Outcome(outcome) if outcome is not None else Outcome.IGNORED

    def _count(self, action: str, part: str, outcome: Outcome) -> None:
        self.outcomes[(action, part, outcome.value)] += 1
        metrics.DIRECTIVE_OUTCOMES.labels(action, part, outcome.value).inc()


def _subject(d: Directive) -> str:
    a = d.action
    return a.scope if isinstance(a, RateLimitUpdate) else a.target
