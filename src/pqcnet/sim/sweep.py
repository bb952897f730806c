"""``pqcnet sim sweep``: a grid of runs (scenarios x sizes x seeds), ``jobs`` at a time.

Each run is one forked process, single-threaded and deterministic, so the grid's results
do not depend on ``jobs`` — ``jobs=1`` included: a run the OOM killer takes fails
alone instead of taking the sweep (and its tally of the other runs) with it. The
processes are started and reaped here rather than by a pool, because of how a run can
end:

* it fails (a bug, an invalid state): its error comes back, the others go on, and the
  sweep ends with :class:`~pqcnet.sim.errors.SweepFailed` naming it;
* its process dies without answering (the OOM killer, a ``kill -9``): the run fails
  the same way, "killed by SIGKILL". ``multiprocessing.Pool`` waits for a lost task's
  answer for ever; ``ProcessPoolExecutor`` fails every run in flight
  (``BrokenProcessPool``) without saying which one died;
* the sweep is stopped (SIGINT/SIGTERM under :mod:`pqcnet._util.signals`): the runs in
  flight are terminated, not waited for (an executor would wait for them), and what
  their writes left is removed;
* the sweep itself is killed outright: its workers get SIGTERM from the kernel
  (:func:`~pqcnet._util.orphans.die_with_parent`) instead of running on unowned.

A run's answer is a few hundred bytes on a pipe; the parent waits on the pipes, and a
pipe that reports end-of-file before an answer is a process that died.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import signal
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from pqcnet._util.orphans import die_with_parent
from pqcnet.sim.config import load, override
from pqcnet.sim.errors import SweepFailed
from pqcnet.sim.output import dir_name, remove_stale, write_run
from pqcnet.sim.run import run

#: One run of a sweep: scenario file, overrides, results directory, plots.
Job = tuple[str, dict[str, Any], str, bool]
#: How a run ended: ``(index, run directory, None)`` or ``(index, run name, error)``.
Outcome = tuple[int, str, str | None]


def sweep(paths: list[str], sizes: list[int], seeds: list[int], out: Path, *, jobs: int,
          extra: dict[str, Any] | None = None, plots: bool = True,
          done: Callable[[str, str | None], None] | None = None) -> list[str]:
    """Run every (scenario, size, seed); returns the run directories in grid order.
    ``done(run, error)`` is called as each run ends (in the order they end). A run that
    fails does not stop the others; once all ended, :class:`SweepFailed` names the
    failed ones."""
    grid: list[Job] = [(p, {**(extra or {}), "nodes": n, "seed": s}, str(out), plots)
                       for p in paths for n in sizes for s in seeds]
    names = []
    for path, assignments, _, _ in grid:  # fail fast on a bad grid, before any work
        sc = override(load(path), assignments)
        names.append(dir_name(sc.name, sc.nodes, sc.seed))
    ended: dict[int, tuple[str, str | None]] = {}

    def note(outcome: Outcome) -> None:
        i, where, error = outcome
        ended[i] = (where, error)
        if done is not None:
            done(where, error)

    _in_processes(list(enumerate(grid)), names, out, max(1, jobs), note)
    failed = {where: error for where, error in (ended[i] for i in sorted(ended))
              if error is not None}
    dirs = [where for where, error in (ended[i] for i in sorted(ended)) if error is None]
    if failed:
        raise SweepFailed(failed, dirs)
    return dirs


def _in_processes(jobs_left: list[tuple[int, Job]], names: list[str], out: Path,
                  jobs: int, note: Callable[[Outcome], None]) -> None:
    """Run each job in its own forked process, at most ``jobs`` at a time."""
    ctx = multiprocessing.get_context("fork")
    running: dict[Connection, tuple[BaseProcess, int]] = {}
    try:
        while jobs_left or running:
            while jobs_left and len(running) < jobs:
                i, job = jobs_left.pop(0)
                answers, answer = ctx.Pipe(duplex=False)
                child: BaseProcess = ctx.Process(target=_worker, args=((i, job), answer),
                                                 name=f"sweep {names[i]}")
                child.start()
                answer.close()  # the child holds the only write end: EOF = it is gone
                running[answers] = (child, i)
            for ready in multiprocessing.connection.wait(list(running)):
                assert isinstance(ready, Connection)
                proc, i = running.pop(ready)
                try:
                    outcome: Outcome | None = ready.recv()
                except EOFError:  # no answer: the process died
                    outcome = None
                finally:
                    ready.close()
                proc.join()
                if outcome is None:
                    remove_stale(out, names[i])
                    outcome = (i, names[i], _death(proc.exitcode))
                note(outcome)
    except BaseException:  # stopped: terminate the runs in flight, remove their leftovers
        for proc, _ in running.values():
            proc.terminate()
        for answers, (proc, i) in running.items():
            proc.join()
            answers.close()
            remove_stale(out, names[i])
        raise


def _death(exitcode: int | None) -> str:
    """The error of a run whose process ended without an answer."""
    if exitcode is not None and exitcode < 0:
        how = f"killed by {signal.Signals(-exitcode).name}"
    else:
        how = f"exited with status {exitcode}"
    return f"WorkerDied: the run's process was {how} before it answered"


def _worker(job: tuple[int, Job], answer: Connection) -> None:
    """A sweep worker: leaves stopping to its parent (Ctrl-C reaches the whole process
    group, and the parent terminates the workers with SIGTERM, default action), and
    ends with it if the parent is killed outright."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent()
    answer.send(_one(job))
    answer.close()


def _one(job: tuple[int, Job]) -> Outcome:
    """Run and write one grid entry: ``(index, run directory, None)``, or ``(index,
    run name, "<ExceptionType>: text")`` when it failed — a failed run does not stop
    the others."""
    i, (path, assignments, out, plots) = job
    scenario = override(load(path), assignments)
    try:
        return i, str(write_run(run(scenario), Path(out), plots=plots)), None
    except Exception as exc:  # reported with the run's name: SweepFailed
        name = dir_name(scenario.name, scenario.nodes, scenario.seed)
        return i, name, f"{type(exc).__name__}: {exc}"


__all__ = ["Job", "sweep"]
