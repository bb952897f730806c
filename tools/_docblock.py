"""Generated blocks inside hand-written markdown: find, replace, check for staleness.

A generated block sits between two HTML comments, invisible when rendered::

    <!-- generated:NAME begin (tools/SCRIPT; do not edit) -->
    ...
    <!-- generated:NAME end -->

The prose around it stays hand-written; only the block is rewritten. Shared by the
generators in ``tools/`` so they all behave the same way under ``--check``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


class DocBlockError(Exception):
    """The page has no (or a broken) generated block of that name."""


def _markers(name: str) -> tuple[re.Pattern[str], str]:
    begin = re.compile(rf"<!-- generated:{re.escape(name)} begin[^>]*-->")
    return begin, f"<!-- generated:{name} end -->"


def splice(document: str, name: str, content: str, script: str) -> str:
    """``document`` with block ``name`` replaced by ``content``."""
    begin, end = _markers(name)
    m = begin.search(document)
    if not m:
        raise DocBlockError(f"no '<!-- generated:{name} begin' marker")
    stop = document.find(end, m.end())
    if stop < 0:
        raise DocBlockError(f"no '{end}' marker after the begin marker")
    head = f"<!-- generated:{name} begin ({script}; do not edit) -->"
    return f"{document[:m.start()]}{head}\n{content.strip()}\n{document[stop:]}"


def update(path: Path, blocks: dict[str, str], script: str, *, check: bool) -> int:
    """Rewrite (or, with ``check``, compare) the named blocks of ``path``.

    Returns the process exit status: 0 fresh/updated, 1 stale under ``check``,
    2 the page or a marker is missing (one line on stderr).
    """
    try:
        current = path.read_text(encoding="utf-8")
        fresh = current
        for name, content in blocks.items():
            fresh = splice(fresh, name, content, script)
    except (OSError, DocBlockError) as exc:
        print(f"error: {path}: {exc}", file=sys.stderr)
        return 2
    if fresh == current:
        return 0
    if check:
        print(f"{path} is stale: run `python {script}`", file=sys.stderr)
        return 1
    path.write_text(fresh, encoding="utf-8")
    print(f"{path}: updated")
    return 0
