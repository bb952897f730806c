"""``pqcnet subscribe``: see :mod:`pqcnet.cli.relayer`."""

from __future__ import annotations

from pqcnet.cli.relayer import subscribe_cli as cli

__all__ = ["cli"]
