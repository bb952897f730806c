"""Bounds, refusals and response serialization of the sidecar's local HTTP side.

The requests themselves are parsed by llhttp through httptools in
:mod:`pqcnet.sentry.local_http` (the hand-written parser that lived here is gone).
:class:`HttpLimits` names every bound of the listener; a client that dribbles its
head (slowloris) is cut off after :attr:`HttpLimits.header_timeout` seconds and
holds one connection and a bounded buffer, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

from pqcnet.sentry.errors import WireError


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Named bounds of the local HTTP listener."""

    #: longest request target
    max_request_line: int = 8 * 1024
    #: whole header block, request line included
    max_head_bytes: int = 32 * 1024
    #: number of header fields
    max_headers: int = 100
    #: request body bytes
    max_body: int = 4 * 1024 * 1024
    #: seconds to receive a complete head (slowloris bound)
    header_timeout: float = 10.0
    #: seconds to receive the body once the head arrived
    body_timeout: float = 30.0
    #: seconds an idle keep-alive connection is kept
    idle_timeout: float = 60.0


class HttpError(WireError):
    """A request the listener refuses; ``status`` is what the app receives."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.http_status = status


REASONS = {100: "Continue", 200: "OK", 400: "Bad Request", 401: "Unauthorized",
           403: "Forbidden", 404: "Not Found", 408: "Request Timeout", 413: "Content Too Large",
           414: "URI Too Long", 417: "Expectation Failed", 429: "Too Many Requests",
           431: "Request Header Fields Too Large",
           500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
           503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported"}


def response_head(status: int, headers: list[tuple[str, str]]) -> bytes:
    """Serialize a status line and header block."""
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}"]
    for name, value in headers:
        if "\r" in name or "\n" in name or "\r" in value or "\n" in value:
            continue
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
