"""Cross-check: one directive workload on real go-waku nodes and in the simulator.

The workload: ``n`` nodes (one agent per Waku REST endpoint, as a deployed node would
run), governance on the first issues ``count`` rate-limit directives ``interval_s``
apart; every other agent verifies and applies each one to its limiter. Measured per
(directive, node): applied or not, and the time from issue to application.

* **measured** — real :class:`~pqcnet.mesh.agent.ControlPlaneAgent` objects with their
  asyncio tasks over :class:`~pqcnet.mesh.waku.WakuTransport` (REST polling) against the
  go-waku nodes of ``scripts/services start waku``, each with its own real QS-DAG
  ledger on RocksDB (a temporary directory) holding genesis and every node's
  registration: the mesh anchors a directive in the receiving node's ledger before it
  applies it, and applies nothing on a node without one;
* **simulated** — the same agents' code in :mod:`pqcnet.sim` with ``n`` relay nodes on
  loopback-like links.

Delivery must agree. Latency will not and is not meant to: the measured figure is
dominated by the REST adapter's polling (``poll_interval_s``) and go-waku's own
validation queue, neither of which the relay model contains — the side-by-side table
says how big that part is.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from pqcnet.mesh.agent import AgentConfig, ControlPlaneAgent
from pqcnet.mesh.directives import (
    Directive,
    ForceRekey,
    GovernancePolicy,
    Outcome,
    RateLimitUpdate,
    SlashNotice,
    sign_directive,
)
from pqcnet.mesh.envelope import Keyring, NodeKeys
from pqcnet.mesh.qsdag_port import QsdagPort
from pqcnet.mesh.waku import WakuTransport
from pqcnet.qsdag import Ledger
from pqcnet.sim.config import from_dict
from pqcnet.sim.crypto import recipient_key, signing_key
from pqcnet.sim.errors import SimStateError
from pqcnet.sim.metrics import summary
from pqcnet.sim.node import node_name
from pqcnet.sim.world import NETWORK_NAME, World

#: How long the measured run waits for the last directive to land everywhere.
SETTLE_S = 5.0
#: Relay mesh warm-up before the first directive (go-waku grafts on its heartbeat).
WARMUP_S = 2.0


class _Recorder:
    """A DirectiveHandler noting when each rate limit arrived (monotonic clock)."""

    def __init__(self) -> None:
        self.at: dict[float, float] = {}

    def on_rate_limit(self, update: RateLimitUpdate) -> Outcome:
        self.at.setdefault(update.rate_per_s, time.monotonic())
        return Outcome.APPLIED

    def on_force_rekey(self, target: ForceRekey) -> Outcome:
        return Outcome.IGNORED

    def on_slash(self, notice: SlashNotice) -> Outcome:
        return Outcome.IGNORED


def _ledgers(root: Path, names: list[str], seed: int) -> list[Ledger]:
    """One RocksDB ledger per node: the first writes genesis and registers every other
    node's key; the others import those vertices (onboarding)."""
    ledgers = [Ledger.open(root / name) for name in names]
    first = ledgers[0]
    gov_key = signing_key(seed, names[0])
    first.init_genesis(NETWORK_NAME, names[0], gov_key)
    for name in names[1:]:
        first.register_author(name, signing_key(seed, name).public_key,
                              registrar=names[0], signer=gov_key)
    bootstrap = [v.encode() for v in first.export(first.tips())]
    for ledger in ledgers[1:]:
        report = ledger.import_(bootstrap)
        if report.rejected:
            raise SimStateError(f"onboarding vertices refused: {report.rejected[0][1]}")
    return ledgers


async def measure_waku(urls: list[str], *, count: int = 10, interval_s: float = 0.5,
                       seed: int = 1, poll_interval_s: float = 0.03) -> dict[str, Any]:
    """Run the workload on real go-waku nodes (one agent per REST URL)."""
    namespace = "x" + uuid.uuid4().hex[:10]
    gov_key = signing_key(seed, "governance-key")
    policy = GovernancePolicy([gov_key.public_key])
    names = [node_name(i) for i in range(len(urls))]
    agents: list[ControlPlaneAgent] = []
    recorders: list[_Recorder] = []
    config = AgentConfig(namespace=namespace, announce_interval_ms=60_000, tick_ms=1000,
                         dag_sync_interval_ms=0)
    issued: dict[float, float] = {}
    with tempfile.TemporaryDirectory(prefix="pqcnet-waku-check-") as tmp:
        ledgers = _ledgers(Path(tmp), names, seed)
        try:
            for name, url, ledger in zip(names, urls, ledgers, strict=True):
                ring = Keyring()
                for other in names:
                    ring.add(other, signing_key(seed, other).public_key, 1)
                keys = NodeKeys(name, signing_key(seed, name), 1, recipient_key(seed, name))
                transport = WakuTransport.connect(url, timeout_s=3.0, retries=2,
                                                  poll_interval_s=poll_interval_s)
                agent = ControlPlaneAgent(keys, transport, ring, config=config,
                                          governance=policy, ledger=QsdagPort(ledger, keys))
                rec = _Recorder()
                agent.handlers.append(rec)
                agents.append(agent)
                recorders.append(rec)
            for agent in agents:
                await agent.start()
            await asyncio.sleep(WARMUP_S)
            for k in range(count):
                rate = float(k + 1)
                now_ms = int(time.time() * 1000)
                directive = Directive(uuid.uuid4().bytes, now_ms, now_ms + 600_000,
                                      RateLimitUpdate("*", rate, 10))
                issued[rate] = time.monotonic()
                await agents[0].issue_directive(sign_directive(directive, gov_key))
                await asyncio.sleep(interval_s)
            for _ in range(int(SETTLE_S / 0.05)):  # bounded wait for the last arrivals
                if all(len(r.at) == count for r in recorders[1:]):
                    break
                await asyncio.sleep(0.05)
        finally:
            for agent in agents:
                await agent.stop()
            for ledger in ledgers:
                ledger.close()
    latencies = [r.at[rate] - t0 for r in recorders[1:] for rate, t0 in issued.items()
                 if rate in r.at]
    expected = count * (len(agents) - 1)
    return {"nodes": len(agents), "directives": count, "expected": expected,
            "applied": len(latencies), "delivery": len(latencies) / expected if expected else None,
            "latency_ms": {k: (round(v * 1000, 3) if k != "count" else v)
                           for k, v in summary(latencies).items()}}


def simulate(n: int, *, count: int = 10, interval_s: float = 0.5, seed: int = 1,
             link_ms: float = 0.1) -> dict[str, Any]:
    """The same workload in the simulator (``n`` relay nodes, loopback-like links)."""
    from pqcnet.sim.crypto import verify_once

    sc = from_dict({
        "name": "waku-crosscheck", "nodes": n, "seed": seed,
        "duration_s": WARMUP_S + count * interval_s + SETTLE_S + 1,
        "network": {"latency": {"kind": "constant", "ms": link_ms}, "bandwidth_mbps": 1000.0},
        "gossipsub": {"D": min(6, max(1, n - 1)), "D_lo": min(4, max(1, n - 1)),
                      "D_hi": 12, "target_peers": max(min(6, n - 1), 1),
                      "bootstrap_peers": max(1, n - 1)},
        "roles": {"relayers": 0, "governance": 1},
        "workload": {"kind": "scale", "start_s": WARMUP_S},
    })
    with verify_once(True):
        world = World(sc)
        world.schedule_joins(0.0)
        for k in range(count):
            world.engine.at(WARMUP_S + k * interval_s, world.rate_limit, float(k + 1), 10,
                            f"d{k}")
        world.engine.run(sc.duration_s)
    others = [i for i in range(n) if i != world.gov]
    latencies = [world.rec.applied[f"d{k}"][i] - world.rec.issued[f"d{k}"]
                 for k in range(count) for i in others if i in world.rec.applied[f"d{k}"]]
    expected = count * len(others)
    return {"nodes": n, "directives": count, "expected": expected, "applied": len(latencies),
            "delivery": len(latencies) / expected if expected else None,
            "latency_ms": {k: (round(v * 1000, 3) if k != "count" else v)
                           for k, v in summary(latencies).items()}}


def side_by_side(measured: dict[str, Any], simulated: dict[str, Any]) -> str:
    """A Markdown table of the two runs."""
    rows = ["| | measured (go-waku) | simulated |", "|---|---|---|"]
    for key in ("nodes", "directives", "expected", "applied", "delivery"):
        rows.append(f"| {key} | {measured[key]} | {simulated[key]} |")
    for key in ("mean", "p50", "p95", "max"):
        rows.append(f"| latency {key} ms | {measured['latency_ms'][key]} | "
                    f"{simulated['latency_ms'][key]} |")
    return "\n".join(rows)
