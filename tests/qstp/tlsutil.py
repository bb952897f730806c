"""Memory-BIO TLS harness shared by the QSTP tests (not product code).

``handshake_pair`` shuttles bytes between two ``SSL.Connection`` objects until
both finish or one fails, then lets the other side read whatever alert was sent,
so a test sees *both* ends' view of a refused handshake.
"""

from __future__ import annotations

from dataclasses import dataclass

from OpenSSL import SSL

from pqcnet.qstp.errors import HandshakeError
from pqcnet.qstp.tls import handshake_error

#: Bound on shuttle rounds: a TLS 1.3 handshake needs 3-4; anything more is a bug.
MAX_ROUNDS = 50


@dataclass
class HandshakeOutcome:
    """What each side saw; ``None`` means that side completed without error."""

    client_error: HandshakeError | None
    server_error: HandshakeError | None

    @property
    def ok(self) -> bool:
        return self.client_error is None and self.server_error is None


def transfer(src: SSL.Connection, dst: SSL.Connection) -> int:
    """Move every pending outgoing TLS byte from ``src`` into ``dst``."""
    moved = 0
    while True:
        try:
            data = src.bio_read(65536)
        except SSL.WantReadError:
            return moved
        if not data:
            return moved
        dst.bio_write(data)
        moved += len(data)


def _step(conn: SSL.Connection) -> tuple[bool, HandshakeError | None]:
    try:
        conn.do_handshake()
    except SSL.WantReadError:
        return False, None
    except (SSL.Error, HandshakeError) as exc:
        return False, handshake_error(exc)
    return True, None


def _poll_read(conn: SSL.Connection) -> HandshakeError | None:
    """Read once so post-handshake messages (alerts, tickets) are processed."""
    try:
        conn.recv(65536)
    except SSL.WantReadError:
        return None
    except (SSL.Error, HandshakeError) as exc:
        return handshake_error(exc)
    return None


def handshake_pair(client: SSL.Connection, server: SSL.Connection) -> HandshakeOutcome:
    """Pump a handshake to completion or failure and report both sides."""
    c_done = s_done = False
    c_err: HandshakeError | None = None
    s_err: HandshakeError | None = None
    for _ in range(MAX_ROUNDS):
        if not c_done and c_err is None:
            c_done, c_err = _step(client)
        transfer(client, server)
        if not s_done and s_err is None:
            s_done, s_err = _step(server)
        transfer(server, client)
        if c_err or s_err or (c_done and s_done):
            break
    else:
        raise AssertionError("handshake did not converge")
    # let the other side see the alert (TLS 1.3: a client finishes before the
    # server has judged its certificate, so the refusal arrives as an alert)
    if s_err is not None and c_err is None:
        c_err = _step(client)[1] if not c_done else _poll_read(client)
    if c_err is not None and s_err is None:
        transfer(client, server)
        s_err = _step(server)[1] if not s_done else _poll_read(server)
    if c_err is None and s_err is None:
        # deliver session tickets and the like
        c_err = _poll_read(client)
        transfer(client, server)
    return HandshakeOutcome(c_err, s_err)


def exchange(sender: SSL.Connection, receiver: SSL.Connection, data: bytes) -> bytes:
    """Send application data one way and return what the receiver read."""
    view = memoryview(data)
    while view:
        view = view[sender.send(view[:16384]) :]
    transfer(sender, receiver)
    out = b""
    while len(out) < len(data):
        try:
            chunk = receiver.recv(65536)
        except SSL.WantReadError:
            break
        out += chunk
    return out
