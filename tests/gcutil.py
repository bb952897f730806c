"""Counting objects with the cyclic garbage collector off.

Serving processes run the cyclic collector rarely (``pqcnet.cli._common.tune_gc``), so
what a closed connection or a failed request leaves must be freed by reference counting
alone; tests check it by counting live objects of a type while the collector is off.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


def live(kind: type) -> int:
    """Objects whose type is ``kind`` or a subclass, reachable or not."""
    return sum(1 for o in gc.get_objects() if isinstance(o, kind))


@contextlib.contextmanager
def collector_off() -> Iterator[None]:
    """Collect once, then keep the cyclic collector off for the block."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
