"""The sidecar's local HTTP/1.x face: httptools (llhttp) parses, this module bounds and
proxies.

Why httptools and not h11 (both were candidates; see docs/explanation/sentry.md): the
sidecar sits on every RPC's path, and parsing one small keep-alive request costs
≈ 4 µs with httptools against ≈ 190-280 µs with h11 on this machine (h11 is pure
Python) — at the sentry's ~7k RPC/s, h11 alone would use a core. llhttp is the parser
Node.js and uvicorn use; it is strict by default (duplicate or conflicting
``Content-Length``, ``Transfer-Encoding`` with ``Content-Length``, bare LF, obsolete line
folding, invalid tokens are all parse errors) and decodes chunked bodies itself.

What an unmodified app may send, and what it gets:

* ``Content-Length`` and ``Transfer-Encoding: chunked`` request bodies; bodies are
  **streamed** to the sentry as they arrive (a request whose body is already complete
  when its head is parsed leaves in one tunnel write);
* ``Expect: 100-continue`` — ``100 Continue`` is sent when the sidecar starts reading
  the body (a body over :attr:`HttpLimits.max_body` announced in ``Content-Length`` is
  refused with 413 *instead*, before the app sends it); any other expectation is 417;
* HTTP/1.0 clients (keep-alive only when asked for; a response of unknown length is
  sent raw and ends with the connection, never chunked);
* pipelined requests, answered in order;
* WebSocket (``GET`` with ``Connection: Upgrade`` and ``Upgrade: websocket``): the
  handshake travels to the backend through the sentry as a ``ws`` request (ACL key
  ``WS /path``); after the backend's ``101`` the connection is a byte pipe to it, frames
  untouched, until either side closes (the sentry's ``bounds.tcp_idle_timeout`` ends
  a silent one). Any other answer (403, 404, 429 …) is relayed and the connection
  closes. Why a pipe and not a WebSocket library here: the sidecar never needs to read
  a frame, and relaying bytes keeps extensions (``permessage-deflate``) and
  subprotocols the app's and the backend's business.

Refusals are a status line, a one-line JSON body and ``connection: close``: 400
malformed, 408 too slow, 413 body too large, 414 request line too long, 431 head too
large / too many fields, 417 unknown expectation, 501 CONNECT or an upgrade to anything
but WebSocket,
505 other HTTP versions. A refusal never reaches the sentry and never crashes the
listener; a body that turns out too large mid-stream resets the sentry stream.

:class:`RequestParser` is sans-IO (bytes in, events out; fuzzed whole and byte at a
time); :func:`serve` is the asyncio glue. The upstream it proxies to is anything with
the :class:`Upstream` shape — a :class:`~pqcnet.sentry.sidecar.Sidecar` (one sentry) or a
:class:`~pqcnet.sentry.pool.SentryPool` (several).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, replace
from typing import Any, NoReturn, Protocol

import httptools

from pqcnet.errors import PqcnetError
from pqcnet.qstp.frames import ErrorCode
from pqcnet.sentry.backends import TCP_READ_CHUNK, close_quietly
from pqcnet.sentry.errors import BackendError
from pqcnet.sentry.http1 import HttpError, HttpLimits, response_head
from pqcnet.sentry.memo import Memo, headers_size
from pqcnet.sentry.wire import RequestHead, ResponseHead

log = logging.getLogger("pqcnet.sidecar")

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
#: Hop-by-hop response headers the sidecar sets itself.
_RESPONSE_OWN = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length"})
#: HTTP heads built for decoded response heads (bounded, see sentry.memo).
_heads: Memo[tuple[ResponseHead, bool, bool], tuple[str | None, bytes]] = Memo()
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


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


# ---------------------------------------------------------------------------- upstream


class Upstream(Protocol):
    """What the HTTP face needs from a sidecar or a pool of sentries."""

    async def call(self, head: RequestHead, body: bytes, *, idempotent: bool = False
                   ) -> tuple[ResponseHead, Any, bytes]: ...

    async def open(self, head: RequestHead, body: bytes = b"", *, end: bool = True) -> Any: ...

    async def response(self, stream: Any) -> tuple[ResponseHead, Any, bytes]: ...


def error_json(outcome: str, reason: str) -> bytes:
    """The one-line JSON body of a refusal."""
    return json.dumps({"error": outcome, "reason": reason}).encode() + b"\n"


async def body_chunks(stream: Any, first: bytes) -> AsyncIterator[bytes]:
    """A response body: the bytes that came with the head, then the stream's."""
    if first:
        yield first
    while chunk := await stream.recv():
        yield chunk


# ---------------------------------------------------------------------------- connection


class _Conn:
    """One local connection: pulls requests from the parser, proxies each in turn."""

    def __init__(self, up: Upstream, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, limits: HttpLimits) -> None:
        self.up, self.reader, self.writer, self.lim = up, reader, writer, limits
        self.parser = RequestParser(limits)
        self.loop = asyncio.get_running_loop()

    async def _pull(self) -> Event | None:
        """Next event, reading the socket as needed; None at a clean end of input."""
        while (ev := self.parser.next_event()) is None:
            data = await self.reader.read(READ_CHUNK)
            if not data:
                self.parser.feed_eof()
                return None
            self.parser.feed(data)
        return ev

    async def _next_request(self, first: bool) -> Request | None:
        """Wait for a request head under the idle / header timeouts."""
        lim = self.lim
        phase = "first"
        try:
            async with asyncio.timeout(lim.header_timeout if first
                                       else lim.idle_timeout) as deadline:
                ev = self.parser.next_event()
                if ev is None:
                    data = await self.reader.read(READ_CHUNK)
                    if not data:
                        self.parser.feed_eof()
                        return None
                    phase = "head"
                    self.parser.feed(data)
                    ev = self.parser.next_event()
                    if ev is None:  # the head did not arrive whole: header_timeout
                        deadline.reschedule(self.loop.time() + lim.header_timeout)
                        ev = await self._pull()
                        if ev is None:
                            return None
        except TimeoutError:
            if phase == "first" and not self.parser.in_request:
                if first:
                    raise HttpError(408, "no request received in time") from None
                return None
            raise HttpError(408, f"request head not complete within "
                                 f"{lim.header_timeout:g}s") from None
        if not isinstance(ev, Request):  # the parser emits a head before any body
            raise HttpError(400, "request body without a head")
        return ev

    def _buffered_body(self) -> tuple[bytes, bool]:
        """Body bytes already parsed (no socket read) and whether the request ended."""
        parts: list[bytes] = []
        while (ev := self.parser.next_event()) is not None:
            if isinstance(ev, EndOfRequest):
                return b"".join(parts), True
            if isinstance(ev, Body):
                parts.append(ev.data)
        return b"".join(parts), False

    async def run(self) -> None:
        first = True
        try:
            while True:
                stream: Any = None
                try:
                    req = await self._next_request(first)
                    if req is None:
                        return
                    first = False
                    if req.websocket:
                        await self._websocket(req)
                        return
                    head = RequestHead("http", req.method, req.target, req.forward_headers())
                    body, ended = self._buffered_body()
                    if ended:
                        keep = await self._answer_call(req, head, body)
                    else:
                        if req.expect_continue:
                            self.writer.write(_CONTINUE)
                        stream, got = await self._stream_body(head, body)
                        keep = await self._answer_stream(req, stream, got)
                        stream = None
                except HttpError as exc:
                    if stream is not None:
                        with contextlib.suppress(PqcnetError, OSError):
                            stream.reset(ErrorCode.CANCELLED, f"local request refused: {exc}"[:200])
                    with contextlib.suppress(OSError, ConnectionError):
                        await self._simple(exc.http_status, error_json(exc.outcome, str(exc)),
                                           close=True)
                    return
                if not keep:
                    return
        except (OSError, ConnectionError, PqcnetError) as exc:
            log.info("local http client dropped", extra={"error": repr(exc)})
        finally:
            self.parser.release()
            await close_quietly(self.writer)

    async def _websocket(self, req: Request) -> None:
        """Ask for the WebSocket through the sentry; after its 101 pipe the bytes."""
        self.parser.next_event()  # the upgrade request's end
        rest = self.parser.upgraded or b""
        head = RequestHead("ws", "GET", req.target, req.forward_headers())
        try:
            stream = await self.up.open(head, b"", end=False)
            resp, stream, first = await self.up.response(stream)
        except BackendError as exc:
            await self._simple(502, error_json(exc.outcome, str(exc)), close=True)
            return
        if resp.status != 101 or resp.error:  # refused by the sentry or the backend
            with contextlib.suppress(PqcnetError, OSError):
                await stream.send(b"", end=True)
            await self._relay(req, resp, stream, first)
            return
        headers = [(n, v) for n, v in resp.headers if n.lower() not in _RESPONSE_OWN]
        headers += [("upgrade", "websocket"), ("connection", "Upgrade")]
        self.writer.write(response_head(101, headers))
        try:
            await pipe(self.reader, self.writer, stream, first=first, rest=rest)
        except* (OSError, ConnectionError, PqcnetError) as eg:
            log.info("websocket pipe ended", extra={"error": repr(eg.exceptions[0])})

    async def _stream_body(self, head: RequestHead, first: bytes
                           ) -> tuple[Any, BackendError | None]:
        """Open a sentry stream and send the body as it arrives (body timeout applies);
        returns the stream, or the upstream failure to report once the body is read."""
        failure: BackendError | None = None
        stream: Any = None
        try:
            stream = await self.up.open(head, first, end=False)
        except BackendError as exc:
            failure = exc.with_traceback(None)  # no tb: no cycle via its frame
        try:
            async with asyncio.timeout(self.lim.body_timeout):
                while True:
                    ev = await self._pull()
                    if ev is None:
                        raise HttpError(400, "connection closed inside the request body")
                    if isinstance(ev, EndOfRequest):
                        if stream is not None:
                            await self._send(stream, b"", end=True)
                        return stream, failure
                    if isinstance(ev, Body) and stream is not None:
                        await self._send(stream, ev.data)
        except TimeoutError:
            raise HttpError(408, "request body not received in time") from None
        except HttpError:
            if stream is not None:
                with contextlib.suppress(PqcnetError, OSError):
                    stream.reset(ErrorCode.CANCELLED, "local request refused")
            raise

    @staticmethod
    async def _send(stream: Any, data: bytes, end: bool = False) -> None:
        # The sentry may answer (a refusal) and end its side before the body is all
        # sent; its answer is still read afterwards, so a send failure is not fatal.
        with contextlib.suppress(PqcnetError, OSError):
            await stream.send(data, end=end)

    async def _answer_call(self, req: Request, head: RequestHead, body: bytes) -> bool:
        try:
            resp, stream, first = await self.up.call(head, body, idempotent=req.idempotent)
        except BackendError as exc:
            await self._simple(502, error_json(exc.outcome, str(exc)), close=not req.keep_alive)
            return req.keep_alive
        return await self._relay(req, resp, stream, first)

    async def _answer_stream(self, req: Request, stream: Any,
                             failure: BackendError | None) -> bool:
        if failure is None:
            try:
                resp, stream, first = await self.up.response(stream)
            except BackendError as exc:
                failure = exc.with_traceback(None)  # no tb: no cycle via its frame
        if failure is not None:
            await self._simple(502, error_json(failure.outcome, str(failure)),
                               close=not req.keep_alive)
            return req.keep_alive
        return await self._relay(req, resp, stream, first)

    async def _relay(self, req: Request, resp: ResponseHead, stream: Any, first: bytes) -> bool:
        keep = req.keep_alive
        w = self.writer
        if resp.error:
            extra = [(n, v) for n, v in resp.headers if n.lower() == "retry-after"]
            extra.append(("x-pqcnet-error", resp.error))
            await self._simple(resp.status, error_json(resp.error, resp.reason), extra,
                               close=not keep)
            return keep
        length, out = response_for(resp, keep, req.http10)
        raw = length is not None or req.http10  # HTTP/1.0: unknown length ends with the close
        if length is None and req.http10:
            keep = False
        # head and the body bytes that came with it leave in one write (one segment for
        # the small answers that dominate RPC traffic)
        async for chunk in body_chunks(stream, first):
            out += chunk if raw else b"%x\r\n%s\r\n" % (len(chunk), chunk)
            w.write(out)
            out = b""
            await w.drain()
        if not raw:
            out += b"0\r\n\r\n"
        if out:
            w.write(out)
        await w.drain()
        return keep

    async def _simple(self, status: int, body: bytes, extra: Iterable[tuple[str, str]] = (),
                      *, close: bool) -> None:
        headers = [("content-type", "application/json"), ("content-length", str(len(body))),
                   *extra, ("connection", "close" if close else "keep-alive")]
        self.writer.write(response_head(status, headers) + body)
        await self.writer.drain()


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stream: Any,
               *, first: bytes = b"", rest: bytes = b"") -> None:
    """Bytes both ways between a local connection and a sentry stream until both ended
    (EOF passed on each way) or either failed (the exception propagates in a group);
    ``first`` came from the sentry and ``rest`` from the app before the pipe started.
    A failure resets the stream (the sentry frees the pipe at once, not after its
    idle timeout); the caller closes the writer."""

    async def up() -> None:
        if rest:
            await stream.send(rest)
        while data := await reader.read(TCP_READ_CHUNK):
            await stream.send(data)  # waits for the sentry's credit
        await stream.send(b"", end=True)

    async def down() -> None:
        if first:
            writer.write(first)
        while chunk := await stream.recv():
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(up())
            tg.create_task(down())
    except BaseException:
        with contextlib.suppress(PqcnetError, OSError):
            stream.reset(ErrorCode.CANCELLED, "local connection failed")
        raise


def response_for(resp: ResponseHead, keep: bool, http10: bool = False
                 ) -> tuple[str | None, bytes]:
    """(Content-Length or None, HTTP head) for a proxied answer; memoised, as the decoded
    ResponseHead itself is (same backend answer, same bytes)."""
    key = (resp, keep, http10)
    got = _heads.get(key)
    if got is not None:
        return got
    headers = [(n, v) for n, v in resp.headers if n.lower() not in _RESPONSE_OWN]
    length = next((v for n, v in resp.headers if n.lower() == "content-length"), None)
    if length is not None:
        headers.append(("content-length", length))
    elif not http10:
        headers.append(("transfer-encoding", "chunked"))
    else:
        keep = False
    headers.append(("connection", "keep-alive" if keep else "close"))
    out = (length, response_head(resp.status, headers))
    return _heads.put(key, out) if len(out[1]) <= _heads.max_item else out


async def serve(up: Upstream, host: str = "127.0.0.1", port: int = 0,
                limits: HttpLimits | None = None) -> asyncio.Server:
    """Start the local HTTP/1.x face; ``server.sockets[0].getsockname()[1]`` is the port."""
    lim = limits or HttpLimits()

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _Conn(up, reader, writer, lim).run()

    return await asyncio.start_server(client, host, port, limit=READ_CHUNK)


__all__ = ["IDEMPOTENT_METHODS", "Body", "EndOfRequest", "Event", "Request", "RequestParser",
           "Upstream", "error_json", "pipe", "response_for", "serve"]
