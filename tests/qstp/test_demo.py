"""`pqcnet demo`: the steps do real work, and the command runs end to end."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pqcnet.cli.demo import STEPS, DemoState, run_steps
from pqcnet.identity import NodeIdentity

# the network step starts 3 nodes with their ledgers and control plane: minutes on a
# loaded 2-core machine
pytestmark = pytest.mark.timeout(900)


async def test_demo_steps_produce_a_verified_pq_tunnel(tmp_path: Path) -> None:
    state = await run_steps(DemoState(tmp_path, megabytes=2))
    assert state.results["group"] == "X25519MLKEM768"
    assert state.results["intact"] is True
    assert state.results["bytes"] == 2 * 1024 * 1024
    assert state.results["resumed"] is True
    # the identities the demo wrote are real and loadable
    relayer = NodeIdentity.load(tmp_path / "relayer", None)
    assert str(relayer.spiffe_id).endswith("/relayer/r1")
    assert len(STEPS) >= 5
    # the network step: the embedded twin of the compose network
    assert state.results["network_http_before"] == [200] * 5
    assert 429 in state.results["network_http_after"]  # the anchored rate-limit directive
    assert state.results["network_in_order"] is True
    assert state.results["network_received"] == state.results["network_pulled"] == 1000


def test_pqcnet_demo_command_runs() -> None:
    res = subprocess.run(
        [sys.executable, "-c", "from pqcnet.cli import main; main()", "demo", "--megabytes", "2"],
        capture_output=True, text=True, timeout=800)
    assert res.returncode == 0, res.stderr
    for needle in ("X25519MLKEM768", "intact (SHA-256 match)", "resumed", "Gbit/s",
                   "spiffe://demo.pqcnet/acme/relayer/r1"):
        assert needle in res.stdout
    # the relayer step: every frame delivered in order, acked, metered and proven
    assert re.search(r"in_order_exactly_once\s+yes", res.stdout), res.stdout
    assert re.search(r"metered\s+5000 frames", res.stdout), res.stdout
    assert "anchored in QS-DAG, inclusion ok" in res.stdout
    assert re.search(r"governance_pull\s+1000 frames over QSTP \(= received: yes\)",
                     res.stdout), res.stdout
    assert re.search(r"slash_directive\s+p1 refused by relayer-1", res.stdout), res.stdout
