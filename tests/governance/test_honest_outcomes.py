"""Honest directives: a node counts what its parts really did with a directive.

Issue reproduction: a relayer's directive consumers do nothing with a rate limit, yet
``pqcnet_mesh_directives_applied_total{action="rate_limit"}`` went up. Now every part
answers applied / ignored / failed, each answer is counted with that label, and the
``applied`` total moves only when some part applied the directive.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from pqcnet.mesh.directives import (
    Directive,
    ForceRekey,
    Outcome,
    RateLimitUpdate,
    SlashNotice,
    sign_directive,
)
from pqcnet.mesh.envelope import NodeKeys
from pqcnet.mesh.transport import InProcessHub, InProcessTransport
from pqcnet.qstp.tls import PeerGate
from pqcnet.runtime.governance import GateDirectives

from ..mesh.harness import (
    GOV,
    Recorder,
    attach_ledgers,
    bootstrap_ledgers,
    make_agent,
    node_key,
    stop_all,
)

pytestmark = pytest.mark.timeout(60)
NAMES = ["relayer-1", "rogue-1"]


def applied_total(action: str) -> float:
    return REGISTRY.get_sample_value("pqcnet_mesh_directives_applied_total",
                                     {"action": action}) or 0.0


def outcome_total(action: str, part: str, outcome: str) -> float:
    return REGISTRY.get_sample_value("pqcnet_mesh_directive_outcomes_total",
                                     {"action": action, "handler": part,
                                      "outcome": outcome}) or 0.0


class Broken:
    def on_rate_limit(self, update: RateLimitUpdate) -> Outcome:
        raise RuntimeError("bug in a consumer")

    def on_force_rekey(self, target: ForceRekey) -> Outcome:
        raise RuntimeError("bug in a consumer")

    def on_slash(self, target: SlashNotice) -> Outcome:
        raise RuntimeError("bug in a consumer")


async def test_outcomes_are_what_the_handlers_did(tmp_path: Path) -> None:
    relayer = make_agent(NodeKeys("relayer-1", node_key("relayer-1")), NAMES,
                         InProcessTransport(InProcessHub()), tmp_path)
    attach_ledgers([relayer], bootstrap_ledgers(NAMES, tmp_path))
    gate = PeerGate()
    relayer.handlers.append(GateDirectives(gate, "relayer-1"))  # the relayer's consumer today

    async def receive(action: RateLimitUpdate | ForceRekey | SlashNotice) -> None:
        d = sign_directive(Directive.create(action, now_ms=relayer.clock()), GOV)
        await relayer.directives.receive(d.encode(), "governance")

    try:
        # (1) the reproduction: nothing on this relayer applies a rate limit
        before = applied_total("rate_limit")
        ignored = outcome_total("rate_limit", "GateDirectives", "ignored")
        await receive(RateLimitUpdate("acme", 5.0, 5))
        assert applied_total("rate_limit") == before
        assert outcome_total("rate_limit", "GateDirectives", "ignored") == ignored + 1
        assert relayer.directives.outcomes[("rate_limit", "mesh", "ignored")] == 1
        # (2) with a quota handler it is applied, and counted so; a broken consumer is
        # counted failed and does not stop the others
        quota = Recorder(applies=frozenset({"rate_limit"}))  # the relayer's quota handler
        relayer.handlers[:0] = [Broken()]
        relayer.handlers.append(quota)
        before = applied_total("rate_limit")
        await receive(RateLimitUpdate("acme", 2.0, 2))
        assert quota.limits == [RateLimitUpdate("acme", 2.0, 2)]
        assert applied_total("rate_limit") == before + 1
        o = relayer.directives.outcomes
        assert o[("rate_limit", "Recorder", "applied")] == 1
        assert o[("rate_limit", "Broken", "failed")] == 1
        assert relayer.events["handler_error"] == 1
        # (3) a rekey of another node concerns nobody here
        before = applied_total("force_rekey")
        await receive(ForceRekey("sentry-9", 3))
        assert applied_total("force_rekey") == before
        assert o[("force_rekey", "mesh", "ignored")] == 1
        # (4) a slash: the mesh revokes the key (applied); GateDirectives denies the node
        # but still answers None, which is read as ignored until it reports its outcome
        before = applied_total("slash")
        await receive(SlashNotice("rogue-1", "equivocation"))
        assert applied_total("slash") == before + 1
        assert o[("slash", "mesh", "applied")] == 1
        assert relayer.keyring.is_revoked("rogue-1") and len(gate) == 1
    finally:
        await stop_all([relayer])
