"""Errors of the node runtime (``pqcnet node run``), rooted in :class:`PqcnetError`::

    NodeError
    └── NodeConfigError     the node file is unreadable, has unknown keys or bad values

The CLI turns either into one ``error: ...`` line and exit status 1.
"""

from __future__ import annotations

from pqcnet.errors import PqcnetError


class NodeError(PqcnetError):
    """Root of node-runtime errors."""


class NodeConfigError(NodeError):
    """The node configuration is invalid; the message names the key."""


__all__ = ["NodeConfigError", "NodeError"]
