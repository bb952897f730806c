"""QS-DAG sync over the control plane on the embedded transport (2 and 3 nodes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.transport import InProcessHub, InProcessTransport

from .dag_scenarios import converge_and_slash

pytestmark = pytest.mark.timeout(90)


@pytest.mark.parametrize("n", [2, 3])
async def test_ledgers_converge_and_refuse_slashed_author(tmp_path: Path, n: int) -> None:
    hub = InProcessHub()
    names = ["gov", "relayer-1", "sentry-1"][:n]
    await converge_and_slash(names, [InProcessTransport(hub) for _ in names], tmp_path)
