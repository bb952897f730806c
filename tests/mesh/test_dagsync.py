"""QS-DAG sync over the control plane on the embedded transport (2 and 3 nodes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.envelope import NodeKeys
from mesh.qsdag_port import QsdagPort
from mesh.transport import InProcessHub, InProcessTransport
from qsdag import Ledger

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
