"""``pqcnet assertion``: see :mod:`pqcnet.cli.sentry`."""

from __future__ import annotations

from pqcnet.cli.sentry import assertion_cli as cli

__all__ = ["cli"]
