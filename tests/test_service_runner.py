"""``run_until_signalled``: the one runner of long-lived services (``pqcnet.cli._common``).

Hot-path services (``fast_loop``: relayer, sentry, sidecar) tune the garbage collector
once serving — what they had allocated until then frozen out of full collections, young
collections less often; other services keep CPython's defaults."""

from __future__ import annotations

import gc
import os
import signal
from collections.abc import Iterator

import pytest

from pqcnet.cli._common import GC_YOUNG_THRESHOLD, run_until_signalled


@pytest.fixture
def restore_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    gc.unfreeze()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.parametrize("fast", [True, False])
def test_hot_path_services_tune_the_gc_once_serving(fast: bool, restore_gc: None) -> None:
    seen: dict[str, object] = {}
    stopped: list[str] = []

    async def start() -> str:
        return "service"

    async def stop(service: str) -> None:
        stopped.append(service)

    def ready(service: str) -> None:
        seen["threshold"] = gc.get_threshold()[0]
        seen["frozen"] = gc.get_freeze_count()
        os.kill(os.getpid(), signal.SIGTERM)  # handled by the runner: a clean stop

    before = gc.get_threshold()[0]
    assert gc.get_freeze_count() == 0
    run_until_signalled(start, stop, ready, fast_loop=fast)
    assert stopped == ["service"]
    if fast:
        assert seen["threshold"] == GC_YOUNG_THRESHOLD
        assert isinstance(seen["frozen"], int) and seen["frozen"] > 1000
    else:
        assert seen == {"threshold": before, "frozen": 0}
