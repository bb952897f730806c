"""The sidecar's local HTTP/1.x face, the asyncio side: reads the socket, feeds the
sans-IO :class:`~pqcnet.sentry.http1.RequestParser` (llhttp through httptools), applies
the timeouts and proxies each request to the sentry.

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
but WebSocket, 505 other HTTP versions. A refusal never reaches the sentry and never
crashes the listener; a body that turns out too large mid-stream resets the sentry
stream.

The upstream :func:`serve` proxies to is anything with the :class:`Upstream` shape — a
:class:`~pqcnet.sentry.sidecar.Sidecar` (one sentry) or a
:class:`~pqcnet.sentry.pool.SentryPool` (several).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterable
from typing import Any, Protocol

from pqcnet.errors import PqcnetError
from pqcnet.qstp.frames import ErrorCode
from pqcnet.sentry.backends import TCP_READ_CHUNK, close_quietly
from pqcnet.sentry.errors import BackendError
from pqcnet.sentry.http1 import (
    READ_CHUNK,
    Body,
    EndOfRequest,
    Event,
    HttpError,
    HttpLimits,
    Request,
    RequestParser,
    response_head,
)
from pqcnet.sentry.memo import Memo
from pqcnet.sentry.wire import RequestHead, ResponseHead

log = logging.getLogger("pqcnet.sidecar")

#: Hop-by-hop response headers the sidecar sets itself.
_RESPONSE_OWN = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length"})
#: HTTP heads built for decoded response heads (bounded, see sentry.memo).
_heads: Memo[tuple[ResponseHead, bool, bool], tuple[str | None, bytes]] = Memo()
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


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


__all__ = ["Upstream", "error_json", "pipe", "response_for", "serve"]
