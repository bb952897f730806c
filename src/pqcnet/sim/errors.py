"""Simulation errors, rooted in :class:`~pqcnet.errors.PqcnetError`.

::

    SimError
    ├── ScenarioError     a scenario file or an override is invalid (one clear line)
    └── SimStateError     the simulated world reached a state the engine cannot drive
                          (a real coroutine suspended, an event scheduled in the past)
"""

from __future__ import annotations

from pqcnet.errors import PqcnetError


class SimError(PqcnetError):
    """Root of the simulator's errors."""


class ScenarioError(SimError):
    """A scenario (YAML or override) is invalid."""


class SimStateError(SimError):
    """The engine was asked to do something it cannot do deterministically."""
