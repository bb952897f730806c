"""Simulation errors, rooted in :class:`~pqcnet.errors.PqcnetError`.

::

    SimError
    ├── ScenarioError     a scenario file or an override is invalid (one clear line)
    ├── SimStateError     the simulated world reached a state the engine cannot drive
    │                     (a real coroutine suspended, an event scheduled in the past)
    └── SweepFailed       runs of a sweep failed (the others ended and were written)
"""

from __future__ import annotations

from pqcnet.errors import PqcnetError


class SimError(PqcnetError):
    """Root of the simulator's errors."""


class ScenarioError(SimError):
    """A scenario (YAML or override) is invalid."""


class SimStateError(SimError):
    """The engine was asked to do something it cannot do deterministically."""


class SweepFailed(SimError):
    """Runs of a sweep failed; ``failed`` maps each one's name to its error, ``written``
    lists the run directories of the others."""

    def __init__(self, failed: dict[str, str], written: list[str]) -> None:
        self.failed, self.written = failed, written
        runs = "; ".join(f"{name}: {error}" for name, error in failed.items())
        super().__init__(f"{len(failed)} of {len(failed) + len(written)} runs failed "
                         f"({runs}); the other {len(written)} are written")
