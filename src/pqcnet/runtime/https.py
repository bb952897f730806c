"""HTTP/1.1 over the project's post-quantum TLS: h11 on a pyOpenSSL memory BIO.

The stdlib ``ssl`` here is OpenSSL 3.0 and speaks neither ML-KEM nor ML-DSA, so
uvicorn, httpx and curl cannot serve or call an endpoint whose certificate is
ML-DSA (decision 0015). This module is the small replacement: TLS 1.3 through
:mod:`pqcnet.qstp.tls` (X25519MLKEM768, ML-DSA certificates, ALPN ``http/1.1``)
driven over asyncio streams with a memory BIO, and **h11** as the sans-IO HTTP
parser — no hand-written HTTP parsing. One request per connection on the client
side; the server honours keep-alive.

Bounds (each names the risk it bounds): :data:`MAX_HEADER_BYTES`,
:data:`MAX_BODY_BYTES`, :data:`MAX_CONNECTIONS`, :data:`HANDSHAKE_TIMEOUT_S`,
:data:`REQUEST_TIMEOUT_S`. A malformed request gets a 400 (or 413) and the
connection closes; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import h11
from OpenSSL import SSL

from pqcnet.errors import PqcnetError
from pqcnet.identity.node import NodeIdentity
from pqcnet.qstp.errors import HandshakeError
from pqcnet.qstp.tls import (
    PeerInfo,
    TlsPolicy,
    build_anonymous_client_context,
    build_context,
    handshake_error,
    new_connection,
    verify_peer,
    verify_server,
)
from pqcnet.runtime.errors import HttpsError

log = logging.getLogger(__name__)

ALPN_HTTP1 = b"http/1.1"
#: Request line + headers: bounds memory spent on a client that never ends its headers.
MAX_HEADER_BYTES = 16 * 1024
#: Request/response body: a CSR plus an attestation is ~10 KiB; a CRL can be larger.
MAX_BODY_BYTES = 4 * 1024 * 1024
#: Connections served at once: each holds a TLS object and buffers.
MAX_CONNECTIONS = 256
#: Seconds a peer may take to finish the TLS handshake (a stalled one holds a slot).
HANDSHAKE_TIMEOUT_S = 10.0
#: Seconds between bytes of one request before the server gives up on it.
REQUEST_TIMEOUT_S = 10.0
_READ_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class Request:
    """One HTTP request as the service sees it."""

    method: str
    #: path and query, e.g. ``/v1/crl``
    target: str
    #: header names lower-cased; a repeated header keeps its last value
    headers: dict[str, str]
    body: bytes
    #: the verified client certificate's identity, ``None`` when none was sent
    peer: PeerInfo | None
    #: the client's address (rate limits key on it)
    remote: str


@dataclass(frozen=True, slots=True)
class Response:
    """What a handler returns."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = field(default_factory=tuple)


Handler = Callable[[Request], Awaitable[Response]]


class TlsChannel:
    """A pyOpenSSL connection (memory BIO) over an asyncio stream pair."""

    def __init__(self, tls: SSL.Connection | None, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.tls = tls
        self.reader = reader
        self.writer = writer

    async def _flush(self) -> None:
        if self.tls is None:
            return
        while True:
            try:
                chunk = self.tls.bio_read(_READ_CHUNK)
            except SSL.WantReadError:
                break
            if not chunk:
                break
            self.writer.write(chunk)
        await self.writer.drain()

    async def handshake(self) -> None:
        """Run the TLS handshake; a failure raises :class:`HandshakeError`."""
        if self.tls is None:
            return
        while True:
            try:
                self.tls.do_handshake()
                break
            except SSL.WantReadError:
                await self._flush()
                data = await self.reader.read(_READ_CHUNK)
                if not data:
                    raise handshake_error(SSL.ZeroReturnError()) from None
                self.tls.bio_write(data)
            except (SSL.Error, HandshakeError) as exc:
                with contextlib.suppress(OSError, ConnectionError):
                    await self._flush()  # the alert tells the peer why
                raise handshake_error(exc) from None
        await self._flush()

    async def recv(self) -> bytes:
        """Some plaintext, or ``b""`` once the peer has closed."""
        if self.tls is None:
            return await self.reader.read(_READ_CHUNK)
        while True:
            try:
                return self.tls.recv(_READ_CHUNK)
            except SSL.WantReadError:
                await self._flush()
                data = await self.reader.read(_READ_CHUNK)
                if not data:
                    return b""
                self.tls.bio_write(data)
            except (SSL.ZeroReturnError, SSL.SysCallError):
                return b""
            except (SSL.Error, HandshakeError) as exc:
                # in TLS 1.3 a server's refusal of our certificate arrives here
                raise handshake_error(exc) from None

    async def send(self, data: bytes) -> None:
        if self.tls is None:
            self.writer.write(data)
            await self.writer.drain()
            return
        try:
            self.tls.sendall(data)
        except SSL.Error as exc:
            raise HttpsError(f"TLS write failed: {exc}") from None
        await self._flush()

    async def close(self) -> None:
        if self.tls is not None:
            with contextlib.suppress(SSL.Error, OSError, ConnectionError):
                self.tls.shutdown()
                await self._flush()
        self.writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self.writer.wait_closed()


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def http_policy(base: TlsPolicy | None = None, **changes: object) -> TlsPolicy:
    """A :class:`TlsPolicy` for HTTP/1.1 (ALPN ``http/1.1``, no session tickets)."""
    import dataclasses

    base = base or TlsPolicy()
    return dataclasses.replace(base, alpn=ALPN_HTTP1, session_tickets=False,
                               **changes)  # type: ignore[arg-type]


class HttpsServer:
    """Serve ``handler`` over PQ TLS (or plain HTTP when ``identity`` is ``None``).

    Client certificates are optional at the TLS layer and verified when sent; the
    handler decides which endpoints need one (:attr:`Request.peer`).
    :meth:`set_identity` swaps the server certificate/CRL for new connections.
    """

    def __init__(self, handler: Handler, identity: NodeIdentity | None,
                 policy: TlsPolicy | None = None, *, max_connections: int = MAX_CONNECTIONS,
                 request_timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.handler = handler
        self.policy = http_policy(policy)
        self.identity = identity
        self._ctx: SSL.Context | None = None
        if identity is not None:
            self.set_identity(identity)
        self._slots = asyncio.Semaphore(max_connections)
        self.request_timeout_s = request_timeout_s
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        self.handshake_failures = 0

    def set_identity(self, identity: NodeIdentity) -> None:
        """Present ``identity`` (and check clients against its bundle and CRL) from
        the next connection on; open connections keep the context they started with."""
        self._ctx = build_context(identity, self.policy, server=True, client_cert="optional")
        self.identity = identity

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await asyncio.start_server(self._accept, host, port,
                                                  limit=MAX_HEADER_BYTES * 4)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            if self._slots.locked():
                writer.close()  # over the connection bound: refuse before any TLS work
                return
            async with self._slots:
                await self._serve_connection(reader, writer)
        except (OSError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def _serve_connection(self, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        _nodelay(writer)
        peername = writer.get_extra_info("peername")
        remote = str(peername[0]) if peername else "?"
        ctx, identity = self._ctx, self.identity
        tls = new_connection(ctx, server=True) if ctx is not None else None
        chan = TlsChannel(tls, reader, writer)
        peer: PeerInfo | None = None
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                await chan.handshake()
            if tls is not None and identity is not None and tls.get_peer_certificate() is not None:
                peer = verify_peer(tls, identity, self.policy)
        except (HandshakeError, TimeoutError) as exc:
            self.handshake_failures += 1
            log.info("https handshake failed", extra={"remote": remote, "reason": str(exc)})
            await chan.close()
            return
        try:
            await self._http_loop(chan, peer, remote)
        finally:
            await chan.close()

    async def _http_loop(self, chan: TlsChannel, peer: PeerInfo | None, remote: str) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        request: h11.Request | None = None
        body = bytearray()
        while True:
            try:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    async with asyncio.timeout(self.request_timeout_s):
                        data = await chan.recv()
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    request, body = event, bytearray()
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > MAX_BODY_BYTES:
                        await self._send(chan, conn, _error(413, "too_large",
                                                            f"body over {MAX_BODY_BYTES} bytes"))
                        return
                elif isinstance(event, h11.EndOfMessage) and request is not None:
                    response = await self._dispatch(request, bytes(body), peer, remote)
                    await self._send(chan, conn, response)
                    if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                        return
                    conn.start_next_cycle()
                    request = None
                elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                    return
            except h11.RemoteProtocolError as exc:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    status = exc.error_status_hint
                    await self._send(chan, conn, _error(status, "bad_http", str(exc)))
                return
            except TimeoutError:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE) and request is not None:
                    await self._send(chan, conn, _error(408, "timeout", "request incomplete"))
                return
            except HandshakeError:
                return

    async def _dispatch(self, request: h11.Request, body: bytes, peer: PeerInfo | None,
                        remote: str) -> Response:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers}
        req = Request(request.method.decode("ascii", "replace"),
                      request.target.decode("ascii", "replace"), headers, body, peer, remote)
        try:
            return await self.handler(req)
        except PqcnetError as exc:
            log.warning("handler failed", extra={"target": req.target, "reason": str(exc)})
            return _error(500, "internal", "the service failed to handle this request")

    async def _send(self, chan: TlsChannel, conn: h11.Connection, response: Response) -> None:
        headers = [("content-type", response.content_type),
                   ("content-length", str(len(response.body))), *response.headers]
        try:
            out = conn.send(h11.Response(status_code=response.status, headers=headers))
            out_body = conn.send(h11.Data(data=response.body)) if response.body else b""
            end = conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            return
        await chan.send((out or b"") + (out_body or b"") + (end or b""))


def _error(status: int, code: str, message: str) -> Response:
    import json

    return Response(status, json.dumps({"error": {"code": code, "message": message}}).encode())


# --------------------------------------------------------------------------- client


@dataclass(frozen=True, slots=True)
class ClientResponse:
    """What :func:`request` got back."""

    status: int
    headers: dict[str, str]
    body: bytes
    #: the server's verified identity (``None`` over plain HTTP)
    server: PeerInfo | None


def parse_url(url: str) -> tuple[str, str, int]:
    """``https://host:port`` -> (scheme, host, port); anything else is an HttpsError."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise HttpsError(f"{url!r} is not an https://host:port URL")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise HttpsError(f"{url!r} has a bad port") from None
    return parts.scheme, parts.hostname, port


async def request(
    url: str, method: str, path: str, body: bytes = b"", *,
    trust_bundle_pem: bytes | None = None, server_pattern: str = "",
    identity: NodeIdentity | None = None, headers: tuple[tuple[str, str], ...] = (),
    timeout_s: float = 15.0, policy: TlsPolicy | None = None,
) -> ClientResponse:
    """One HTTP/1.1 request over PQ TLS (mutual when ``identity`` is given).

    Without ``identity`` the client presents no certificate and pins the server by
    ``trust_bundle_pem`` and ``server_pattern`` (a SPIFFE pattern). With one, the
    server must chain to the identity's bundle and match ``server_pattern`` (or be in
    its trust domain when empty). ``http://`` URLs (the public CRL) skip TLS.
    """
    scheme, host, port = parse_url(url)
    pol = http_policy(policy, allowed_peers=(server_pattern,) if server_pattern else ())
    tls: SSL.Connection | None = None
    if scheme == "https":
        if identity is not None:
            ctx = build_context(identity, pol, server=False)
        else:
            if trust_bundle_pem is None or not server_pattern:
                raise HttpsError("an https request without a client identity needs the CA "
                                 "bundle and the server's SPIFFE pattern to pin")
            ctx = build_anonymous_client_context(trust_bundle_pem, pol)
        tls = new_connection(ctx, server=False)
    try:
        async with asyncio.timeout(timeout_s):
            try:
                reader, writer = await asyncio.open_connection(host, port,
                                                               limit=MAX_HEADER_BYTES * 4)
            except OSError as exc:
                raise HttpsError(f"cannot connect to {host}:{port}: {exc}") from None
            _nodelay(writer)
            chan = TlsChannel(tls, reader, writer)
            try:
                return await _exchange(chan, tls, identity, pol, host, method, path, body,
                                       headers)
            finally:
                await chan.close()
    except TimeoutError:
        raise HttpsError(f"no answer from {url} in {timeout_s}s") from None
    except HandshakeError as exc:
        raise HttpsError(f"TLS with {url} failed: {exc}") from None
    except OSError as exc:  # reset / broken pipe mid-exchange: the server went away
        raise HttpsError(f"connection to {url} lost: {exc}") from None


async def _exchange(chan: TlsChannel, tls: SSL.Connection | None,
                    identity: NodeIdentity | None, pol: TlsPolicy, host: str, method: str,
                    path: str, body: bytes, headers: tuple[tuple[str, str], ...]
                    ) -> ClientResponse:
    await chan.handshake()
    server: PeerInfo | None = None
    if tls is not None:
        server = (verify_peer(tls, identity, pol) if identity is not None
                  else verify_server(tls, pol))
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES)
    hdrs = [("host", host), ("content-length", str(len(body))), ("connection", "close"),
            ("user-agent", "pqcnet"), *headers]
    if body:
        hdrs.append(("content-type", "application/json"))
    try:
        out = conn.send(h11.Request(method=method, target=path, headers=hdrs)) or b""
        if body:
            out += conn.send(h11.Data(data=body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
    except h11.LocalProtocolError as exc:
        raise HttpsError(f"cannot build the request: {exc}") from None
    await chan.send(out)
    status = 0
    resp_headers: dict[str, str] = {}
    data = bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise HttpsError(f"malformed response: {exc}") from None
        if event is h11.NEED_DATA:
            conn.receive_data(await chan.recv())
        elif isinstance(event, h11.Response):
            status = event.status_code
            resp_headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                            for k, v in event.headers}
        elif isinstance(event, h11.Data):
            data += event.data
            if len(data) > MAX_BODY_BYTES:
                raise HttpsError(f"response body over {MAX_BODY_BYTES} bytes")
        elif isinstance(event, h11.EndOfMessage):
            return ClientResponse(status, resp_headers, bytes(data), server)
        elif isinstance(event, h11.ConnectionClosed):
            raise HttpsError("server closed the connection before answering")


__all__ = [
    "ALPN_HTTP1",
    "ClientResponse",
    "Handler",
    "HttpsServer",
    "Request",
    "Response",
    "TlsChannel",
    "http_policy",
    "parse_url",
    "request",
]
