"""``changed_keys``: what a hot reload names when the static part of a file changed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pqcnet._util.confdiff import MAX_REPORTED, changed_keys, plain


@dataclass(frozen=True)
class _Bounds:
    max_tunnels: int = 1024
    path: Path = Path("/x")


def test_nested_keys_are_named_by_their_dotted_path() -> None:
    old = plain({"listen": "a:1", "bounds": _Bounds(), "backends": {"b": {"timeout": 5}}})
    new = plain({"listen": "a:1", "bounds": _Bounds(max_tunnels=7),
                 "backends": {"b": {"timeout": 9}, "c": {"timeout": 1}}, "extra": 1})
    assert changed_keys(old, new) == ["backends.b.timeout", "backends.c", "bounds.max_tunnels",
                                      "extra"]
    assert changed_keys(new, new) == []
    assert changed_keys({"a": {"b": 1}}, {"a": 1}) == ["a"]  # a mapping replaced whole


def test_the_report_is_bounded() -> None:
    old = {f"k{i}": 0 for i in range(100)}
    assert len(changed_keys(old, {})) == MAX_REPORTED
