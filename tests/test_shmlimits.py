"""The lock of the workers' shared limiter segment (:class:`~pqcnet._util.shmlimits.\
SegmentLock`, a robust mutex) when a worker dies holding it, and between the threads
of one process.

A semaphore (the ``multiprocessing`` lock it replaced) stays taken when its holder is
SIGKILLed, and every worker then blocks on its next request: the child here is killed
*while it holds the lock*, and the survivors must go on — taking, and giving back, so
the mutex must also have been made consistent again."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest

from pqcnet._util.shmlimits import SharedLimitState, fingerprint

pytestmark = pytest.mark.timeout(120)


class _Rate(NamedTuple):
    rate: float
    burst: float


PLAN = _Rate(rate=1.0, burst=5.0)
ACME = fingerprint("acme")


def _hold_then_wait(path: str, held: Any) -> None:
    """Child: take the segment's lock and keep it until killed."""
    state = SharedLimitState.attach(path)
    state.lock.__enter__()
    held.set()
    signal.pause()


@pytest.fixture
def segment() -> Iterator[tuple[SharedLimitState, SharedLimitState]]:
    owner = SharedLimitState.create(workers=2, slots=64, held_slots=8,
                                    prefix="pqcnet-test-lock-")
    other = SharedLimitState.attach(owner.path)
    yield owner, other
    other.close()
    owner.close()


def _take_in_thread(state: SharedLimitState) -> threading.Event:
    """A take on a thread of its own; the event is set once it got through."""
    done = threading.Event()

    def take() -> None:
        state.take(ACME, PLAN, 100.0)
        done.set()

    threading.Thread(target=take, daemon=True).start()
    return done


def test_a_worker_killed_holding_the_lock_does_not_wedge_the_others(
        segment: tuple[SharedLimitState, SharedLimitState]) -> None:
    owner, other = segment
    ctx = multiprocessing.get_context("spawn")
    held = ctx.Event()
    child = ctx.Process(target=_hold_then_wait, args=(owner.path, held), daemon=True)
    child.start()
    try:
        assert held.wait(60), "the child never took the lock"
        done = _take_in_thread(other)
        assert not done.wait(0.5), "a take got in while another process held the lock"
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
        assert child.exitcode == -signal.SIGKILL
        assert done.wait(30), "the dead holder's lock was never released"
    finally:
        if child.is_alive():
            child.kill()
            child.join()
    # both live processes' views go on taking from the one bucket: 5 burst, 1 taken above
    for _ in range(4):
        assert owner.take(ACME, PLAN, 100.0)[0] == 0.0
    wait, tokens = other.take(ACME, PLAN, 100.0)
    assert wait == pytest.approx(1.0) and tokens == pytest.approx(0.0)
    owner.reset_worker(1)  # the supervisor's path after a death takes the lock too


def test_threads_of_one_process_exclude_each_other(
        segment: tuple[SharedLimitState, SharedLimitState]) -> None:
    """Two threads on one state (one process): the second waits until the first lets
    go (the semaphore did this; so must its replacement)."""
    owner, _other = segment
    with owner.lock:
        done = _take_in_thread(owner)
        assert not done.wait(0.5), "a second thread got the lock its first thread held"
    assert done.wait(30)
