"""The OpenSSL self-check child: ``python -m pqcnet.qstp._selfcheck``.

:func:`pqcnet.qstp._ossl.run_self_check` starts this program before its own process calls
a function pointer computed from a symbol table. It resolves the same symbols, builds
a real TLS 1.3 pair in memory (ML-DSA identities from a throw-away dev CA) through the
same ``build_context`` the parent uses, and checks each call did what it should:

* ``SSL_CTX_set_num_tickets`` (called by ``build_context``): the server's
  post-handshake flight holds exactly ``TICKETS_PER_HANDSHAKE`` tickets, not OpenSSL's
  default two;
* ``SSL_key_update``: after a requested KeyUpdate each side's next write carries a
  KeyUpdate record before the data, and data keeps flowing both ways on new keys.

It prints one JSON line (the verdict, plus the module path and symbol offsets the
parent compares with its own) and exits 0. A crash here costs the parent nothing but
those two features. ``PQCNET_OSSL_SELF_CHECK_FAULT`` is read by this program only, for
tests of the parent's fallback: ``abort`` calls ``os.abort()`` where the first
KeyUpdate would be made, ``hang`` sleeps past any timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import sys
import time

from OpenSSL import SSL

#: Test hook read by this child only (see the module docstring).
FAULT_ENV = "PQCNET_OSSL_SELF_CHECK_FAULT"
_TRUST_DOMAIN = "selfcheck.invalid"
#: Bound on handshake round trips (TLS 1.3 needs two).
_MAX_ROUNDS = 8
#: A TLS record header: content type, legacy version, length.
_RECORD = struct.Struct(">BHH")


def _records(wire: bytes) -> int:
    """Number of whole TLS records in ``wire``."""
    count = pos = 0
    while pos + _RECORD.size <= len(wire):
        pos += _RECORD.size + _RECORD.unpack_from(wire, pos)[2]
        count += 1
    return count


def _pending(conn: SSL.Connection) -> bytes:
    out = b""
    while True:
        try:
            chunk = conn.bio_read(1 << 16)
        except SSL.WantReadError:
            return out
        if not chunk:
            return out
        out += chunk


def _step(conn: SSL.Connection) -> bool:
    try:
        conn.do_handshake()
    except SSL.WantReadError:
        return False
    return True


def _handshake(client: SSL.Connection, server: SSL.Connection) -> int:
    """Complete the handshake; returns how many ticket records the server sent."""
    for _ in range(_MAX_ROUNDS):
        _step(client)
        server.bio_write(_pending(client))
        if _step(server):
            tickets = _pending(server)  # written right after the server finished
            client.bio_write(tickets)
            _step(client)
            with contextlib.suppress(SSL.WantReadError):
                client.recv(1)  # processes the tickets; there is no data yet
            return _records(tickets)
        client.bio_write(_pending(server))
    raise SystemExit("self-check handshake did not finish")


def _send(sender: SSL.Connection, receiver: SSL.Connection, data: bytes) -> tuple[int, bytes]:
    """Send ``data``; returns (records on the wire, what the receiver read)."""
    sender.sendall(data)
    wire = _pending(sender)
    receiver.bio_write(wire)
    return _records(wire), receiver.recv(len(data) + 1)


def _key_updates(client: SSL.Connection, server: SSL.Connection) -> str:
    """Empty when KeyUpdate works both ways; else what went wrong."""
    from pqcnet.qstp import _ossl

    if _send(client, server, b"before") != (1, b"before"):
        return "data before the KeyUpdate did not arrive"
    _ossl.key_update(client, request_peer=True)
    if _send(client, server, b"update") != (2, b"update"):
        return "client KeyUpdate record missing or data lost after it"
    if _send(server, client, b"answer") != (2, b"answer"):
        return "server did not answer the requested KeyUpdate"
    for i in range(3):
        _ossl.key_update(server, request_peer=False)
        msg = b"round %d" % i
        if _send(server, client, msg) != (2, msg) or _send(client, server, msg) != (1, msg):
            return f"traffic broke after KeyUpdate round {i}"
    return ""


def main() -> int:
    """Run the checks and print the verdict line."""
    from pqcnet.identity import dev_identities
    from pqcnet.qstp import _ossl
    from pqcnet.qstp.tls import TICKETS_PER_HANDSHAKE, TlsPolicy, build_context, new_connection

    fault = os.environ.get(FAULT_ENV, "")
    caps = _ossl.enter_self_check_child()
    _, (sid, cid) = dev_identities(_TRUST_DOMAIN, f"spiffe://{_TRUST_DOMAIN}/t/check/server",
                                   f"spiffe://{_TRUST_DOMAIN}/t/check/client")
    sctx = build_context(sid, TlsPolicy(), server=True)  # calls SSL_CTX_set_num_tickets
    cctx = build_context(cid, TlsPolicy(), server=False)
    client = new_connection(cctx, server=False)
    server = new_connection(sctx, server=True)
    problems: list[str] = []
    tickets = _handshake(client, server)
    num_tickets = caps.num_tickets and tickets == TICKETS_PER_HANDSHAKE
    if caps.num_tickets and not num_tickets:
        problems.append(f"server sent {tickets} tickets, expected {TICKETS_PER_HANDSHAKE}")
    if fault == "abort":
        os.abort()
    if fault == "hang":
        time.sleep(3600)
    key_update = False
    if caps.key_update:
        why = _key_updates(client, server)
        key_update = not why
        if why:
            problems.append(why)
    report = {**_ossl.symbol_report(), "key_update": key_update, "num_tickets": num_tickets,
              "detail": "; ".join(problems) or "ok"}
    sys.stdout.write(json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
