"""Scenarios run on both transports (in-process and real go-waku): QS-DAG convergence
over the control plane, and a slashed author's vertices refused everywhere."""

from __future__ import annotations

from pathlib import Path

from pqcnet.mesh.agent import AgentConfig, ControlPlaneAgent
from pqcnet.mesh.directives import Directive, SlashNotice, sign_directive
from pqcnet.mesh.messages import RouteEntry
from pqcnet.mesh.qsdag_port import QsdagPort
from pqcnet.mesh.transport import Transport
from pqcnet.qsdag import Ledger, OpaqueRecord, VertexKind

from .harness import FAST, GOV, make_agents, node_key, stop_all, until


def _ids(port: QsdagPort) -> set[bytes]:
    return set(port.ledger.ids())


async def converge_and_slash(names: list[str], transports: list[Transport], tmp: Path,
                             *, limit_s: float = 30.0, config: AgentConfig = FAST) -> None:
    """``names[0]`` is the registrar; the others start with empty ledgers."""
    ledgers = [Ledger.open(tmp / f"ledger-{n}") for n in names]
    ledgers[0].init_genesis("pqcnet-test", names[0], node_key(names[0]))
    for n in names[1:]:
        ledgers[0].register_author(n, node_key(n).public_key, registrar=names[0],
                                   signer=node_key(names[0]))
    agents: list[ControlPlaneAgent] = make_agents(names, transports, tmp, config=config)
    ports = []
    for a, led in zip(agents, ledgers):
        port = QsdagPort(led, a.keys)
        a.ledger = port
        ports.append(port)
    try:
        for a in agents:
            await a.start()
        await until(lambda: all(_ids(p) == _ids(ports[0]) for p in ports), limit_s,
                    "initial convergence")
        # every node now writes its own vertices; all ledgers converge again
        for a in agents[1:]:
            await a.advertise_routes([RouteEntry(f"topic-{a.node_id}", 1, a.node_id)])
        await until(lambda: len(_ids(ports[0])) == len(names) + len(names) - 1
                    and all(_ids(p) == _ids(ports[0]) for p in ports), limit_s,
                    "convergence after local writes")
        routing = ports[-1].ledger.views.routing.table()
        assert {f"topic-{n}" for n in names[1:]} <= set(routing)
        # slash the last node: every other ledger refuses its new vertices
        bad = agents[-1]
        slash = sign_directive(Directive.create(SlashNotice(bad.node_id, "equivocation"),
                                                now_ms=agents[0].clock()), GOV)
        await agents[0].issue_directive(slash)
        await until(lambda: all(p.is_disabled(bad.node_id) for p in ports[:-1]), limit_s,
                    "slash anchored and applied")
        directive_vertices = [
            v for v in ports[0].ledger.ids()
            if ports[0].ledger.get(v).kind == VertexKind.GOVERNANCE_DIRECTIVE]
        assert directive_vertices, "the directive was anchored before it took effect"
        rogue = ports[-1].ledger.append(
            VertexKind.PERFORMANCE_REPORT,
            OpaqueRecord("pqcnet.relayer.PerformanceReport", bad.node_id, b"fake"),
            bad.node_id, bad.keys.signing_key).id
        # its tips announcements are dropped as from a revoked sender ...
        before = [a.drops["revoked"] for a in agents[:-1]]
        await bad.publish_tips()
        await until(lambda: all(a.drops["revoked"] > b for a, b in zip(agents[:-1], before)),
                    limit_s, "slashed node's tips dropped")
        # ... and its vertex, however it reaches a ledger port, is refused
        blob = ports[-1].ledger.get(rogue).encode()
        for p in ports[:-1]:
            before_refused = p.refused["slashed_author"]
            assert p.import_vertices([blob]) == 0
            # (other vertices of the slashed node may have been refused already by sync)
            assert p.refused["slashed_author"] == before_refused + 1 and not p.knows(rogue)
    finally:
        await stop_all(agents)
        for led in ledgers:
            led.close()
