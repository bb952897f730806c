"""The ``--workers`` supervisors' restart policy (:class:`pqcnet.cli._common.Respawner`)
on a clock of the test's own: a worker that keeps dying soon after its start waits
longer each time (0.5 s doubling to 30 s) instead of being respawned five times a
second; one that ran ``STABLE_S`` is restarted at once. The real supervisor with a
worker SIGKILLed again and again is in tests/sentry/test_workers.py."""

from __future__ import annotations

import pytest

from pqcnet.cli._common import RESTART_MAX_S, STABLE_S, Respawner


class _Proc:
    """What the policy reads of a worker process."""

    def __init__(self) -> None:
        self.alive, self.exitcode = True, None

    def is_alive(self) -> bool:
        return self.alive

    def die(self) -> None:
        self.alive, self.exitcode = False, -9


def test_restart_waits_grow_with_quick_exits_and_reset_after_a_stable_run(
        capsys: pytest.CaptureFixture[str]) -> None:
    now = [0.0]
    spawned: list[tuple[int, float]] = []
    deaths: list[int] = []

    def spawn(i: int) -> _Proc:
        spawned.append((i, now[0]))
        return _Proc()

    procs = {0: _Proc(), 1: _Proc()}
    r = Respawner("test", procs, spawn, on_death=deaths.append, clock=lambda: now[0])
    procs[1].die()
    now[0] = 1.0
    r.poll()  # the first exit: restarted at once
    assert spawned == [(1, 1.0)] and deaths == [1]
    procs[1].die()  # again, 1 s after its start
    now[0] = 2.0
    r.poll()
    assert spawned == [(1, 1.0)] and r.due == {1: 2.5} and deaths == [1, 1]
    now[0] = 2.4
    r.poll()
    assert len(spawned) == 1  # still waiting
    now[0] = 2.5
    r.poll()
    assert spawned[-1] == (1, 2.5)
    waits = []
    for _ in range(8):
        procs[1].die()
        r.poll()
        waits.append(r.due[1] - now[0])
        r.poll()  # nothing new: a dead worker waiting is not counted twice
        now[0] = r.due[1]
        r.poll()
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, RESTART_MAX_S, RESTART_MAX_S, RESTART_MAX_S]
    assert len(deaths) == 2 + 8
    now[0] += STABLE_S  # a run long enough: the streak starts over
    procs[1].die()
    r.poll()
    assert spawned[-1] == (1, now[0])
    assert {i for i, _t in spawned} == {1} and set(deaths) == {1}  # worker 0 never died
    err = capsys.readouterr().err
    assert "test worker 1 exited (-9); restarting now" in err
    assert "test worker 1 exited (-9); restarting in 0.5 s (2 quick exits in a row)" in err
    assert "restarting in 30 s (10 quick exits in a row)" in err
