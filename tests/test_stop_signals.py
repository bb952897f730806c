"""SIGINT / SIGTERM stop a benchmark with its clean-up done, in every phase.

:func:`pqcnet._util.signals.stopping` is checked in a child process (a real signal,
a real exit status); then ``pqcnet bench relayer`` is stopped inside its same-run
NATS baselines — where it has a JetStream stream on the services' nats-server and,
for the Go client, ``nats bench`` processes of its own — and the stream list and the
process table are read from outside afterwards (the ``nats`` CLI, ``/proc``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import require_service
from tests.procs import PQCNET, descendants, running, stopped

#: A command under ``stopping``: a synchronous phase, then an event loop, each with a
#: clean-up that writes a line to argv[1] (the loop's clean-up awaits first).
_CHILD = textwrap.dedent("""
    import asyncio, signal, sys, time
    from pqcnet._util.signals import stopping
    log = open(sys.argv[1], "a", buffering=1)
    phase, hang = sys.argv[2], sys.argv[3] == "hang"

    async def serve():
        try:
            log.write("ready\\n")
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0.05)  # clean-up that needs the loop
            log.write("loop clean-up\\n")
            while hang:
                time.sleep(1)

    class Trip:
        def __del__(self):  # the stop lands here, where Python drops an exception
            signal.raise_signal(signal.SIGTERM)

    with stopping("child"):
        if phase == "destructor":
            try:
                log.write("ready\\n")
                Trip()
                time.sleep(3600)
            finally:
                log.write("sync clean-up\\n")
        elif phase == "sync":
            try:
                log.write("ready\\n")
                time.sleep(3600)
            finally:
                log.write("sync clean-up\\n")
                while hang:
                    time.sleep(1)
        else:
            asyncio.run(serve())
    """)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def _child(tmp_path: Path, phase: str, *, hang: bool = False, ignore_sigint: bool = False
           ) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """The :data:`_CHILD` command, started; SIGKILLed at the end if still running (a
    failing test must not leave a busy process behind)."""
    log = tmp_path / "log"
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(log), phase,
                             "hang" if hang else "-"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_ignore_sigint if ignore_sigint else None)
    try:
        _wait(lambda: log.exists() and "ready" in log.read_text(), 30, "the child to start")
        yield proc, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _wait(cond: Callable[[], bool], seconds: float, what: str) -> None:
    end = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.parametrize("phase", ["sync", "loop"])
@pytest.mark.parametrize("sig, ignore_sigint", [
    (signal.SIGTERM, False), (signal.SIGINT, False),
    (signal.SIGINT, True)],  # a command started with `&` from a script
    ids=["SIGTERM", "SIGINT", "SIGINT-inherited-ignored"])
def test_a_stop_signal_runs_the_clean_up_and_exits_128_plus_the_signal(
        tmp_path: Path, phase: str, sig: signal.Signals, ignore_sigint: bool) -> None:
    with _child(tmp_path, phase, ignore_sigint=ignore_sigint) as (proc, log):
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + sig, (proc.returncode, err)
    done = "sync clean-up" if phase == "sync" else "loop clean-up"
    assert log.read_text().splitlines() == ["ready", done]
    assert f"child: stopped by {sig.name} (clean-up done)" in err, err
    assert "Traceback" not in err, err


def test_a_stop_that_lands_in_a_destructor_is_delivered_again(tmp_path: Path) -> None:
    """The child's SIGTERM is handled inside a ``__del__`` (it raises the signal there),
    where Python drops an exception ("Exception ignored in"): the stop is delivered
    again and ends the run — the sleep after it — with its clean-up done."""
    with _child(tmp_path, "destructor") as (proc, log):
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, err)
    assert log.read_text().splitlines() == ["ready", "sync clean-up"]
    assert "Exception ignored" not in err and "Traceback" not in err, err


def test_a_second_signal_exits_at_once_when_the_clean_up_hangs(tmp_path: Path) -> None:
    with _child(tmp_path, "loop", hang=True) as (proc, log):
        proc.send_signal(signal.SIGTERM)
        _wait(lambda: "loop clean-up" in log.read_text(), 30, "the clean-up to start")
        assert proc.poll() is None  # hanging in its clean-up
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=30)
        assert proc.returncode == 128 + signal.SIGINT, (proc.returncode, err)
        assert "child: SIGINT again, exiting now" in err, err


# --------------------------------------------------------------------------- the bench


def _streams(url: str, ca: str, cli: str) -> set[str]:
    out = subprocess.run([cli, "--server", url, "--tlsca", ca, "stream", "ls", "--names"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return set(out.split())


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return ""


def _pqcnet(*args: str) -> subprocess.Popen[str]:
    """A ``pqcnet`` command in a process group of its own (killed whole if it hangs)."""
    return subprocess.Popen([PQCNET, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _reap(cmd: subprocess.Popen[str], started: set[int]) -> dict[int, str]:
    """After ``cmd`` ended (killed here if it did not): which of the processes it had
    started still run (pid -> command line) — each is then killed, as are the rest of
    its group. Processes in the middle of exiting get 10 s (multiprocessing's resource
    tracker ends only once the command's exit closed its pipe)."""
    if cmd.poll() is None:
        os.killpg(cmd.pid, signal.SIGKILL)
        cmd.communicate()
    end = time.monotonic() + 10
    while any(running(p) for p in started) and time.monotonic() < end:
        time.sleep(0.05)
    left = {p: _cmdline(p) for p in started if running(p)}
    for p in left:  # possibly in a session of its own: not in the command's group
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGCONT)
            os.kill(p, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(cmd.pid, signal.SIGKILL)
    return left


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("client", ["nats-py", "nats-go"])
def test_bench_relayer_stopped_in_its_nats_baseline_leaves_no_stream_and_no_process(
        client: str) -> None:
    """SIGTERM while the bench measures NATS JetStream: its stream is deleted from the
    services' nats-server (the ``nats`` CLI lists the same streams as before the run),
    no process it started is left (``nats bench`` included), exit status 143. Before,
    SIGTERM ended the bench on the spot there: the stream's file store stayed on the
    server and a ``nats bench js consume`` waited for messages for ever."""
    url = require_service("PQCNET_NATS_URL", "NATS JetStream")
    ca, cli = os.environ["PQCNET_NATS_CA"], os.environ["PQCNET_NATS_CLI"]
    before = _streams(url, ca, cli)
    prefix = "PQCB" if client == "nats-py" else "PQCG"
    bench = _pqcnet("bench", "relayer", "--backend", "embedded", "--frames", "40000",
                    "--paced-frames", "50", "--publishers", "2")
    started: set[int] = set()
    try:
        def in_phase() -> bool:
            nonlocal started
            if bench.poll() is not None:
                pytest.fail(f"the bench ended first: {bench.communicate()[1][-2000:]}")
            if client == "nats-go":  # its consumer runs through the Go measurement
                kids = descendants(bench.pid)
                if any("bench js consume" in _cmdline(p) for p in kids):
                    started = kids
                    return True
                return False
            return any(s.startswith(prefix) for s in _streams(url, ca, cli) - before)

        _wait(in_phase, 300, f"the bench's {client} baseline")
        started |= descendants(bench.pid)
        bench.send_signal(signal.SIGTERM)
        out, err = bench.communicate(timeout=120)
    finally:
        orphans = _reap(bench, started)
    assert bench.returncode == 128 + signal.SIGTERM and out == "", (bench.returncode, err)
    assert "pqcnet bench: stopped by SIGTERM (clean-up done)" in err, err[-2000:]
    assert started, "the bench had processes of its own"
    assert orphans == {}
    assert _streams(url, ca, cli) == before


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_chaos_run_stopped_while_it_pauses_a_process_leaves_nothing_running(
        tmp_path: Path, sig: signal.Signals) -> None:
    """SIGTERM to ``pqcnet chaos run`` at the moment one of its processes is SIGSTOPped
    (a pause fault): the run stops its relayer and clients — the paused one continued
    and stopped too — and exits 143. Before, SIGTERM ended the harness on the spot:
    its relayer and clients (each in a session of its own) ran on, the paused one
    stopped for ever. SIGKILL runs no clean-up of the harness's own: the kernel ends
    what it started (PR_SET_PDEATHSIG with SIGKILL — a paused child would hold a
    SIGTERM until a SIGCONT nobody sends); before, all of it ran on."""
    chaos = _pqcnet("chaos", "run", "--minutes", "1", "--backend", "embedded",
                    "--no-baseline", "--faults", "40", "--seed", "3", "--rate", "50",
                    "--workdir", str(tmp_path / "w"))
    started: set[int] = set()
    try:
        def pausing() -> bool:
            nonlocal started
            if chaos.poll() is not None:
                pytest.fail(f"the run ended first: {chaos.communicate()[1][-2000:]}")
            kids = descendants(chaos.pid)
            started |= kids
            return any(stopped(p) for p in kids)

        _wait(pausing, 120, "a pause fault")
        chaos.send_signal(sig)
        _out, err = chaos.communicate(timeout=120)
    finally:
        left = _reap(chaos, started)  # what still ran 10 s after the harness ended
    assert len(started) >= 3, "a relayer, a subscriber and publishers"
    assert left == {}, left
    if sig == signal.SIGTERM:
        assert chaos.returncode == 128 + signal.SIGTERM, (chaos.returncode, err[-2000:])
        assert "pqcnet chaos run: stopped by SIGTERM (clean-up done)" in err, err[-2000:]


@pytest.mark.timeout(300)
def test_demo_stopped_mid_run_removes_its_temporary_directory(tmp_path: Path) -> None:
    """The demo's temporary directory holds a CA's private key: SIGTERM mid-run
    removes it as a finished run does (before, the process died and left it)."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    demo = subprocess.Popen([PQCNET, "demo", "--megabytes", "4096"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _wait(lambda: any((d / "ca").exists() for d in tmp_path.glob("pqcnet-demo-*")),
              120, "the demo's CA")
        demo.send_signal(signal.SIGTERM)
        _out, err = demo.communicate(timeout=60)
    finally:
        _reap(demo, set())
    assert demo.returncode == 128 + signal.SIGTERM, (demo.returncode, err[-2000:])
    assert "pqcnet demo: stopped by SIGTERM (clean-up done)" in err, err[-2000:]
    assert list(tmp_path.glob("pqcnet-demo-*")) == []


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sim_sweep_stopped_mid_run_terminates_its_workers(tmp_path: Path,
                                                          sig: signal.Signals) -> None:
    """``pqcnet sim sweep --jobs 2`` stopped while both workers simulate 1000 nodes:
    the workers are terminated (not waited for: a run takes minutes), no run directory
    is written, and the exit status says which signal. Before, SIGTERM killed the
    parent alone and left its two busy workers running; SIGINT printed a traceback
    from every process."""
    out = tmp_path / "results"
    sweep = _pqcnet("sim", "sweep", "simulations/scenarios/scale.yaml", "--nodes", "1000",
                    "--seeds", "1,2", "--jobs", "2", "--no-plots", "--out", str(out))
    started: set[int] = set()
    try:
        def busy() -> bool:
            if sweep.poll() is not None:
                pytest.fail(f"the sweep ended first: {sweep.communicate()[1][-2000:]}")
            kids = descendants(sweep.pid)
            started.update(kids)
            return len(kids) >= 2

        _wait(busy, 120, "two sweep workers")
        time.sleep(1.0)  # inside their runs
        if sig == signal.SIGINT:  # Ctrl-C: the terminal signals the whole process group
            os.killpg(sweep.pid, sig)
        else:  # `kill PID`: the parent alone
            sweep.send_signal(sig)
        _out, err = sweep.communicate(timeout=60)
    finally:
        left = _reap(sweep, started)
    assert sweep.returncode == 128 + sig, (sweep.returncode, err[-2000:])
    assert f"pqcnet sim sweep: stopped by {sig.name} (clean-up done)" in err, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert left == {}
    assert not list(out.glob("*/summary.json"))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("bench, args, up", [
    ("relayer", ["--backend", "embedded", "--frames", "2000000", "--no-baselines"],
     ["relayer run"]),
    ("sentry", ["--workers", "1", "--requests", "200000"],
     ["sentry run", "sidecar", "nginx", "multiprocessing"]),
    # killed in a half-load phase: vegeta offers the load for --seconds (12 s)
    ("sentry", ["--workers", "1", "--requests", "100", "--seconds", "12"],
     ["sentry run", "sidecar", "vegeta attack"]),
], ids=["relayer", "sentry", "sentry-vegeta"])
def test_a_bench_killed_outright_takes_its_servers_with_it(
        bench: str, args: list[str], up: list[str]) -> None:
    """SIGKILL (the OOM killer, a CI timeout) gives a bench no clean-up of its own; the
    servers it started — relayer; sentry, sidecar, nginx, the backend — must not run
    on, busy and holding ports. Each is started so that Linux sends it SIGTERM when the
    bench dies (PR_SET_PDEATHSIG, pqcnet._util.orphans); read from /proc afterwards.
    Before, a bench killed by a test's timeout left its relayer running for the rest
    of the CI run. The load generator vegeta must end as soon (an attack outliving
    the bench would load the machine for the rest of its duration)."""
    cmd = _pqcnet("bench", bench, *args)
    started: set[int] = set()
    try:
        def servers_up() -> bool:
            if cmd.poll() is not None:
                pytest.fail(f"the bench ended first: {cmd.communicate()[1][-2000:]}")
            started.update(descendants(cmd.pid))
            lines = [_cmdline(p) for p in started if running(p)]
            return all(any(word in line for line in lines) for word in up)

        _wait(servers_up, 180, f"the bench's servers ({', '.join(up)})")
        # serving, inside the measurement (killed while starting, a server's ready line
        # met a closed pipe and it exited by itself); an attack has ~11 s left
        time.sleep(1.0 if "vegeta attack" in up else 5.0)
        started.update(descendants(cmd.pid))
        attacks = {p for p in started if "vegeta attack" in _cmdline(p)}
        os.kill(cmd.pid, signal.SIGKILL)  # the bench alone, not its process group
        cmd.communicate(timeout=30)
        killed = time.monotonic()
        # a load generator ends at once, long before its attack would have: its guard
        # sends SIGTERM, and its results pipe is gone too (SIGPIPE at its next write
        # — which alone also ends it: this checks the outcome, not which one did)
        while any(running(p) for p in attacks) and time.monotonic() < killed + 5:
            time.sleep(0.1)
        attacking = {p: _cmdline(p) for p in attacks if running(p)}
        while any(running(p) for p in started) and time.monotonic() < killed + 30:
            time.sleep(0.1)
        left = {p: _cmdline(p) for p in started if running(p)}
    finally:
        _reap(cmd, started)
    assert attacks or "vegeta attack" not in up, "killed outside the vegeta phase"
    assert attacking == {}, attacking
    assert left == {}, left
