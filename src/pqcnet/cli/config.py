"""``pqcnet config``: the config schema — print it, or check a file against it.

``schema KIND`` prints the JSON Schema of a ``sentry``, ``relayer`` or ``node`` file
(what Helm's ``values.schema.json`` is generated from); ``check FILE --kind KIND``
validates a file exactly as the role's ``run`` would (the same code path as
``pqcnet sentry check`` and ``pqcnet node check``) and prints a JSON summary.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from pqcnet.runtime import schema


@click.group()
def cli() -> None:
    """Config files: print the JSON Schema, check a file."""


@cli.command("schema")
@click.argument("kind", type=click.Choice(schema.KINDS))
def schema_cmd(kind: str) -> None:
    """Print the JSON Schema (draft 2020-12) of a KIND config file."""
    click.echo(json.dumps(schema.json_schema(kind), indent=2, sort_keys=True))


@cli.command("check")
@click.argument("path", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--kind", required=True, type=click.Choice(schema.KINDS),
              help="What the file configures.")
def check(path: Path, kind: str) -> None:
    """Validate PATH as `run` would; print a JSON summary (exit 1 with one error line)."""
    click.echo(json.dumps(schema.check(path, kind), indent=2))
