"""A lean keep-alive HTTP/1.1 client for the Waku REST API: asyncio + httptools (llhttp).

Why not httpx (which this replaced): ``pqcnet bench mesh`` on real go-waku spent most
of its raw-REST CPU in httpx/httpcore/anyio — ~1.6 ms per publish, about ten times a
minimal keep-alive HTTP/1.1 request — and the same client carries the pqcnet *and* the
raw-baseline messages of that benchmark. A Waku REST call needs very little of HTTP:
one request with a small JSON body, and a response framed by ``Content-Length`` or
``chunked``. The parsing is llhttp through **httptools** (the parser uvicorn uses, and
the sentry's local HTTP face); this module only keeps the connections, the bounds and
the errors. The pool follows the sentry's ``upstream.py`` (LIFO idle reuse, a bounded
number of sockets, a stale idle socket noticed before reuse, idempotent retry once).

* At most :attr:`HttpClient.max_connections` sockets per origin (TCP_NODELAY); idle
  ones are reused last-in first-out. A caller beyond the bound waits for a socket
  within its request timeout.
* A request is one ``write()`` (head and body); the whole request — waiting for a
  socket, connecting, the response — runs under ``timeout_s``.
* A connection goes back to the pool only when its response was read to the end and
  neither side said ``Connection: close``; a timeout, a cancellation, a parse error or
  an over-limit response closes it. The server closing an idle socket is seen by the
  protocol (``connection_lost``) so it is never handed out; an idempotent request that
  still meets EOF before any response byte on a reused socket is sent once more on a
  fresh one (POST is left to the caller's retry policy).
* Every failure to get an answer (refused, reset, timeout, malformed or oversized
  response) is :class:`~pqcnet.mesh.errors.WakuUnavailable` (retriable); an HTTP status
  is an answer and returned as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

from pqcnet.mesh.errors import ConfigError, WakuUnavailable

#: Largest response head (status line + headers) accepted.
MAX_RESPONSE_HEAD = 64 * 1024
#: Largest response body accepted: a messages GET returns up to the node's
#: ``--rest-relay-cache-capacity`` messages of up to 150 KB each, base64 in JSON.
MAX_RESPONSE_BODY = 64 * 1024 * 1024
#: Sockets per origin (one per concurrent request; the benchmark keeps 8 in flight).
DEFAULT_MAX_CONNECTIONS = 16
#: Methods safe to re-send after a stale keep-alive connection (RFC 9110 §9.2.2).
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """Status code and the whole body."""

    status: int
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class _Stale(Exception):
    """EOF on a reused connection before any response byte (internal)."""


class _Conn(asyncio.Protocol):
    """One socket: feeds llhttp and completes the pending request's future."""

    def __init__(self, max_head: int, max_body: int) -> None:
        self.max_head = max_head
        self.max_body = max_body
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[HttpResponse] | None = None
        self.closed = False
        self.reused = False
        self.keep_alive = True
        self._got_bytes = False
        self._head = 0
        self._body: list[bytes] = []
        self._body_len = 0

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.waiter is None or self.waiter.done():
            self._fail(WakuUnavailable("unsolicited bytes from the server"))
            return
        self._got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(WakuUnavailable(f"malformed HTTP response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            if self.reused and not self._got_bytes:
                self.waiter.set_exception(_Stale())
            else:
                self.waiter.set_exception(WakuUnavailable(
                    f"connection lost before the response ended: {exc or 'EOF'}"))

    # -- llhttp callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head += len(name) + len(value) + 4
        if self._head > self.max_head:
            self._fail(WakuUnavailable(f"response head over {self.max_head} bytes"))

    def on_body(self, body: bytes) -> None:
        self._body_len += len(body)
        if self._body_len > self.max_body:
            self._fail(WakuUnavailable(f"response body over {self.max_body} bytes"))
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(HttpResponse(self.parser.get_status_code(),
                                           b"".join(self._body)))

    # -- driving

    def send(self, request: bytes) -> asyncio.Future[HttpResponse]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self._got_bytes = False
        self._head = 0
        self._body = []
        self._body_len = 0
        self.transport.write(request)
        return self.waiter

    def _fail(self, exc: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        self.abort()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class HttpClient:
    """Keep-alive requests to one ``http(s)://host:port`` origin (see module)."""

    def __init__(self, base_url: str, *, timeout_s: float,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 max_head: int = MAX_RESPONSE_HEAD, max_body: int = MAX_RESPONSE_BODY) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError(f"not an http(s) origin: {base_url!r}")
        if max_connections < 1 or timeout_s <= 0:
            raise ConfigError("max_connections must be >= 1 and timeout_s > 0")
        self.base_url = base_url
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.prefix = url.path.rstrip("/")
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self.max_head = max_head
        self.max_body = max_body
        self._tls_context = ssl.create_default_context() if url.scheme == "https" else None
        netloc = url.netloc.rpartition("@")[2]
        self._host_header = f"Host: {netloc}\r\n".encode()
        self._idle: list[_Conn] = []
        self._slots = asyncio.Semaphore(max_connections)
        self._closed = False
        #: sockets opened (connects), for tests and the benchmark's notes
        self.connects = 0

    async def request(self, method: str, path: str, body: bytes | None = None, *,
                      content_type: str = "application/json") -> HttpResponse:
        """Send one request and read the whole response (see the module for failures)."""
        if self._closed:
            raise WakuUnavailable(f"HTTP client for {self.base_url} is closed")
        head = f"{method} {self.prefix}{path} HTTP/1.1\r\n".encode() + self._host_header
        if body is not None:
            head += (f"Content-Type: {content_type}\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n").encode()
            wire = head + body
        else:
            wire = head + b"\r\n"
        try:
            async with asyncio.timeout(self.timeout_s), self._slots:
                try:
                    return await self._exchange(wire, fresh=False)
                except _Stale:
                    if method not in IDEMPOTENT:
                        raise WakuUnavailable("keep-alive connection closed by the server "
                                              "before it answered") from None
                    try:
                        return await self._exchange(wire, fresh=True)
                    except _Stale:
                        raise WakuUnavailable("server closed the connection") from None
        except TimeoutError:
            raise WakuUnavailable(f"{method} {path}: no answer within {self.timeout_s} s"
                                  ) from None

    async def _exchange(self, wire: bytes, *, fresh: bool) -> HttpResponse:
        conn = None if fresh else self._checkout()
        if conn is None:
            conn = await self._connect()
        ok = False
        try:
            resp = await conn.send(wire)
            ok = True
            return resp
        finally:
            if ok and conn.keep_alive and not conn.closed and not self._closed:
                self._idle.append(conn)
            else:
                conn.abort()

    def _checkout(self) -> _Conn | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                conn.reused = True
                return conn
        return None

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(
                lambda: _Conn(self.max_head, self.max_body), self.host, self.port,
                ssl=self._tls_context, server_hostname=self.host if self._tls_context else None)
        except OSError as exc:
            raise WakuUnavailable(f"cannot connect to {self.base_url}: {exc}") from None
        assert conn.transport is not None
        sock = conn.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connects += 1
        return conn

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def idle(self) -> int:
        """Sockets kept open for reuse."""
        return sum(1 for c in self._idle if not c.closed)

    async def aclose(self) -> None:
        """Close every idle socket; requests in flight close theirs when they end."""
        self._closed = True
        while self._idle:
            self._idle.pop().abort()
