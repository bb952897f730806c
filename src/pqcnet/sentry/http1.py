"""HTTP/1.x of the sidecar's local side, sans-IO: the request parser, its bounds and
refusals, and response heads. :mod:`pqcnet.sentry.local_http` is the asyncio glue.

:class:`RequestParser` is fed bytes and yields events (:class:`Request`, :class:`Body`,
:class:`EndOfRequest`); it is fuzzed whole and byte at a time. llhttp parses, through
httptools. Why httptools and not h11 (both were candidates; see
docs/explanation/sentry.md): the sidecar sits on every RPC's path, and parsing one
small keep-alive request costs ≈ 4 µs with httptools against ≈ 190-280 µs with h11 on
this machine (h11 is pure Python) — at the sentry's ~7k RPC/s, h11 alone would use a
core. llhttp is the parser Node.js and uvicorn use; it is strict by default (duplicate
or conflicting ``Content-Length``, ``Transfer-Encoding`` with ``Content-Length``, bare
LF, obsolete line folding, invalid tokens are all parse errors) and decodes chunked
bodies itself. A ``GET`` asking for a WebSocket switches the parser off (the bytes
after it are the new protocol's: :attr:`RequestParser.upgraded`); CONNECT and other
upgrades are refused.

:class:`HttpLimits` names every bound of the listener; a client that dribbles its
head (slowloris) is cut off after :attr:`HttpLimits.header_timeout` seconds and
holds one connection and a bounded buffer, nothing else.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, replace
from typing import NoReturn

import httptools

from pqcnet.sentry.errors import WireError
from pqcnet.sentry.memo import Memo, headers_size


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


REASONS = {100: "Continue", 101: "Switching Protocols", 200: "OK", 400: "Bad Request",
           401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 408: "Request Timeout",
           413: "Content Too Large",
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


# ---------------------------------------------------------------------------- constants

_TARGET = re.compile(rb"^/[\x21-\x7e]*$")
#: Bytes asked of the socket per read; also bounds how far a head may overshoot
#: :attr:`HttpLimits.max_head_bytes` inside llhttp before it is refused.
READ_CHUNK = 64 * 1024
#: Methods RFC 9110 §9.2.2 defines as idempotent: a sentry pool may replay them on
#: another sentry when the first fails before answering.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
#: A request carrying this header is idempotent by the app's own declaration.
IDEMPOTENCY_KEY = "idempotency-key"
#: Request headers that concern only the local hop (never forwarded to the sentry).
_LOCAL_ONLY = frozenset({"expect", "transfer-encoding", "connection", "keep-alive",
                         "proxy-connection", "te", "upgrade", "trailer"})


# ---------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Request:
    """A complete request head."""

    #: request method, e.g. "POST"
    method: str
    #: origin-form target ("/path?query")
    target: str
    #: header fields in order (names as sent; local-hop fields included)
    headers: tuple[tuple[str, str], ...]
    #: the connection may carry another request after this one
    keep_alive: bool
    #: the client speaks HTTP/1.0 (no chunked responses)
    http10: bool
    #: the client waits for ``100 Continue`` before sending its body
    expect_continue: bool
    #: declared Content-Length, None when chunked or absent
    content_length: int | None
    #: the body is chunked
    chunked: bool
    #: the client asked to switch this connection to a WebSocket (and the parser did)
    websocket: bool = False

    @property
    def idempotent(self) -> bool:
        """Safe to replay on another sentry (method, or an ``Idempotency-Key``)."""
        return self.method in IDEMPOTENT_METHODS or _header_facts(self.headers)[1]

    def forward_headers(self) -> tuple[tuple[str, str], ...]:
        """The headers that travel to the sentry (local-hop fields removed)."""
        return _header_facts(self.headers)[0]


#: headers -> (forwarded headers, has an Idempotency-Key): an app repeats its headers
#: byte for byte, so this is computed once per distinct header block (bounded memo)
_facts: Memo[tuple[tuple[str, str], ...], tuple[tuple[tuple[str, str], ...], bool]] = Memo()


def _header_facts(headers: tuple[tuple[str, str], ...]
                  ) -> tuple[tuple[tuple[str, str], ...], bool]:
    got = _facts.get(headers)
    if got is None:
        got = (tuple((n, v) for n, v in headers if n.lower() not in _LOCAL_ONLY),
               any(n.lower() == IDEMPOTENCY_KEY for n, _ in headers))
        if headers_size(headers) <= _facts.max_item:
            _facts.put(headers, got)
    return got


@dataclass(frozen=True, slots=True)
class Body:
    """Request body bytes (chunked framing already removed)."""

    #: the bytes
    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfRequest:
    """The request's body is complete."""


Event = Request | Body | EndOfRequest
#: (target, headers, content length, chunked, expects 100-continue) of a head
_HeadFacts = tuple[str, tuple[tuple[str, str], ...], int | None, bool, bool]
_head_facts: Memo[tuple[bytes, tuple[tuple[bytes, bytes], ...], HttpLimits], _HeadFacts] = Memo()


# ---------------------------------------------------------------------------- parser


class RequestParser:
    """Sans-IO request reader: :meth:`feed` bytes, then :meth:`next_event` until None.

    Bounds (:class:`HttpLimits`) are checked as bytes arrive; a violation or a parse
    error raises :class:`HttpError` (its ``http_status`` is what the app should get)
    and the parser is then unusable — the connection must be closed.
    """

    __slots__ = ("_began", "_body_bytes", "_error", "_events", "_head_bytes", "_headers",
                 "_in_head", "_in_message", "_limits", "_line_bytes", "_p", "_url",
                 "upgraded")

    def __init__(self, limits: HttpLimits) -> None:
        self._limits = limits
        self._events: deque[Event] = deque()
        self._error: HttpError | None = None
        self._p = httptools.HttpRequestParser(self)
        self._began = 0
        self._in_message = False
        #: bytes after a WebSocket upgrade request (the new protocol's, not HTTP);
        #: None until the parser switched — after that, feeding raises
        self.upgraded: bytes | None = None
        self._reset()

    def _reset(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._line_bytes = 0
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body_bytes = 0

    def release(self) -> None:
        """The connection ended: drop the llhttp parser. It holds this object's
        callbacks, a reference cycle that only the cyclic collector would otherwise
        free — which a serving process runs rarely, so each closed connection's objects
        (~2.7 KB) piled up until it did. Feeding after this raises."""
        if self._error is None:
            self._error = HttpError(400, "connection closed")
        del self._p

    @property
    def in_request(self) -> bool:
        """Some request bytes have arrived that did not complete a request yet."""
        return self._in_message or bool(self._events)

    def feed(self, data: bytes) -> None:
        """Parse ``data``; events become available through :meth:`next_event`."""
        if self._error is not None:
            raise self._error
        if self.upgraded is not None:
            raise HttpError(400, "bytes after an upgrade belong to the new protocol")
        began = self._began
        was_in_head = self._in_head
        was_idle = not self._in_message
        try:
            self._p.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._switch(data, exc)
        except httptools.HttpParserError as exc:
            if self._error is None:
                text = str(exc) or type(exc).__name__
                self._fail(HttpError(400, f"malformed request: {text}"))
        if self._error is not None:
            raise self._error
        # llhttp buffers a partial header line itself: count the bytes of every feed
        # that an unfinished head spans (the callbacks measure complete lines exactly;
        # a head that began after a pipelined request in the same feed is counted from
        # the next feed on, so it may overshoot by at most one READ_CHUNK)
        if self._in_head:
            if was_in_head and began == self._began:
                self._head_bytes += len(data)
            elif was_idle and self._began == began + 1:
                self._head_bytes = len(data)
            self._check_head()

    def _switch(self, data: bytes, exc: httptools.HttpParserUpgrade) -> None:
        """llhttp stopped after a request asking to switch protocols (it emitted the
        head and the end of the request first): a body-less ``GET`` asking for a
        WebSocket becomes one; CONNECT and any other upgrade are refused (501)."""
        at = next((i for i in range(len(self._events) - 1, -1, -1)
                   if isinstance(self._events[i], Request)), None)
        req = self._events[at] if at is not None else None
        if (at is None or not isinstance(req, Request) or req.method != "GET" or req.chunked
                or req.content_length or not _asks_websocket(req.headers)):
            self._fail(HttpError(501, "CONNECT and upgrades to anything but WebSocket are "
                                      "not supported"))
            return
        offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
        self._events[at] = replace(req, websocket=True, keep_alive=False)
        self.upgraded = data[offset:]

    def feed_eof(self) -> None:
        """The client closed its side: an unfinished request is an error."""
        if self._in_head:
            self._fail(HttpError(400, "connection closed inside the request head"))
        elif self._in_message:
            self._fail(HttpError(400, "connection closed inside the request body"))
        if self._error is not None:
            raise self._error

    def next_event(self) -> Event | None:
        """The next parsed event, or None when more bytes are needed."""
        return self._events.popleft() if self._events else None

    def _fail(self, err: HttpError) -> None:
        if self._error is None:
            self._error = err
        self._events.clear()

    # -- llhttp callbacks (an exception here is re-raised by feed as the HttpError)

    def _check_head(self) -> None:
        if max(self._head_bytes, self._line_bytes) > self._limits.max_head_bytes:
            self._refuse(431, f"request head over {self._limits.max_head_bytes} bytes")

    def on_message_begin(self) -> None:
        self._reset()
        self._began += 1
        self._in_head = self._in_message = True

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._limits.max_request_line:
            self._refuse(414, f"request target over {self._limits.max_request_line} bytes")
        self._line_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        if len(headers) >= self._limits.max_headers:
            self._refuse(431, f"more than {self._limits.max_headers} header fields")
        self._line_bytes += len(name) + len(value) + 4
        if self._line_bytes > self._limits.max_head_bytes:
            self._check_head()
        headers.append((name, value))

    def on_headers_complete(self) -> None:
        p = self._p
        version = p.get_http_version()
        if version not in ("1.1", "1.0"):
            self._refuse(505, f"unsupported HTTP version {version[:8]!r}")
        # the head minus what llhttp decides per request: memoised (an app repeats its
        # heads byte for byte); only heads that passed are remembered
        key = (self._url, tuple(self._headers), self._limits)
        facts = _head_facts.get(key)
        if facts is None:
            facts = self._head_facts()
            if self._line_bytes <= _head_facts.max_item:
                _head_facts.put(key, facts)
        target, headers, length, chunked, expect = facts
        self._in_head = False
        self._events.append(Request(
            p.get_method().decode("ascii"), target, headers, p.should_keep_alive(),
            version == "1.0", expect, length, chunked))

    def _head_facts(self) -> _HeadFacts:
        lim = self._limits
        if not _TARGET.match(self._url):
            self._refuse(400, "malformed request target (origin-form only)")
        headers = tuple((n.decode("ascii"), v.decode("latin-1")) for n, v in self._headers)
        length: int | None = None
        chunked = expect = False
        for name, value in headers:
            n = name.lower()
            if n == "content-length":
                length = int(value)  # llhttp validated digits and uniqueness
            elif n == "transfer-encoding":
                chunked = True  # llhttp refuses anything but a final "chunked"
            elif n == "expect":
                if value.strip().lower() != "100-continue":
                    self._refuse(417, f"unsupported expectation {value[:40]!r}")
                expect = True
        if length is not None and length > lim.max_body:
            self._refuse(413, f"request body over {lim.max_body} bytes")
        return (self._url.decode("ascii"), headers, length, chunked,
                expect and (chunked or bool(length)))

    def _refuse(self, status: int, message: str) -> NoReturn:
        err = HttpError(status, message)
        self._fail(err)
        raise err

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self._limits.max_body:
            self._refuse(413, f"request body over {self._limits.max_body} bytes")
        self._events.append(Body(body))

    def on_message_complete(self) -> None:
        self._events.append(EndOfRequest())
        self._body_bytes = 0
        self._in_message = False


def _asks_websocket(headers: tuple[tuple[str, str], ...]) -> bool:
    """An ``Upgrade`` header naming ``websocket`` among its protocols."""
    return any(n.lower() == "upgrade" and "websocket" in
               (p.strip().split("/", 1)[0].lower() for p in v.split(","))
               for n, v in headers)


__all__ = ["IDEMPOTENT_METHODS", "READ_CHUNK", "REASONS", "Body", "EndOfRequest", "Event",
           "HttpError", "HttpLimits", "Request", "RequestParser", "response_head"]
