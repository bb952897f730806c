"""A lean, pooled HTTP/1.1 client on asyncio streams: the sentry's path to HTTP backends.

Why not httpx: profiling ``pqcnet sentry run`` under load (py-spy, 2026-11-22) showed
httpx/httpcore/anyio taking ~48 % of the sentry's CPU per proxied RPC — a failing
``import sniffio`` on every request, anyio cancel scopes, a socket-readability probe
per pool checkout, two ``send()`` calls per request. A reverse proxy needs very little
of HTTP: one request line, headers, a ``Content-Length`` body, and a response framed
by ``Content-Length``, ``chunked`` or connection close. This module is exactly that.

* Keep-alive pool per backend: at most :attr:`Upstream.max_connections` sockets
  (TCP_NODELAY), idle ones reused LIFO; a checkout waits for a slot within the
  request's timeout and otherwise fails with :class:`~pqcnet.sentry.errors.BackendError`.
* A request is one ``write()`` (head and body together).
* Small bodies (``Content-Length`` ≤ :data:`INLINE_BODY_MAX`) are read before
  returning, so the caller can send head, body and end of stream in one QSTP write;
  larger, chunked and close-delimited bodies stream chunk by chunk.
* A connection goes back to the pool only when its response was read to the end and
  neither side said ``Connection: close``; an idle connection the backend closed is
  noticed at checkout, and an idempotent request that hit such a connection (EOF
  before any response byte) is retried once on a fresh one.
* Bounds: response head :data:`MAX_RESPONSE_HEAD`, chunk-size line length, and the
  per-request timeout on connect, response head and every body read.
* Protocol upgrades (a WebSocket through the sidecar): :meth:`Upstream.upgrade` asks
  for one on a connection of its own, outside the pool, and hands the connection over.
* ``https://`` origins: TLS (1.2 or later) with the configured CA bundle (else the
  system's trust store), host name checked, and an optional client certificate —
  :func:`backend_tls_context`, which ``sentry check`` runs too, so check and run agree.
  (Backend links are classical TLS: the stdlib ``ssl`` cannot do ML-KEM; the PQ hop is
  the QSTP tunnel in front of the sentry.)
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from urllib.parse import urlsplit

from pqcnet.sentry.errors import BackendError, SentryConfigError
from pqcnet.sentry.memo import Memo

#: Largest response head (status line + headers) accepted from a backend.
MAX_RESPONSE_HEAD = 64 * 1024
#: Bodies up to this size are read whole before the response is handed back.
INLINE_BODY_MAX = 64 * 1024
#: Read size for streamed bodies.
READ_CHUNK = 64 * 1024
#: Methods safe to re-send after a stale keep-alive connection (RFC 9110 §9.2.2).
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
#: Response heads up to this size are memoised by their bytes.
HEAD_MEMO_MAX = 2 * 1024

#: status, headers, HTTP/1.0?, {lower-case name: value} (read-only)
_Head = tuple[int, tuple[tuple[str, str], ...], bool, Mapping[str, str]]


@dataclass(slots=True)
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    reused: bool = False


class _Lease:
    """One checked-out connection; :meth:`release` returns the pool slot exactly once."""

    __slots__ = ("conn", "pool", "released")

    def __init__(self, pool: Upstream, conn: _Conn) -> None:
        self.pool = pool
        self.conn = conn
        self.released = False

    def release(self, reusable: bool = False) -> None:
        if not self.released:
            self.released = True
            self.pool._checkin(self.conn, reusable)


@dataclass(slots=True)
class UpstreamResponse:
    """Status, headers (hop-by-hop included; the caller filters), and the body."""

    status: int
    headers: tuple[tuple[str, str], ...]
    #: the whole body when it was small enough to read at once, else None
    inline: bytes | None
    #: the body chunk by chunk (when ``inline`` is None); exhaust it or call ``aclose``
    stream: AsyncIterator[bytes] | None
    lease: _Lease | None = None

    async def aclose(self) -> None:
        """Stop reading; a connection whose body was not read to the end is closed."""
        if self.stream is not None:
            aclose = getattr(self.stream, "aclose", None)
            if aclose is not None:
                await aclose()
        if self.lease is not None:
            self.lease.release(False)


@dataclass(slots=True)
class Upgraded:
    """A backend's answer to an upgrade request: status 101 with the connection, now
    speaking the new protocol (``reader`` / ``writer``; the caller closes it) — or any
    other status with its whole body (framed by ``Content-Length``, ``chunked`` or the
    connection's close; at most :data:`INLINE_BODY_MAX` bytes), the connection closed."""

    status: int
    #: as the backend sent them (hop-by-hop included; the caller filters)
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None


async def _read_chunk(reader: asyncio.StreamReader) -> bytes:
    """One chunk of a ``chunked`` body (RFC 9112 §7.1); ``b""`` at its end, after the
    trailers (dropped). Malformed framing is a :class:`ValueError`."""
    line = await reader.readuntil(b"\r\n")
    size = int(line.split(b";", 1)[0].strip() or b"x", 16)
    if size == 0:
        while (await reader.readuntil(b"\r\n")) != b"\r\n":
            pass
        return b""
    data = await reader.readexactly(size)
    if await reader.readexactly(2) != b"\r\n":
        raise ValueError("chunk not followed by CRLF")
    return data


async def _refusal_body(reader: asyncio.StreamReader, status: int,
                        lower: Mapping[str, str]) -> bytes:
    """The whole body of a non-101 answer to an upgrade, however it is framed; more
    than :data:`INLINE_BODY_MAX` bytes is a :class:`ValueError` (a refusal is small:
    the caller answers 502 rather than relay a cut body)."""
    if status in (204, 304):
        return b""
    te = lower.get("transfer-encoding", "").lower()
    parts: list[bytes] = []
    size = 0
    while True:
        if te.endswith("chunked"):
            data = await _read_chunk(reader)
        elif te or "content-length" not in lower:  # delimited by the close
            data = await reader.read(READ_CHUNK)
        else:
            length = int(lower["content-length"])
            if not 0 <= length <= INLINE_BODY_MAX:
                raise ValueError(f"refusal body of {length} bytes (Content-Length)")
            return await reader.readexactly(length)
        if not data:
            return b"".join(parts)
        size += len(data)
        if size > INLINE_BODY_MAX:
            raise ValueError(f"refusal body over {INLINE_BODY_MAX} bytes")
        parts.append(data)


class _Stale(Exception):
    """EOF on a reused connection before any response byte (internal)."""


def backend_tls_context(name: str, target: str, *, ca: str = "", cert: str = "",
                        key: str = "") -> ssl.SSLContext | None:
    """The client TLS context for an ``https://`` backend (None for ``http://``).

    ``ca``: PEM CA bundle to trust (empty: the system store); ``cert``/``key``: a client
    certificate for backends that require one. Every problem is a
    :class:`SentryConfigError` naming the backend and the key.
    """
    scheme = urlsplit(target).scheme
    if scheme != "https":
        if ca or cert or key:
            raise SentryConfigError(f"backend {name}: tls_ca/tls_cert/tls_key need an "
                                    f"https:// target, got {target!r}")
        return None
    if bool(cert) != bool(key):
        raise SentryConfigError(f"backend {name}: tls_cert and tls_key go together")
    try:
        ctx = ssl.create_default_context(cafile=ca or None)
    except (OSError, ssl.SSLError) as exc:
        raise SentryConfigError(f"backend {name}: tls_ca {ca}: {_why(exc)}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert:
        try:
            ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise SentryConfigError(f"backend {name}: tls_cert/tls_key {cert}: "
                                    f"{_why(exc)}") from None
    return ctx


def _why(exc: OSError | ssl.SSLError) -> str:
    return str(exc.strerror or exc) if isinstance(exc, OSError) else str(exc)


class Upstream:
    """A keep-alive connection pool to one ``http(s)://host:port`` origin."""

    def __init__(self, base_url: str, *, max_connections: int, timeout: float,
                 name: str = "backend", tls: ssl.SSLContext | None = None) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise SentryConfigError(f"backend {name}: target must be http(s)://host[:port], "
                                    f"got {base_url!r}")
        if url.scheme == "https" and tls is None:
            tls = backend_tls_context(name, base_url)
        self.tls = tls if url.scheme == "https" else None
        self.name = name
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.prefix = url.path.rstrip("/")
        self.host_header = url.netloc
        self.max_connections = max_connections
        self.timeout = timeout
        self._idle: list[_Conn] = []
        self._slots = asyncio.Semaphore(max_connections)
        self._closed = False

    # ------------------------------------------------------------------ pool

    async def _connect(self) -> _Conn:
        reader, writer = await asyncio.open_connection(
            self.host, self.port, limit=MAX_RESPONSE_HEAD, ssl=self.tls,
            server_hostname=self.host if self.tls is not None else None)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Conn(reader, writer)

    def _checkout_idle(self) -> _Conn | None:
        while self._idle:
            conn = self._idle.pop()
            if conn.reader.at_eof() or conn.writer.is_closing():
                conn.writer.close()  # the backend closed it while it was idle
                continue
            conn.reused = True
            return conn
        return None

    def _checkin(self, conn: _Conn, reusable: bool) -> None:
        if reusable and not self._closed:
            self._idle.append(conn)
        else:
            conn.writer.close()
        self._slots.release()

    # ------------------------------------------------------------------ requests

    async def request(self, method: str, path: str, headers: list[tuple[str, str]],
                      body: bytes, time_limit: float | None = None) -> UpstreamResponse:
        """Send one request; returns once the response head (and a small body) is in."""
        if self._closed:
            raise BackendError(f"backend {self.name}: client closed")
        t = self.timeout if time_limit is None else time_limit
        wire = self._encode(method, path, headers, body)
        try:
            if self._slots.locked():  # all connections busy: wait, bounded by the timeout
                async with asyncio.timeout(t):
                    await self._slots.acquire()
            else:
                await self._slots.acquire()
        except TimeoutError:
            raise BackendError(f"backend {self.name}: no pooled connection free within "
                               f"{t:g}s ({self.max_connections} busy)") from None
        for attempt in (1, 2):
            conn: _Conn | None = None
            try:
                async with asyncio.timeout(t):
                    conn = self._checkout_idle() or await self._connect()
                    conn.writer.write(wire)
                    return await self._response(conn, method, t)
            except _Stale:
                assert conn is not None
                conn.writer.close()
                if attempt == 1 and method in IDEMPOTENT:
                    continue
                self._slots.release()
                raise BackendError(f"backend {self.name} closed the connection before "
                                   f"responding") from None
            except TimeoutError:
                self._abort(conn)
                raise BackendError(f"backend {self.name} timed out after {t:g}s") from None
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    ValueError) as exc:
                self._abort(conn)
                raise BackendError(f"backend {self.name} unreachable or invalid response: "
                                   f"{exc!r}") from None
            except BaseException:
                self._abort(conn)
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def upgrade(self, path: str, headers: list[tuple[str, str]], protocol: str,
                      time_limit: float | None = None) -> Upgraded:
        """Ask the backend to switch this request's connection to ``protocol``
        (``GET`` with ``Connection: Upgrade``; RFC 9110 §7.8). The connection is its
        own, never one of the pool's ``max_connections``: an upgraded connection lives
        as long as its client wants (the sentry's concurrency gate bounds how many).
        A 101 naming another protocol is a :class:`BackendError`, and so is a refusal
        whose body exceeds :data:`INLINE_BODY_MAX` (never a truncated body)."""
        if self._closed:
            raise BackendError(f"backend {self.name}: client closed")
        t = self.timeout if time_limit is None else time_limit
        wire = self._encode("GET", path, [*headers, ("Connection", "Upgrade"),
                                          ("Upgrade", protocol)], b"")
        conn: _Conn | None = None
        try:
            async with asyncio.timeout(t):
                conn = await self._connect()
                conn.writer.write(wire)
                while True:
                    raw = await conn.reader.readuntil(b"\r\n\r\n")
                    status, headers_in, _http10, lower = parse_response_head(raw)
                    if status >= 200 or status == 101:
                        break
                if status == 101:
                    got = lower.get("upgrade", "").strip().lower()
                    if got != protocol:
                        raise ValueError(f"101 switched to {got[:40]!r}, not {protocol!r}")
                    return Upgraded(101, headers_in, b"", conn.reader, conn.writer)
                body = await _refusal_body(conn.reader, status, lower)
        except TimeoutError:
            _close(conn)
            raise BackendError(f"backend {self.name} timed out after {t:g}s") from None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError) as exc:
            _close(conn)
            raise BackendError(f"backend {self.name} refused the upgrade or answered "
                               f"invalidly: {exc!r}") from None
        except BaseException:
            _close(conn)
            raise
        _close(conn)
        return Upgraded(status, headers_in, body)

    def _abort(self, conn: _Conn | None) -> None:
        if conn is not None:
            conn.writer.close()
        self._slots.release()

    def _encode(self, method: str, path: str, headers: list[tuple[str, str]],
                body: bytes) -> bytes:
        lines = [f"{method} {self.prefix}{path} HTTP/1.1", f"Host: {self.host_header}"]
        for name, value in headers:
            if "\r" in name or "\n" in name or "\r" in value or "\n" in value:
                continue
            lines.append(f"{name}: {value}")
        if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
            lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body

    async def _response(self, conn: _Conn, method: str, t: float) -> UpstreamResponse:
        reader = conn.reader
        while True:
            try:
                raw = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                if conn.reused and not exc.partial:
                    raise _Stale() from None
                raise
            status, headers, http10, lower = parse_response_head(raw)
            if status >= 200 or status == 101:
                break  # 1xx interim responses (100 Continue, 103) are skipped
        conn_hdr = lower.get("connection", "").lower()
        # HTTP/1.0 closes unless it says keep-alive; HTTP/1.1 keeps unless it says close
        keep = "keep-alive" in conn_hdr if http10 else "close" not in conn_hdr
        no_body = method == "HEAD" or status in (204, 304) or 100 <= status < 200
        te = lower.get("transfer-encoding", "").lower()
        if no_body:
            self._checkin(conn, keep)
            return UpstreamResponse(status, headers, b"", None)
        lease = _Lease(self, conn)
        if te:
            if not te.endswith("chunked"):
                return UpstreamResponse(status, headers, None, self._until_close(lease, t), lease)
            return UpstreamResponse(status, headers, None, self._chunked(lease, keep, t),
                                    lease)
        if "content-length" in lower:
            length = int(lower["content-length"])
            if length < 0:
                raise ValueError("negative Content-Length")
            if length <= INLINE_BODY_MAX:
                body = await reader.readexactly(length) if length else b""
                lease.release(keep)
                return UpstreamResponse(status, headers, body, None)
            return UpstreamResponse(status, headers, None,
                                    self._sized(lease, length, keep, t), lease)
        return UpstreamResponse(status, headers, None, self._until_close(lease, t), lease)

    # ------------------------------------------------------------------ bodies

    async def _sized(self, lease: _Lease, length: int, keep: bool, t: float
                     ) -> AsyncIterator[bytes]:
        conn = lease.conn
        done = False
        try:
            left = length
            while left:
                async with asyncio.timeout(t):
                    chunk = await conn.reader.read(min(left, READ_CHUNK))
                if not chunk:
                    raise BackendError(f"backend {self.name} closed the connection "
                                       f"{left} bytes short of Content-Length")
                left -= len(chunk)
                yield chunk
            done = True
        except (OSError, TimeoutError) as exc:
            raise BackendError(f"backend {self.name} failed mid-body: {exc!r}") from None
        finally:
            lease.release(keep and done)

    async def _chunked(self, lease: _Lease, keep: bool, t: float) -> AsyncIterator[bytes]:
        reader = lease.conn.reader
        done = False
        try:
            while True:
                async with asyncio.timeout(t):
                    data = await _read_chunk(reader)
                if not data:
                    done = True
                    return
                yield data
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError) as exc:
            raise BackendError(f"backend {self.name} failed mid-body: {exc!r}") from None
        finally:
            lease.release(keep and done)

    async def _until_close(self, lease: _Lease, t: float) -> AsyncIterator[bytes]:
        conn = lease.conn
        try:
            while True:
                async with asyncio.timeout(t):
                    chunk = await conn.reader.read(READ_CHUNK)
                if not chunk:
                    return
                yield chunk
        except (OSError, TimeoutError) as exc:
            raise BackendError(f"backend {self.name} failed mid-body: {exc!r}") from None
        finally:
            lease.release(False)

    async def aclose(self) -> None:
        """Close idle connections; busy ones close when their response ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.writer.close()
        for conn in idle:
            with contextlib.suppress(OSError, ConnectionError):
                await conn.writer.wait_closed()


def _close(conn: _Conn | None) -> None:
    if conn is not None:
        conn.writer.close()


#: Parsed response heads, by their raw bytes (a backend repeats its heads).
_heads: Memo[bytes, _Head] = Memo(max_item=HEAD_MEMO_MAX)


def parse_response_head(raw: bytes) -> _Head:
    """Status, headers, whether it is HTTP/1.0, and {lower-case name: value};
    ValueError when malformed. Memoised (pure; only heads that parse are kept)."""
    got = _heads.get(raw)
    if got is not None:
        return got
    head = _parse_head(raw)
    return _heads.put(raw, head) if len(raw) <= HEAD_MEMO_MAX else head


def _parse_head(raw: bytes) -> _Head:
    lines = raw[:-4].split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3:
        raise ValueError(f"malformed status line {lines[0][:80]!r}")
    status = int(parts[1])
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name[-1:] in (b" ", b"\t"):
            raise ValueError("malformed response header")
        headers.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
    lower = MappingProxyType({n.lower(): v for n, v in headers})
    return status, tuple(headers), parts[0] == b"HTTP/1.0", lower
