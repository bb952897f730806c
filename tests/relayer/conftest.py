"""Bus factories for the relayer tests: each yields ``make(**kw) -> Bus`` sharing one
namespace (path / key prefix / topic) so a second ``make()`` is a restart."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from pqcnet.relayer.bus.base import Bus

BusFactory = Callable[..., Bus]


@pytest.fixture
async def redis_bus_factory(redis_url: str) -> AsyncIterator[BusFactory]:
    from pqcnet.relayer.bus.redis_streams import RedisStreamsBus

    prefix = f"test:{uuid.uuid4().hex[:10]}"
    made: list[RedisStreamsBus] = []

    def make(**kw: Any) -> Bus:
        kw.setdefault("shards", 4)
        bus = RedisStreamsBus(redis_url, prefix=prefix, **kw)
        made.append(bus)
        return bus

    yield make
    cleaner = RedisStreamsBus(redis_url, prefix=prefix)
    keys = [k async for k in cleaner.client.scan_iter(match=f"{prefix}:*")]
    if keys:
        await cleaner.client.delete(*keys)
    await cleaner.close()
    for b in made:
        await b.close()


@pytest.fixture
def embedded_bus_factory(tmp_path: Path) -> BusFactory:
    from pqcnet.relayer.bus.embedded import EmbeddedBus

    def make(**kw: Any) -> Bus:
        kw.setdefault("shards", 4)
        kw.pop("consumer", None)
        return EmbeddedBus(tmp_path / "bus", **kw)

    return make
