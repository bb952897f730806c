"""QS-DAG sync over the control plane on the embedded transport (2 and 3 nodes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pqcnet.mesh.envelope import NodeKeys
from pqcnet.mesh.qsdag_port import QsdagPort
from pqcnet.mesh.transport import InProcessHub, InProcessTransport
from pqcnet.qsdag import Ledger

from .dag_scenarios import converge_and_slash
from .harness import make_agent, make_agents, node_key, stop_all, until

pytestmark = pytest.mark.timeout(90)


@pytest.mark.parametrize("n", [2, 3])
async def test_ledgers_converge_and_refuse_slashed_author(tmp_path: Path, n: int) -> None:
    hub = InProcessHub()
    names = ["gov", "relayer-1", "sentry-1"][:n]
    await converge_and_slash(names, [InProcessTransport(hub) for _ in names], tmp_path)


async def test_keyring_learns_senders_from_the_ledger(tmp_path: Path) -> None:
    """``n2`` is in nobody's bootstrap keyring, only registered in the QS-DAG: once the
    others' ledgers hold its key, its announcements verify."""
    hub = InProcessHub()
    names = ["gov", "n1"]
    ledgers = [Ledger.open(tmp_path / f"ledger-{n}") for n in names]
    ledgers[0].init_genesis("pqcnet-test", "gov", node_key("gov"))
    for n in ("n1", "n2"):
        ledgers[0].register_author(n, node_key(n).public_key, registrar="gov",
                                   signer=node_key("gov"))
    agents = make_agents(names, [InProcessTransport(hub) for _ in names], tmp_path)
    for a, led in zip(agents, ledgers):
        a.ledger = QsdagPort(led, a.keys)
    n2 = make_agent(NodeKeys("n2", node_key("n2")), ["gov", "n1", "n2"],
                    InProcessTransport(hub), tmp_path)
    try:
        assert not agents[1].keyring.knows("n2")
        for a in [*agents, n2]:
            await a.start()
        await until(lambda: all(a.peers.is_live("n2", a.clock()) for a in agents), 20,
                    "n2 accepted via the ledger's key view")
        assert agents[1].keyring.knows("n2")
    finally:
        await stop_all([*agents, n2])
        for led in ledgers:
            led.close()


def test_slash_notice_built_on_a_pre_slash_vertex_still_syncs(tmp_path: Path) -> None:
    """The race behind a once-flaky go-waku governance run, made deterministic.

    ``rogue`` wrote a vertex R before its slash; the registrar ``gov`` had imported R,
    so gov's slash notice S descends from R. ``sentry`` learned of the slash (directive)
    before R reached it. Its mesh door must not orphan S forever by refusing R: R is
    held back and released once an honest vertex is seen to build on it, while a
    slashed author's vertex nobody honest builds on stays refused.
    """
    from pqcnet.qsdag import OpaqueRecord, VertexKind

    names = ["gov", "sentry", "rogue"]
    ledgers = {n: Ledger.open(tmp_path / f"ledger-{n}") for n in names}
    ledgers["gov"].init_genesis("pqcnet-test", "gov", node_key("gov"))
    for n in names[1:]:
        ledgers["gov"].register_author(n, node_key(n).public_key, registrar="gov",
                                       signer=node_key("gov"))
    ports = {n: QsdagPort(led, NodeKeys(n, node_key(n))) for n, led in ledgers.items()}
    try:
        base = [v.encode() for v in ledgers["gov"].export(ledgers["gov"].tips())]
        for n in ("sentry", "rogue"):
            assert ports[n].import_vertices(base) == len(base)
        r = ledgers["rogue"].append(VertexKind.PERFORMANCE_REPORT,
                                    OpaqueRecord("pqcnet.relayer.PerformanceReport", "rogue",
                                                 b"pre-slash"), "rogue", node_key("rogue"))
        r_blob = ledgers["rogue"].get(r.id).encode()
        assert ports["gov"].import_vertices([r_blob]) == 1
        ports["gov"].disable_author("rogue", "equivocation")  # registrar: anchors S
        assert ledgers["gov"].is_slashed("rogue")
        ports["sentry"].disable_author("rogue", "equivocation")  # not a registrar
        assert not ledgers["sentry"].is_slashed("rogue")
        # the pull answer arrives parents first, in chunks: R alone, then the rest
        missing = ports["gov"].export_for(ports["sentry"].tips(), 1000)
        assert missing[0] == r_blob
        assert ports["sentry"].import_vertices(missing[:1]) == 0  # held back, not known
        assert not ports["sentry"].knows(r.id)
        assert ports["sentry"].refused["slashed_author"] == 1
        ports["sentry"].import_vertices(missing[1:])
        assert ledgers["sentry"].is_slashed("rogue")  # S anchored, not orphaned
        assert ports["sentry"].knows(r.id)
        assert ports["sentry"].released_vertices == 1
        # a post-slash vertex of the rogue that nobody honest builds on stays out
        late = ledgers["rogue"].append(VertexKind.PERFORMANCE_REPORT,
                                       OpaqueRecord("pqcnet.relayer.PerformanceReport",
                                                    "rogue", b"late"), "rogue",
                                       node_key("rogue"))
        assert ports["sentry"].import_vertices([ledgers["rogue"].get(late.id).encode()]) == 0
        assert not ports["sentry"].knows(late.id)
    finally:
        for led in ledgers.values():
            led.close()
