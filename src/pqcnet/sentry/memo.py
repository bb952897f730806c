"""Bounded memo tables for the per-RPC hot path.

RPC traffic repeats itself byte for byte: the same client sends the same request head
(same method, target, headers, the same session assertion for minutes), a backend
answers with the same response head. Profiling ``pqcnet sentry run`` and
``pqcnet sidecar`` under load showed parsing and re-encoding those identical heads
(protobuf, HTTP/1.1, header filters, HMACs) as the largest share of the Python CPU per
RPC. Every function memoised with a :class:`Memo` is pure (its result depends only on
the key), so a hit returns exactly what a fresh computation would.

Bounds: at most ``max_entries`` keys, and only keys/values up to ``max_item`` bytes
are remembered, so a memo holds at most ``max_entries * max_item`` bytes (plus Python
object overhead). When full it is simply cleared — no LRU bookkeeping on the hot
path; a workload with more distinct heads than the bound just recomputes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

#: Default number of remembered keys per memo table.
MEMO_ENTRIES = 512
#: Default largest key size (bytes) a memo table remembers.
MEMO_ITEM_BYTES = 8 * 1024


class Memo(Generic[K, V]):
    """A dict that forgets everything when it reaches ``max_entries``."""

    __slots__ = ("_d", "get", "max_entries", "max_item")

    def __init__(self, max_entries: int = MEMO_ENTRIES, max_item: int = MEMO_ITEM_BYTES) -> None:
        self._d: dict[K, V] = {}
        self.max_entries = max_entries
        self.max_item = max_item
        #: ``get(key)`` → remembered value or None (bound method of the dict: one
        #: attribute load on the hot path)
        self.get: Callable[[K], V | None] = self._d.get

    def put(self, key: K, value: V) -> V:
        """Remember ``value`` for ``key`` (the caller checked the size bound); returns it."""
        d = self._d
        if len(d) >= self.max_entries:
            d.clear()
        d[key] = value
        return value

    def __len__(self) -> int:
        return len(self._d)

    def clear(self) -> None:
        """Forget everything (tests, policy reload)."""
        self._d.clear()


def headers_size(headers: tuple[tuple[str, str], ...]) -> int:
    """Characters in a header block's names and values: the size a memo bounds when
    the key is a header tuple."""
    return sum(len(n) + len(v) for n, v in headers)


def memoized(memo: Memo[K, V], compute: Callable[[K], V],
             size: Callable[[K, V], int]) -> Callable[[K], V]:
    """``compute`` through ``memo``: a hit returns the remembered value; a miss computes
    it and remembers it when ``size(key, value) <= memo.max_item`` (the bound is on
    whichever side of the pair can be large)."""
    get, put, limit = memo.get, memo.put, memo.max_item

    def call(key: K) -> V:
        got = get(key)
        if got is not None:
            return got
        value = compute(key)
        return put(key, value) if size(key, value) <= limit else value

    return call
