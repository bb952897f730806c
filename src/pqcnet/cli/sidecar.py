"""``pqcnet sidecar``: see :mod:`pqcnet.cli.sentry`."""

from __future__ import annotations

from pqcnet.cli.sentry import sidecar_cli as cli

__all__ = ["cli"]
