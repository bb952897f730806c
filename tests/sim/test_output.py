"""A run directory is whole or absent: a write that fails or is stopped half-way leaves
the earlier results of the same run as they were, and nothing half-written behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from pqcnet._util.signals import Stopped
from pqcnet.cli import main
from pqcnet.sim import output, sweep
from pqcnet.sim.errors import SimStateError, SweepFailed
from pqcnet.sim.output import write_run
from pqcnet.sim.report import load_summaries
from pqcnet.sim.run import RunResult, run
from tests.sim.conftest import SCENARIOS, small

#: A small run of the committed scale scenario (a second or two).
_EXTRA = {"duration_s": 50, "workload.start_s": 10.0, "workload.drain_s": 25.0}
SMALL = {"nodes": 20, **_EXTRA}


def _run(**changes: Any) -> RunResult:
    return run(small("scale", **{**SMALL, **changes}))


def _tree(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _hidden(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"),
                                     Stopped(signal.SIGTERM)], ids=["disk-full", "SIGTERM"])
def test_a_write_that_fails_half_way_leaves_the_earlier_run_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: BaseException) -> None:
    out = tmp_path / "results"
    first = write_run(_run(), out, plots=False)
    before = _tree(first)
    second = _run(duration_s=60)  # same run name, other contents
    assert second.summary["scenario"] != json.loads(before["summary.json"])["scenario"]

    def fail(_result: RunResult, target: Path) -> list[str]:
        assert (target / "messages.csv").stat().st_size > 0  # half-way: some files in
        raise failure

    monkeypatch.setattr(output, "make_plots", fail)
    with pytest.raises(type(failure)):
        write_run(second, out, plots=True)
    assert _tree(first) == before
    assert _hidden(out) == []
    assert [s["_dir"] for s in load_summaries(out)] == [first.name]


def test_a_rerun_replaces_the_whole_directory(tmp_path: Path) -> None:
    """Before, a rerun wrote over the files it had and kept the rest: a plot of an
    earlier version of the scenario stayed beside the new summary."""
    out = tmp_path / "results"
    first = write_run(_run(), out, plots=False)
    (first / "delivery_over_time.png").write_bytes(b"from an earlier scenario")
    again = write_run(_run(duration_s=60), out, plots=False)
    assert again == first
    assert sorted(p.name for p in again.iterdir()) == ["messages.csv", "summary.json",
                                                        "timeline.csv"]
    assert json.loads((again / "summary.json").read_text())["scenario"]["duration_s"] == 60
    assert _hidden(out) == []


def test_the_report_skips_unfinished_writes(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = write_run(_run(), out, plots=False)
    partial = out / f".{done.name}.x1y2.partial"
    partial.mkdir()
    (partial / "summary.json").write_text('{"nodes": 20, "run"')  # cut short
    assert [s["_dir"] for s in load_summaries(out)] == [done.name]


SWEEP_STOPPED = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pqcnet._util.signals import stopping
    from pqcnet.sim import output, sweep

    def slow_plots(result, target):  # the workers (forked) stop here, mid-write
        print("writing", result.summary["seed"], flush=True)
        time.sleep(120)
        return []

    output.make_plots = slow_plots
    with stopping("sweep"):
        sweep.sweep([sys.argv[1]], [20], [1, 2], Path(sys.argv[2]), jobs=2,
                     extra={"duration_s": 50, "workload.start_s": 10.0,
                            "workload.drain_s": 25.0})
""")


@pytest.mark.timeout(120)
def test_a_sweep_stopped_while_its_workers_write_leaves_nothing_half_written(
        tmp_path: Path) -> None:
    """The sweep terminates its workers when stopped (SIGTERM, default action: no
    clean-up of their own), then removes what their writes left."""
    out = tmp_path / "results"
    proc = subprocess.Popen([sys.executable, "-c", SWEEP_STOPPED,
                             str(SCENARIOS / "scale.yaml"), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        seen = {proc.stdout.readline().split()[-1] for _ in range(2)}
        assert seen == {"1", "2"}
        assert len(list(out.glob(".scale-n20-s*.partial"))) == 2  # both mid-write
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_failed_run_does_not_stop_the_sweep_and_is_named(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, jobs: int) -> None:
    """Before, with ``--jobs 1`` the first failure ended the sweep (later runs never
    ran) and with ``--jobs 2`` it surfaced untyped once all ended, without saying which
    run failed."""
    out = tmp_path / "results"
    real_run = sweep.run

    def flaky(scenario: Any, **kw: Any) -> RunResult:
        if scenario.seed == 2:  # forked into the workers with jobs 2
            raise SimStateError("an event in the past")
        return real_run(scenario, **kw)

    monkeypatch.setattr(sweep, "run", flaky)
    ended: list[tuple[str, str | None]] = []
    with pytest.raises(SweepFailed) as exc:
        sweep.sweep([str(SCENARIOS / "scale.yaml")], [20], [1, 2, 3], out, jobs=jobs,
                     extra=_EXTRA, plots=False, done=lambda r, e: ended.append((r, e)))
    assert exc.value.failed == {"scale-n20-s2": "SimStateError: an event in the past"}
    assert exc.value.written == [str(out / "scale-n20-s1"), str(out / "scale-n20-s3")]
    assert "1 of 3 runs failed (scale-n20-s2: SimStateError: an event in the past)" in str(
        exc.value)
    assert len(ended) == 3 and dict(ended) == {
        str(out / "scale-n20-s1"): None,
        "scale-n20-s2": "SimStateError: an event in the past",
        str(out / "scale-n20-s3"): None}
    assert sorted(p.name for p in out.iterdir()) == ["scale-n20-s1", "scale-n20-s3"]
    assert [s["seed"] for s in load_summaries(out)] == [1, 3]


def test_sweep_cli_counts_runs_on_a_bar_and_lists_them_in_grid_order(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results"
    main(["sim", "sweep", str(SCENARIOS / "scale.yaml"), "--nodes", "20,30", "--seeds", "1",
          "--jobs", "2", "--no-plots", "--out", str(out),
          *(f"--set={k}={v}" for k, v in _EXTRA.items())])
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1]) == {
        "runs": [str(out / "scale-n20-s1"), str(out / "scale-n30-s1")]}
    assert "2/2" in captured.err  # the bar's last state


SWEEP_WORKER_KILLED = textwrap.dedent("""
    import os, sys, time
    from pqcnet.cli import main
    from pqcnet.sim import output

    def plots(result, target):  # forked into the workers; seed 2's waits to be killed
        if result.summary["seed"] == 2:
            print("writing", os.getpid(), flush=True)
            time.sleep(120)
        return []

    output.make_plots = plots
    main(["sim", "sweep", sys.argv[1], "--nodes", "20", "--seeds", "1,2,3",
          "--out", sys.argv[2], "--no-progress", *sys.argv[3:]])
""")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_worker_killed_outright_fails_its_run_and_the_sweep_still_ends(
        tmp_path: Path, jobs: str) -> None:
    """Before, a worker killed outright (the OOM killer, ``kill -9``) made the sweep wait
    for its answer for ever (``multiprocessing.Pool`` never hears of the lost task), and
    with ``--jobs 1`` the run *was* the sweep's process, so the sweep died with it.
    Now its run fails, named, with what killed it; the others are written and what the
    killed write left is removed. The kill comes from outside, as the OOM killer's."""
    out = tmp_path / "results"
    proc = subprocess.Popen([sys.executable, "-c", SWEEP_WORKER_KILLED,
                             str(SCENARIOS / "scale.yaml"), str(out), "--jobs", jobs,
                             *(f"--set={k}={v}" for k, v in _EXTRA.items())],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line[0] == "writing", line
        worker = int(line[1])
        assert worker != proc.pid
        assert len(list(out.glob(".scale-n20-s2.*.partial"))) == 1  # mid-write
        os.kill(worker, signal.SIGKILL)
        stdout, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 1, err[-2000:]
    assert ("1 of 3 runs failed (scale-n20-s2: WorkerDied: the run's process was killed "
            "by SIGKILL before it answered); the other 2 are written") in err
    assert stdout == ""  # no run list: the sweep failed
    assert sorted(p.name for p in out.iterdir()) == ["scale-n20-s1", "scale-n20-s3"]
    assert [s["seed"] for s in load_summaries(out)] == [1, 3]


WRITE_KILLED = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pqcnet.sim import output
    from pqcnet.sim.config import load, override
    from pqcnet.sim.run import run

    def slow_plots(result, target):
        print("writing", flush=True)
        time.sleep(120)
        return []

    output.make_plots = slow_plots
    scenario = override(load(sys.argv[1]), {"nodes": 20, "duration_s": 50,
                                            "workload.start_s": 10.0,
                                            "workload.drain_s": 25.0})
    output.write_run(run(scenario), Path(sys.argv[2]))
""")


@pytest.mark.timeout(120)
def test_what_a_killed_write_left_is_removed_by_the_next_write_of_that_run(
        tmp_path: Path) -> None:
    """Before, a ``sim run`` killed outright left its hidden partial directory for
    ever. The next write of the same run removes it — and only what writers known to be
    gone left: a write in progress in a live process, or from another host sharing the
    disk, is kept."""
    out = tmp_path / "results"
    proc = subprocess.Popen([sys.executable, "-c", WRITE_KILLED,
                             str(SCENARIOS / "scale.yaml"), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "writing"
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    (killed,) = out.glob(".scale-n20-s1.*.partial")
    assert killed.name.startswith(f".scale-n20-s1.{proc.pid}@")
    assert (killed / "messages.csv").stat().st_size > 0  # half-written, and hidden:
    assert load_summaries(out) == []
    host = killed.name.split("@", 1)[1].split(".", 1)[0]
    live = out / f".scale-n20-s1.{os.getpid()}@{host}.live1.partial"  # this process
    elsewhere = out / f".scale-n20-s1.{proc.pid}@another-host.away1.partial"
    other_run = out / f".scale-n20-s2.{proc.pid}@{host}.other1.partial"
    for d in (live, elsewhere, other_run):
        d.mkdir()
    written = write_run(_run(), out, plots=False)
    assert written.name == "scale-n20-s1"
    assert not killed.exists()
    assert _hidden(out) == sorted(d.name for d in (live, elsewhere, other_run))
