"""``pqcnet publish``: see :mod:`pqcnet.cli.relayer`."""

from __future__ import annotations

from pqcnet.cli.relayer import publish_cli as cli

__all__ = ["cli"]
