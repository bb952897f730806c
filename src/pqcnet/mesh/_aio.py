"""Tiny asyncio helper shared by the agent's parts."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable


async def maybe_await(result: Awaitable[None] | None) -> None:
    """Await ``result`` if a plain-or-async callback returned an awaitable."""
    if inspect.isawaitable(result):
        await result
