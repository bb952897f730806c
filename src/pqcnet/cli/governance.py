"""``pqcnet governance``: see :mod:`pqcnet.cli.relayer`."""

from __future__ import annotations

from pqcnet.cli.relayer import governance_cli as cli

__all__ = ["cli"]
