"""``pqcnet bench <name>``: run a benchmark from ``benchmarks/`` and print its JSON.

Each benchmark module ``benchmarks/<name>.py`` exposes ``run(**options) -> dict`` and a
click command ``cli``; this group just mounts them. Every result includes the
baseline measured in the same run and the ratio to it. A benchmark runs under
:func:`~pqcnet._util.signals.stopping`: SIGINT or SIGTERM stops it with its clean-up
done (its servers and relayers stopped, its broker state and NATS streams dropped) and
exit status 128 + signal.
"""

from __future__ import annotations

import importlib

import click

from pqcnet._util.signals import stopping

#: benchmark name -> module
BENCHMARKS: dict[str, str] = {
    "enroll": "pqcnet.bench.enroll",
    "memory": "pqcnet.bench.memory",
    "mesh": "pqcnet.bench.mesh",
    "parking": "pqcnet.bench.parking",
    "qsdag": "pqcnet.bench.qsdag",
    "qstp": "pqcnet.bench.qstp",
    "sentry": "pqcnet.bench.sentry",
    "relayer": "pqcnet.bench.relayer",
    "verify": "pqcnet.bench.verify",
    "websocket": "pqcnet.bench.websocket",
}


class _BenchGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(BENCHMARKS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in BENCHMARKS:
            return None
        command: click.Command = importlib.import_module(BENCHMARKS[cmd_name]).cli
        return command

    def invoke(self, ctx: click.Context) -> object:
        with stopping("pqcnet bench"):
            return super().invoke(ctx)


@click.group(cls=_BenchGroup)
def cli() -> None:
    """Benchmarks; each prints JSON with the same-run baseline and the ratio."""
