"""Errors of the node runtime (``pqcnet node run``), rooted in :class:`PqcnetError`::

    NodeError
    ├── NodeConfigError     the node file is unreadable, has unknown keys or bad values
    ├── ShareServiceError   a Shamir share service refused, failed or answered nonsense
    ├── HttpsError          HTTP/1.1 over PQ TLS failed (connect, handshake, framing)
    └── CaServiceError      the CA service answered with an error status (``status``, ``code``)

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


class HttpsError(NodeError):
    """HTTP/1.1 over PQ TLS (:mod:`pqcnet.runtime.https`) failed: unreachable,
    refused handshake, malformed or oversized message, timeout."""


class CaServiceError(NodeError):
    """A CA service request was refused (:mod:`pqcnet.runtime.ca_service`).

    ``status`` is the HTTP status (400 bad input, 401 bad/used/expired token or no
    client certificate, 403 policy or attestation, 404, 413, 429 rate limit) and
    ``code`` a short stable word for scripts and metrics.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.detail = message

    @property
    def retriable(self) -> bool:
        """Whether the same request may succeed later (rate limit, server trouble)."""
        return self.status == 429 or self.status >= 500


__all__ = ["CaServiceError", "HttpsError", "NodeConfigError", "NodeError", "ShareServiceError"]
