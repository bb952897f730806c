"""Tiny asyncio helper shared by the agent's parts."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def maybe_await(result: Awaitable[T] | T) -> T:
    """``result``, awaited first if a plain-or-async callback returned an awaitable."""
    if inspect.isawaitable(result):
        return await result
    return result
