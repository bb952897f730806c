"""A minimal, strict, bounded HTTP/1.1 server side for the sidecar's localhost port.

Only what an unmodified local app needs to reach a backend: request line, headers,
a ``Content-Length`` body, keep-alive. Everything else is refused with a clear
status instead of guessed at: ``Transfer-Encoding`` bodies (501), obsolete line
folding, bare LF, duplicate or invalid ``Content-Length`` (400), oversized request
line / header block / header count / body (414 / 431 / 413). A client that dribbles
its head (slowloris) is cut off after :attr:`HttpLimits.header_timeout` seconds; it
holds one connection and a bounded buffer, nothing else.

:func:`parse_head` is pure (bytes in, :class:`HttpRequest` or :class:`HttpError` out)
so it is fuzzed without sockets; :func:`read_request` is the asyncio glue.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

from pqcnet.sentry.errors import WireError
from pqcnet.sentry.memo import Memo

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_TARGET = re.compile(rb"^/[\x21-\x7e]*$")
_VALUE = re.compile(rb"^[\t\x20-\x7e\x80-\xff]*$")
#: Parsed request heads up to this size are memoised.
PARSE_MEMO_MAX_HEAD = 2 * 1024


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Named bounds of the local HTTP listener."""

    #: longest request line (method, target, version)
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


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """A parsed request head."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    content_length: int
    keep_alive: bool


_parsed: Memo[bytes, tuple[HttpLimits, HttpRequest]] = Memo(max_item=PARSE_MEMO_MAX_HEAD)


def parse_head(block: bytes, limits: HttpLimits) -> HttpRequest:
    """Parse ``request-line CRLF *(field CRLF) CRLF`` strictly.

    Memoised per ``block`` and ``limits`` (a local app repeats its heads byte for byte);
    only heads that parsed are remembered, refusals are re-derived every time."""
    got = _parsed.get(block)
    if got is not None and (got[0] is limits or got[0] == limits):
        return got[1]
    req = _parse_head(block, limits)
    if len(block) <= _parsed.max_item:
        _parsed.put(block, (limits, req))
    return req


def _parse_head(block: bytes, limits: HttpLimits) -> HttpRequest:
    if not block.endswith(b"\r\n\r\n"):
        raise HttpError(400, "request head must end with CRLF CRLF")
    lines = block[:-4].split(b"\r\n")
    line = lines[0]
    if len(line) > limits.max_request_line:
        raise HttpError(414, f"request line over {limits.max_request_line} bytes")
    parts = line.split(b" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN.match(method) or not _TARGET.match(target):
        raise HttpError(400, "malformed method or request target (origin-form only)")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise HttpError(505, f"unsupported HTTP version {version[:16]!r}")
    if len(lines) - 1 > limits.max_headers:
        raise HttpError(431, f"more than {limits.max_headers} header fields")
    headers: list[tuple[str, str]] = []
    for raw in lines[1:]:
        if b"\n" in raw or b"\r" in raw:
            raise HttpError(400, "bare CR or LF in header block")
        if raw[:1] in (b" ", b"\t"):
            raise HttpError(400, "obsolete header line folding")
        name, sep, value = raw.partition(b":")
        if not sep or not _TOKEN.match(name):
            raise HttpError(400, "malformed header field")
        value = value.strip(b" \t")
        if not _VALUE.match(value):
            raise HttpError(400, "invalid characters in header value")
        headers.append((name.decode("ascii"), value.decode("latin-1")))
    lower = [(n.lower(), v) for n, v in headers]
    if any(n == "transfer-encoding" for n, _ in lower):
        raise HttpError(501, "Transfer-Encoding request bodies are not supported; "
                             "send Content-Length")
    lengths = {v for n, v in lower if n == "content-length"}
    if len(lengths) > 1:
        raise HttpError(400, "conflicting Content-Length headers")
    length = 0
    if lengths:
        text = lengths.pop()
        if not text.isdigit() or len(text) > 18:
            raise HttpError(400, "invalid Content-Length")
        length = int(text)
        if length > limits.max_body:
            raise HttpError(413, f"request body over {limits.max_body} bytes")
    conn = next((v.lower() for n, v in lower if n == "connection"), "")
    keep = ("close" not in conn) if version == b"HTTP/1.1" else ("keep-alive" in conn)
    return HttpRequest(method.decode("ascii"), target.decode("ascii"), tuple(headers),
                       length, keep)


async def read_request(
    reader: asyncio.StreamReader, limits: HttpLimits, *, first: bool
) -> tuple[HttpRequest, bytes] | None:
    """Read one request (head + body); None on a clean close between requests.

    One timer per request, moved on as the request progresses: the idle (or, for a
    connection's first request, header) timeout until the first byte, then
    :attr:`HttpLimits.header_timeout` for the rest of the head, then
    :attr:`HttpLimits.body_timeout` for the body."""
    phase = "first"
    try:
        async with asyncio.timeout(limits.header_timeout if first
                                   else limits.idle_timeout) as deadline:
            first_byte = await reader.read(1)
            if not first_byte:
                return None
            phase = "head"
            loop = asyncio.get_running_loop()
            deadline.reschedule(loop.time() + limits.header_timeout)
            try:
                rest = await reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                raise HttpError(431, f"request head over {limits.max_head_bytes} bytes"
                                ) from None
            except asyncio.IncompleteReadError:
                raise HttpError(400, "connection closed inside the request head") from None
            block = first_byte + rest
            if len(block) > limits.max_head_bytes:
                raise HttpError(431, f"request head over {limits.max_head_bytes} bytes")
            req = parse_head(block, limits)
            if not req.content_length:
                return req, b""
            phase = "body"
            deadline.reschedule(loop.time() + limits.body_timeout)
            try:
                body = await reader.readexactly(req.content_length)
            except asyncio.IncompleteReadError:
                raise HttpError(400, "connection closed inside the request body") from None
    except TimeoutError:
        if phase == "first":
            if first:
                raise HttpError(408, "no request received in time") from None
            return None
        if phase == "head":
            raise HttpError(408, f"request head not complete within "
                                 f"{limits.header_timeout:g}s") from None
        raise HttpError(408, "request body not received in time") from None
    return req, body


REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
           404: "Not Found", 408: "Request Timeout", 413: "Content Too Large",
           414: "URI Too Long", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
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
