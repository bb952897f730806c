"""Errors of the node runtime (``pqcnet node run``), rooted in :class:`PqcnetError`::

    NodeError
    ├── NodeConfigError     the node file is unreadable, has unknown keys or bad values
    └── ShareServiceError   a Shamir share service refused, failed or answered nonsense

The CLI turns either into one ``error: ...`` line and exit status 1.
"""

from __future__ import annotations

from pqcnet.errors import PqcnetError


class NodeError(PqcnetError):
    """Root of node-runtime errors."""


class NodeConfigError(NodeError):
    """The node configuration is invalid; the message names the key."""


class ShareServiceError(NodeError):
    """The Shamir share service (:mod:`pqcnet.runtime.shares`) said no or was unreachable.

    ``code`` is the wire code (``bad_request``, ``not_found``, ``too_large``,
    ``timeout``) or a local one (``unavailable``, ``bad_reply``, ``bad_config``).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code

    @property
    def retriable(self) -> bool:
        """Whether asking the same custodian again later may succeed."""
        return self.code in ("unavailable", "timeout")


__all__ = ["NodeConfigError", "NodeError", "ShareServiceError"]
