#!/usr/bin/env python3
"""Generate the package table of ARCHITECTURE.md from the code and the layers contract.

Why generated: a hand-kept table of line counts and allowed imports is wrong after the
first refactor. This script derives every number from the tree, so the table cannot
drift without ``--check`` (run by tests/architecture/test_archtable.py) failing.

Sources of truth:

* the ``layers`` contract in ``pyproject.toml`` (``[tool.importlinter]``), which
  ``lint-imports`` enforces — "may import" is every package in a lower layer (plus the
  siblings of a ``:`` layer);
* ``src/pqcnet`` — files and physical lines of ``.py`` per top-level package (generated
  protobuf modules counted apart);
* grimp's import graph of ``src/pqcnet`` (the one import-linter checks) — "imports
  today", the lower packages a package really imports.

Usage::

    python tools/archtable.py            # rewrite the generated block of ARCHITECTURE.md
    python tools/archtable.py --check    # exit 1 if ARCHITECTURE.md is stale
    python tools/archtable.py --print    # print the table only
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from _docblock import update  # tools/ is on sys.path when run as a script

BLOCK = "archtable"
SCRIPT = "tools/archtable.py"
ROOT_PACKAGE = "pqcnet"
CONTRACT_ID = "layers"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py")


class ArchTableError(Exception):
    """The inputs cannot produce a table (no layers contract, a listed package missing)."""


@dataclass(frozen=True)
class Layer:
    """One line of the ``layers`` contract, top layer first."""

    index: int
    members: tuple[str, ...]
    optional: frozenset[str]
    independent: bool


@dataclass(frozen=True)
class PackageStats:
    files: int
    lines: int
    generated_lines: int


def read_layers(pyproject: Path) -> list[Layer]:
    """The layers of the contract with id ``layers``, in import-linter's syntax."""
    config = tomllib.loads(pyproject.read_text())
    contracts = config.get("tool", {}).get("importlinter", {}).get("contracts", [])
    for contract in contracts:
        if contract.get("id") == CONTRACT_ID and contract.get("type") == "layers":
            break
    else:
        raise ArchTableError(f"{pyproject}: no layers contract with id {CONTRACT_ID!r}")
    layers = []
    for index, raw in enumerate(contract["layers"], start=1):
        independent = ":" not in raw
        parts = [p.strip() for p in raw.replace(":", "|").split("|")]
        optional = frozenset(p[1:-1] for p in parts if p.startswith("(") and p.endswith(")"))
        members = tuple(p.strip("()") for p in parts)
        layers.append(Layer(index, members, optional, independent))
    return layers


def package_stats(src: Path, name: str) -> PackageStats | None:
    """Files and lines of one top-level package (a package dir or a single module)."""
    root = src / ROOT_PACKAGE / name
    files = sorted(root.rglob("*.py")) if root.is_dir() else []
    if not files and root.with_suffix(".py").is_file():
        files = [root.with_suffix(".py")]
    if not files:
        return None
    lines = generated = 0
    for path in files:
        count = len(path.read_text(encoding="utf-8").splitlines())
        if path.name.endswith(GENERATED_SUFFIXES):
            generated += count
        else:
            lines += count
    return PackageStats(len(files), lines, generated)


def imports_today(src: Path) -> dict[str, set[str]]:
    """Top-level package → the other pqcnet packages it imports (grimp, like lint-imports)."""
    sys.path.insert(0, str(src))
    try:
        import grimp  # dev extra; the same graph builder import-linter uses
        graph = grimp.build_graph(ROOT_PACKAGE, cache_dir=None)
    finally:
        sys.path.remove(str(src))
    out: dict[str, set[str]] = {}
    for module in graph.modules:
        parts = module.split(".")
        if len(parts) < 2:
            continue
        for imported in graph.find_modules_directly_imported_by(module):
            target = imported.split(".")
            if len(target) >= 2 and target[1] != parts[1]:
                out.setdefault(parts[1], set()).add(target[1])
    return out


def render(root: Path) -> str:
    """The markdown table (without markers) for the tree at ``root``."""
    src = root / "src"
    layers = read_layers(root / "pyproject.toml")
    used = imports_today(src)
    rows = [
        "| layer | package | files | lines | may import | imports today |",
        "|---:|---|---:|---:|---|---|",
    ]
    order = [m for layer in layers for m in layer.members]

    def rank(name: str) -> tuple[int, str]:  # layer order; an unplaced package last
        return (order.index(name) if name in order else len(order), name)

    total_files = total_lines = total_generated = 0
    for layer in layers:
        below = [m for lower in layers[layer.index:] for m in lower.members
                 if package_stats(src, m) is not None]
        for name in layer.members:
            stats = package_stats(src, name)
            if stats is None:
                if name in layer.optional:
                    rows.append(f"| {layer.index} | `{name}` | — | — | (reserved; not present) | |")
                    continue
                raise ArchTableError(f"layer {layer.index}: package {name!r} not found in {src}")
            siblings = [] if layer.independent else [m for m in layer.members if m != name]
            allowed = sorted(siblings) + below
            lines = f"{stats.lines:,}"
            if stats.generated_lines:
                lines += f" (+{stats.generated_lines:,} generated)"
            rows.append(
                f"| {layer.index} | `{name}` | {stats.files} | {lines} | "
                f"{_names(allowed)} | {_names(sorted(used.get(name, ()), key=rank))} |")
            total_files += stats.files
            total_lines += stats.lines
            total_generated += stats.generated_lines
    rows.append(f"| | **total** | {total_files} | {total_lines:,} "
                f"(+{total_generated:,} generated) | | |")
    return "\n".join(rows)


def _names(names: list[str]) -> str:
    return ", ".join(f"`{n}`" for n in names) if names else "—"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="repository root (default: this checkout)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if the table is stale")
    mode.add_argument("--print", action="store_true", help="print the table and exit")
    args = parser.parse_args(argv)
    try:
        table = render(args.root)
    except (ArchTableError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print:
        print(table)
        return 0
    return update(args.root / "ARCHITECTURE.md", {BLOCK: table}, SCRIPT, check=args.check)


if __name__ == "__main__":
    sys.exit(main())
