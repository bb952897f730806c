#!/usr/bin/env python3
"""Generate the reference pages that mirror code: the CLI and the error tree.

Why generated: the CLI's ``--help`` and the exception classes *are* the reference; a
hand copy drifts with the first new option. This script renders them into the
generated blocks of ``docs/reference/cli.md`` and ``docs/reference/errors.md``; the
prose around the blocks stays hand-written. ``--check`` (run by
tests/docs/test_reference.py) exits 1 when a page is stale.

Usage::

    python tools/refdocs.py            # rewrite the generated blocks
    python tools/refdocs.py --check    # exit 1 if a page is stale
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path
from typing import Any

import click
from _docblock import update  # tools/ is on sys.path when run as a script

SCRIPT = "tools/refdocs.py"
#: help text width, fixed so the output does not depend on the terminal
WIDTH = 96
#: class attributes that say how an error appears on the wire or in metrics
ERROR_ATTRIBUTES = ("code", "outcome", "reason", "http_status", "grpc_code", "retriable")
#: packages whose modules are not imported to find errors (they hold no error classes
#: and importing them has costs: generated code, benchmark harnesses)
SKIP_PACKAGES = ("pqcnet.proto", "pqcnet.bench")


def cli_reference() -> str:
    """Every command's ``--help``, depth first, as markdown sections."""
    from pqcnet.cli import app

    settings = dict(app.context_settings)
    root = click.Context(app, info_name="pqcnet", terminal_width=WIDTH,
                         max_content_width=WIDTH, **settings)
    sections: list[str] = []

    def walk(cmd: click.Command, ctx: click.Context, path: list[str]) -> None:
        level = "#" * min(2 + len(path) - 1, 4)
        sections.append(f"{level} `{' '.join(path)}`\n\n```text\n{cmd.get_help(ctx).rstrip()}\n```")
        if isinstance(cmd, click.Group):
            for name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, name)
                if sub is None or sub.hidden:
                    continue
                walk(sub, click.Context(sub, info_name=name, parent=ctx, terminal_width=WIDTH,
                                        max_content_width=WIDTH), [*path, name])

    walk(app, root, ["pqcnet"])
    return "\n\n".join(sections)


def _import_all() -> None:
    import pqcnet

    for info in pkgutil.walk_packages(pqcnet.__path__, "pqcnet."):
        if not info.name.startswith(SKIP_PACKAGES):
            importlib.import_module(info.name)


def error_reference() -> str:
    """The tree of :class:`pqcnet.errors.PqcnetError` subclasses with their wire labels."""
    _import_all()
    from pqcnet.errors import PqcnetError

    lines = ["```text"]
    rows = ["| class | module | on the wire | meaning |", "|---|---|---|---|"]

    def walk(cls: type[Any], depth: int) -> None:
        lines.append(f"{'    ' * depth}{cls.__name__}")
        labels = ", ".join(f"{a}={cls.__dict__[a]}" for a in ERROR_ATTRIBUTES
                           if isinstance(cls.__dict__.get(a), (int, str)))
        rows.append(f"| `{cls.__name__}` | `{cls.__module__}` | {labels} | {_summary(cls)} |")
        for sub in sorted(cls.__subclasses__(), key=lambda c: (c.__module__, c.__name__)):
            if sub.__module__.startswith("pqcnet."):
                walk(sub, depth + 1)

    walk(PqcnetError, 0)
    lines.append("```")
    return "\n".join(lines) + "\n\n" + "\n".join(rows)


def _summary(cls: type[Any]) -> str:
    """First paragraph of the docstring, on one line, safe inside a table cell."""
    paragraph = (cls.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(paragraph.split()).replace("|", "/")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a page is stale")
    args = parser.parse_args(argv)
    docs = Path(__file__).resolve().parent.parent / "docs" / "reference"
    status = update(docs / "cli.md", {"cli": cli_reference()}, SCRIPT, check=args.check)
    status = max(status, update(docs / "errors.md", {"errors": error_reference()}, SCRIPT,
                                check=args.check))
    return status


if __name__ == "__main__":
    sys.exit(main())
