"""Scenario fixtures: the committed YAML files, shrunk to test size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pqcnet.sim.config import Scenario, load, override

SCENARIOS = Path(__file__).resolve().parents[2] / "simulations" / "scenarios"


def small(name: str, **changes: Any) -> Scenario:
    """``simulations/scenarios/<name>.yaml`` with test-size overrides."""
    return override(load(SCENARIOS / f"{name}.yaml"), changes)
