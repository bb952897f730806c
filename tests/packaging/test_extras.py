"""Each role imports only what its extra installs (checked on the real import graph).

The graph is read from the source with :mod:`ast`: every ``import`` a module can run,
at module level or inside a function, except those guarded by ``except ImportError``
(optional accelerators such as uvloop). The third-party modules a role reaches are
mapped to distributions and must be among the core requirements plus that role's extra.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import sys
from functools import cache
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.conftest import ROOT

SRC = ROOT / "src"

#: What each install target must be able to run.
ROLES: dict[str, tuple[str, ...]] = {
    "core": ("pqcnet.crypto", "pqcnet.identity", "pqcnet.qstp", "pqcnet.qsdag",
             "pqcnet.layer0", "pqcnet.mesh", "pqcnet.cli", "pqcnet.cli.ca", "pqcnet.cli.keys",
             "pqcnet.cli.ledger", "pqcnet.cli.mesh", "pqcnet.cli.qstp"),
    "sentry": ("pqcnet.sentry", "pqcnet.cli.sentry", "pqcnet.cli.sidecar",
               "pqcnet.cli.assertion"),
    "relayer": ("pqcnet.relayer", "pqcnet.cli.relayer", "pqcnet.cli.publish",
                "pqcnet.cli.subscribe", "pqcnet.cli.governance", "pqcnet.cli.ledger_query"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in SRC.rglob("*.py")}


def _parse(path: Path) -> ast.Module:
    """``ast.parse``, once more after CPython 3.11's spurious "AST constructor recursion
    depth mismatch" SystemError (python/cpython#106905; seen once in a CI run here, on a
    file that parses fine before and after)."""
    source = path.read_text()
    try:
        return ast.parse(source)
    except SystemError:
        return ast.parse(source)


@cache
def _imports(module: str) -> frozenset[str]:
    tree = _parse(MODULES[module])
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                for h in node.handlers):
            guarded.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return frozenset(out)


def reach(roots: tuple[str, ...]) -> tuple[set[str], set[str]]:
    """(pqcnet modules, third-party top-level names) reachable from ``roots``.

    A root that is a package brings all of its modules (a role ships its whole package).
    """
    stack = [m for m in MODULES if any(m == r or m.startswith(r + ".") for r in roots
                                       if r not in ("pqcnet.cli",))]
    stack += [r for r in roots if r == "pqcnet.cli"]
    seen: set[str] = set()
    third: set[str] = set()
    while stack:
        mod = stack.pop()
        if mod in seen:
            continue
        seen.add(mod)
        for name in _imports(mod):
            if name.split(".")[0] == "pqcnet":
                parts = name.split(".")
                stack += [p for k in range(1, len(parts) + 1)
                          if (p := ".".join(parts[:k])) in MODULES and p not in seen]
            elif (top := name.split(".")[0]) not in sys.stdlib_module_names:
                third.add(top)
    return seen, third


def _allowed(extra: str | None) -> set[str]:
    """Normalised distribution names installed by ``pqcnet`` (+ ``extra``), transitively."""
    wanted: set[str] = set()
    for line in md.requires("pqcnet") or []:
        req = Requirement(line)
        if req.marker is None or (extra and req.marker.evaluate({"extra": extra})):
            wanted.add(req.name.lower().replace("_", "-"))
    return wanted


def _dists_of(top_names: set[str]) -> dict[str, set[str]]:
    mapping = md.packages_distributions()
    return {t: {d.lower().replace("_", "-") for d in mapping.get(t, [])} for t in top_names}


@pytest.mark.parametrize("role", sorted(ROLES))
def test_role_imports_only_what_its_extra_installs(role: str) -> None:
    _mods, third = reach(ROLES[role])
    allowed = _allowed(None if role == "core" else role)
    missing = {t: d for t, d in _dists_of(third).items() if not d & allowed}
    assert not missing, f"{role} imports {missing} not installed by pqcnet[{role}]"


def test_roles_do_not_reach_each_other() -> None:
    sentry, _ = reach(ROLES["sentry"])
    relayer, _ = reach(ROLES["relayer"])
    core, _ = reach(ROLES["core"])
    assert not any(m.startswith("pqcnet.relayer") for m in sentry)
    assert not any(m.startswith("pqcnet.sentry") for m in relayer)
    assert not any(m.startswith(("pqcnet.relayer", "pqcnet.sentry")) for m in core)


def test_extras_are_declared() -> None:
    extras = set(md.metadata("pqcnet").get_all("Provides-Extra") or [])
    assert {"relayer", "sentry", "all", "dev"} <= extras
    assert "redis" in _allowed("relayer") and "redis" not in _allowed(None)
    assert "aiokafka" in _allowed("relayer") and "aiokafka" not in _allowed("sentry")
