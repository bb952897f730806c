"""A run directory is whole or absent: a write that fails or is stopped half-way leaves
the earlier results of the same run as they were, and nothing half-written behind."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from pqcnet._util.signals import Stopped
from pqcnet.sim import output
from pqcnet.sim.output import write_run
from pqcnet.sim.report import load_summaries
from pqcnet.sim.run import RunResult, run
from tests.sim.conftest import SCENARIOS, small

#: A small run of the committed scale scenario (a second or two).
SMALL = {"nodes": 20, "duration_s": 50, "workload.start_s": 10.0, "workload.drain_s": 25.0}


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
    from pqcnet.sim import output, report

    def slow_plots(result, target):  # the workers (forked) stop here, mid-write
        print("writing", result.summary["seed"], flush=True)
        time.sleep(120)
        return []

    output.make_plots = slow_plots
    with stopping("sweep"):
        report.sweep([sys.argv[1]], [20], [1, 2], Path(sys.argv[2]), jobs=2,
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
