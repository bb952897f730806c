"""cancel_and_wait: tasks end before it returns, and the caller's own cancellation is
never swallowed (the hole of ``cancel(); suppress(CancelledError): await``)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from pqcnet._util.tasks import cancel_and_wait

pytestmark = pytest.mark.timeout(30)


def _slow_to_end(cleanup: float, ended: list[str]) -> asyncio.Task[None]:
    """A task whose cancellation takes ``cleanup`` s (a flush, a goodbye frame)."""

    async def run() -> None:
        try:
            await asyncio.sleep(3600)
        finally:  # deaf to further cancels until it is done
            deadline = asyncio.get_running_loop().time() + cleanup
            while (left := deadline - asyncio.get_running_loop().time()) > 0:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(left)
            ended.append("cleaned")

    return asyncio.create_task(run())


async def test_tasks_are_cancelled_and_have_ended() -> None:
    ended: list[str] = []
    a, b = _slow_to_end(0.05, ended), _slow_to_end(0.1, ended)
    await asyncio.sleep(0)
    await cancel_and_wait(a, None, b)
    assert a.cancelled() and b.cancelled()
    assert ended == ["cleaned", "cleaned"]


async def test_done_tasks_and_none_are_fine() -> None:
    async def quick() -> int:
        return 7

    t = asyncio.create_task(quick())
    await t
    await cancel_and_wait(t, None)
    await cancel_and_wait()
    assert t.result() == 7


async def test_callers_cancellation_is_raised_after_the_tasks_ended() -> None:
    """The stopper is cancelled while a task is still cleaning up: it waits the task
    out (nothing of it runs on), then raises its own CancelledError instead of
    returning as if nobody had asked it to stop."""
    ended: list[str] = []
    child = _slow_to_end(0.3, ended)
    after: list[str] = []

    async def stopper() -> None:
        await cancel_and_wait(child)
        after.append("carried on")  # must not happen: the stopper was cancelled

    await asyncio.sleep(0)
    stop = asyncio.create_task(stopper())
    await asyncio.sleep(0.05)
    stop.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await stop
    assert stop.cancelled()
    assert child.done() and ended == ["cleaned"]
    assert after == []


async def test_callers_timeout_is_a_timeout() -> None:
    """A close under ``asyncio.timeout`` whose task takes longer than the deadline:
    the deadline is reported (TimeoutError), not lost."""
    ended: list[str] = []
    child = _slow_to_end(0.3, ended)
    await asyncio.sleep(0)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await cancel_and_wait(child)
    assert ended == ["cleaned"]


async def test_an_error_while_ending_is_raised() -> None:
    class Flushed(Exception):
        pass

    async def run() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            raise Flushed("flush failed")

    t = asyncio.create_task(run())
    await asyncio.sleep(0)
    with pytest.raises(Flushed, match="flush failed"):
        await cancel_and_wait(t)
