"""pqcnet.sim — 1000-node simulations of the overlay on one machine.

The real protocol objects of every node (control-plane agent with its envelope
verifier, directives, sentry limiter, QSTP peer gate, QS-DAG ledger, DTN bundle store,
relayer metering and volume proofs) run under a discrete-event clock; only the network,
the clock and the Waku relay layer (a GossipSub v1.1 model) are simulated.

Map of the package:

==============  ================================================================
``engine``      the clock (heap of callbacks) and named random streams
``network``     latency / bandwidth / loss / partitions / nodes up and down
``gossipsub``   the Waku relay layer (GossipSub v1.1 with Waku's parameters)
``crypto``      seeded node keys; the switchable verify-once cache
``memstore``    in-memory store behind the real QS-DAG ledger
``transport``   the real agent's Transport on the relay model; ``drive``
``node``        one node: real agent + real limiter, gate, ledger
``world``       roles, joins, churn, partitions, governance, delivery plumbing
``dataplane``   publisher → relayer → subscriber frames, DTN replay, metering
``audit``       governance's indexer: over-reporting and equivocation → slashing
``adversary``   forgers, replayers, equivocators
``workloads``   the six scenarios and their metrics
``config``      scenario YAML → typed, validated :class:`~pqcnet.sim.config.Scenario`
``run``         one run → summary (+ records, timeline)
``output``      summary.json, records CSV, PNG plots, Markdown report, sweeps
==============  ================================================================

Engine choice and numbers: ``docs/decisions/0017-simulation-engine.md``.
"""

from pqcnet.sim.config import Scenario, load, override
from pqcnet.sim.run import RunResult, run, strip_run

__all__ = ["RunResult", "Scenario", "load", "override", "run", "strip_run"]
