"""A directive takes effect on a node only once that node has anchored it — on every
node, registrar or not, and on a node that was offline when it was published.

``gov`` is the only registrar; ``sentry-1`` and ``relayer-1`` start with *empty*
ledgers and DAG sync is on demand only, so the first directive reaches them before
their ledger can hold it. A handler registered on each node checks, when it is
called, that this very directive is anchored in this node's own QS-DAG.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from pqcnet.mesh.directives import (
    Directive,
    ForceRekey,
    Outcome,
    RateLimitUpdate,
    SlashNotice,
    sign_directive,
)
from pqcnet.mesh.envelope import NodeKeys
from pqcnet.mesh.qsdag_port import QsdagPort
from pqcnet.mesh.transport import InProcessHub, InProcessTransport

from ..mesh.harness import (
    FAST,
    GOV,
    Recorder,
    anchored_by_itself,
    attach_ledgers,
    bootstrap_ledgers,
    make_agent,
    make_agents,
    node_key,
    stop_all,
    until,
)

pytestmark = pytest.mark.timeout(90)

NAMES = ["gov", "sentry-1", "relayer-1"]
ON_DEMAND_SYNC = dataclasses.replace(FAST, dag_sync_interval_ms=0)


class AnchoredHere:
    """Records each rate limit it gets, after checking this node anchored it itself."""

    def __init__(self, port: QsdagPort) -> None:
        self.port = port
        self.limits: list[RateLimitUpdate] = []
        self.unanchored: list[RateLimitUpdate] = []

    def on_rate_limit(self, update: RateLimitUpdate) -> Outcome:
        if not anchored_by_itself(self.port, update):
            self.unanchored.append(update)
        self.limits.append(update)
        return Outcome.APPLIED

    def on_force_rekey(self, target: ForceRekey) -> Outcome:
        return Outcome.IGNORED

    def on_slash(self, target: SlashNotice) -> Outcome:
        return Outcome.IGNORED


async def test_non_registrars_apply_only_after_anchoring_and_offline_nodes_catch_up(
        tmp_path: Path) -> None:
    hub = InProcessHub()
    ts = [InProcessTransport(hub) for _ in NAMES]
    agents = make_agents(NAMES, list(ts), tmp_path, config=ON_DEMAND_SYNC)
    gov, sentry, relayer = agents
    ports = attach_ledgers(agents, bootstrap_ledgers(NAMES, tmp_path, registrar_only=True))
    checks = {a.node_id: AnchoredHere(p) for a, p in zip(agents, ports)}
    for a in agents:
        a.handlers.append(checks[a.node_id])
    # a node without a ledger hears every directive and applies none
    bare = make_agent(NodeKeys("bare", node_key("bare")), [*NAMES, "bare"],
                      InProcessTransport(hub), tmp_path)
    bare_check = Recorder()
    bare.handlers.append(bare_check)
    agents.append(bare)
    try:
        for a in agents:
            await a.start()
        await until(lambda: all(len(a.peers.live(a.clock())) == 2 for a in agents[:3]), 10,
                    "mesh")
        assert len(ports[1].ledger) == len(ports[2].ledger) == 0
        ts[2].online = False                                    # relayer-1 is away
        first = sign_directive(Directive.create(RateLimitUpdate("acme", 1.0, 2),
                                                now_ms=gov.clock()), GOV)
        await gov.issue_directive(first)
        # the sentry has it, verified, but its ledger cannot hold it yet: no effect
        await until(lambda: sentry.directives.pending == 1, 10, "held for anchoring")
        assert checks["sentry-1"].limits == []
        assert sentry.events["directive_anchor_deferred"] == 1
        await until(lambda: bare.directives.rejections["no_ledger"] == 1, 10, "bare refuses")
        # once DAG sync gives the sentry its ledger, the held directive is anchored, then applied
        await gov.publish_tips()
        await until(lambda: checks["sentry-1"].limits == [first.directive.action], 15,
                    "applied after anchoring")
        assert sentry.directives.pending == 0
        # relayer-1 returns: it never saw the message, but the anchored directive comes
        # with DAG sync; it is verified, anchored by relayer-1 itself, then applied
        ts[2].online = True
        await until(lambda: gov.peers.is_live("relayer-1", gov.clock())
                    and relayer.peers.is_live("gov", relayer.clock()), 10, "relayer back")
        for _ in range(100):  # sync is on demand here: ask until it has caught up
            await gov.publish_tips()
            if checks["relayer-1"].limits:
                break
            await asyncio.sleep(0.1)
        assert checks["relayer-1"].limits == [first.directive.action]
        # each node applied it once and only after anchoring it itself
        for name in NAMES:
            assert checks[name].unanchored == [], name
        assert checks["gov"].limits == [first.directive.action]
        assert not relayer.directives.rejections and not sentry.directives.rejections
        assert bare_check.limits == []
    finally:
        await stop_all(agents)
