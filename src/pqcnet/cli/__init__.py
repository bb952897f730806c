"""The ``pqcnet`` command line: one click group, subcommands loaded lazily.

Each area owns its commands in ``pqcnet/cli/<area>.py`` exposing a click object
named ``cli``; add it to :data:`COMMANDS` and nothing else changes. Lazy loading
keeps ``pqcnet --help`` fast and lets a broken optional area fail only its own
commands. Any :class:`~pqcnet.errors.PqcnetError` escaping a command is printed as a
one-line error with exit status 1, never a traceback.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from pqcnet.errors import PqcnetError

#: subcommand name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("pqcnet.cli.demo", "Run the end-to-end demo on the embedded backends."),
    "bench": ("pqcnet.cli.bench", "Run a benchmark and print JSON."),
    "mesh": ("pqcnet.cli.mesh", "Control plane over Waku: announce, directives, observe."),
    "ledger": ("pqcnet.cli.ledger", "QS-DAG ledger: init, append, show, verify, tips, anchor."),
    "ca": ("pqcnet.cli.ca", "Mesh CA: init, issue, sign-csr, revoke, crl, bundle, serve, token."),
    "keys": ("pqcnet.cli.keys", "Node keys: gen, csr."),
    "qstp": ("pqcnet.cli.qstp", "QSTP diagnostics: serve (test server), connect (test client)."),
    "sentry": ("pqcnet.cli.sentry", "Sentry RPC edge: run, check."),
    "assertion": ("pqcnet.cli.assertion", "Session assertions: keygen, issue, inspect."),
    "sidecar": ("pqcnet.cli.sidecar", "Local plaintext port -> QSTP -> sentry (http|grpc|tcp)."),
    "relayer": ("pqcnet.cli.relayer", "Relayer node: run, dev-identities."),
    "publish": ("pqcnet.cli.publish", "Send frames to a relayer over QSTP."),
    "subscribe": ("pqcnet.cli.subscribe", "Receive a customer's frames from a relayer."),
    "governance": ("pqcnet.cli.governance", "Governance gRPC queries: pull volume and reports."),
    "node": ("pqcnet.cli.node", "Run a relayer or sentry (run, check); join the mesh (enroll)."),
    "config": ("pqcnet.cli.config", "Config files: schema (JSON Schema), check FILE --kind."),
    "sim": ("pqcnet.cli.sim", "Simulations of the overlay: run, sweep, report."),
    "chaos": ("pqcnet.cli.chaos", "Fault runs checked from client histories: run, check."),
    "verify": ("pqcnet.cli.verify",
               "Check volume receipts and proofs with public keys: receipt, proof, fetch-receipt."),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return None
        module = importlib.import_module(entry[0])
        command: click.Command = module.cli
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--log-json/--no-log-json", default=False, help="Structured JSON log lines.")
@click.version_option(package_name="pqcnet", prog_name="pqcnet")
def app(log_level: str, log_json: bool) -> None:
    """pqcnet — post-quantum DePIN overlay: QSTP tunnels, sentries, relayers, QS-DAG, mesh."""
    from pqcnet.runtime.logging import configure

    configure(log_level, json_lines=log_json)


def main(argv: list[str] | None = None) -> Any:
    """Console-script entry point."""
    try:
        return app.main(args=argv, prog_name="pqcnet", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except PqcnetError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
