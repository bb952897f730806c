"""Rekeying when TLS KeyUpdate is unavailable: the documented reconnect fallback.

``QstpConfiguration(tls_key_update=False)`` makes a connection behave exactly as on
an OpenSSL build where ``SSL_key_update`` cannot be resolved. Real TLS 1.3 over
memory BIOs; the assertions are the contract in :mod:`pqcnet.qstp.connection`: the first
due rekey sends GOAWAY (streams in flight finish, no new ones), the next one closes.
"""

from __future__ import annotations

import pytest

from pqcnet.crypto.errors import CryptoError
from pqcnet.qstp import _ossl
from pqcnet.qstp import events as ev
from pqcnet.qstp.config import QstpConfiguration
from pqcnet.qstp.connection import REKEY_BY_RECONNECT
from pqcnet.qstp.errors import TunnelClosed

from .test_connection import drain, open_pair, pump, terminated

pytestmark = pytest.mark.timeout(60)

NO_KU = dict(tls_key_update=False, keepalive=False, idle_timeout=1000.0)


def test_explicit_rekey_without_key_update_is_a_typed_error() -> None:
    c, s = open_pair(QstpConfiguration(**NO_KU))  # type: ignore[arg-type]
    assert not c.key_update_available
    with pytest.raises(CryptoError, match="reconnect"):
        c.rekey(1.0)
    assert not c.closed and c.key_updates == 0
    sid = c.open_stream()  # nothing changed: the tunnel still works
    c.send_data(sid, b"still here")
    pump(c, s)
    assert any(isinstance(e, ev.DataReceived) and e.data == b"still here" for e in drain(s))


def test_byte_limit_without_key_update_sends_goaway_then_closes() -> None:
    cfg = QstpConfiguration(rekey_after_bytes=100_000, rekey_interval=0, **NO_KU)  # type: ignore[arg-type]
    c, s = open_pair(cfg)
    sid = c.open_stream()
    c.send_data(sid, b"a" * 60_000)
    pump(c, s)
    drain(s)
    c.send_data(sid, b"b" * 50_000)  # crosses the first rekey point
    assert c.rekey_overdue and not c.closed and c.key_updates == 0
    pump(c, s)
    events = drain(s)
    goaways = [e for e in events if isinstance(e, ev.GoAwayReceived)]
    assert len(goaways) == 1 and goaways[0].reason == REKEY_BY_RECONNECT
    got = b"".join(e.data for e in events if isinstance(e, ev.DataReceived))
    assert got == b"b" * 50_000  # data in flight is delivered
    assert not any(isinstance(e, ev.KeyUpdated) for e in events)
    with pytest.raises(TunnelClosed, match="going away"):
        c.open_stream()  # no new streams on a tunnel whose keys are due
    # the stream in flight may go on, up to the next rekey point ...
    for e in events:
        if isinstance(e, ev.DataReceived):
            s.consumed(e.stream_id, len(e.data))
    pump(c, s)
    c.send_data(sid, b"c" * 40_000)
    assert not c.closed
    # ... where the tunnel closes rather than keep using the old keys
    with pytest.raises(TunnelClosed, match="overdue"):
        c.send_data(sid, b"d" * 70_000)
    term = terminated(c)
    assert "overdue" in term.reason and not term.by_peer
    pump(c, s)
    closed = [e for e in drain(s) if isinstance(e, ev.ConnectionTerminated)]
    assert len(closed) == 1 and closed[0].by_peer


def test_rekey_interval_without_key_update_uses_the_same_fallback() -> None:
    cfg = QstpConfiguration(rekey_interval=10.0, **NO_KU)  # type: ignore[arg-type]
    c, s = open_pair(cfg)
    assert c.get_timer() == 10.0
    c.handle_timer(10.0)
    assert c.rekey_overdue and not c.closed
    assert not any(isinstance(e, ev.KeyUpdated) for e in drain(c))
    pump(c, s, now=10.0)
    assert any(isinstance(e, ev.GoAwayReceived) and e.reason == REKEY_BY_RECONNECT
               for e in drain(s))
    assert c.get_timer() == 20.0  # the next due point, where it closes
    c.handle_timer(20.0)
    assert "overdue" in terminated(c).reason


@pytest.mark.skipif(not _ossl.key_update_supported(), reason="SSL_key_update not resolvable")
def test_with_key_update_the_same_limit_rekeys_in_place() -> None:
    """Control: the identical traffic with KeyUpdate available rekeys, no GOAWAY."""
    cfg = QstpConfiguration(rekey_after_bytes=100_000, rekey_interval=0, keepalive=False)
    c, s = open_pair(cfg)
    sid = c.open_stream()
    c.send_data(sid, b"a" * 60_000)
    pump(c, s)  # the stream's window grant arrives
    drain(s)
    c.send_data(sid, b"b" * 50_000)
    assert c.key_updates == 1 and not c.rekey_overdue
    pump(c, s)
    events = drain(s)
    assert ev.KeyUpdated(local=False) in events
    assert not any(isinstance(e, ev.GoAwayReceived) for e in events)


async def test_over_sockets_the_fallback_ends_in_a_clean_close() -> None:
    """The same contract through ``pqcnet.qstp.aio``: GOAWAY reaches the server's handler,
    ``open_stream`` refuses, and the second due point ends the tunnel on both ends."""
    import asyncio
    import contextlib

    from pqcnet import qstp
    from pqcnet.qstp.aio import Tunnel

    from .qstputil import make_mesh, running_server

    mesh = make_mesh()
    server_saw: asyncio.Future[tuple[str, str]] = asyncio.get_running_loop().create_future()

    async def sink(tunnel: Tunnel) -> None:
        with contextlib.suppress(TunnelClosed):  # the client ends the tunnel mid-stream
            async for stream in tunnel:
                while await stream.recv():
                    pass
        await tunnel.wait_closed()
        goaway = tunnel.goaway.reason if tunnel.goaway else ""
        closed = tunnel.close_reason.reason if tunnel.close_reason else ""
        server_saw.set_result((goaway, closed))

    cfg = QstpConfiguration(rekey_after_bytes=200_000, rekey_interval=0, **NO_KU)  # type: ignore[arg-type]
    async with running_server(mesh, sink, config=cfg) as server:
        tunnel = await qstp.connect("127.0.0.1", server.port, mesh.client, config=cfg)
        stream = tunnel.open_stream()
        await stream.send(b"x" * 250_000)  # past the first due point: GOAWAY
        assert tunnel.connection.rekey_overdue and not tunnel.closed
        with pytest.raises(TunnelClosed):
            tunnel.open_stream()
        with pytest.raises(TunnelClosed, match="overdue"):
            await stream.send(b"y" * 250_000)  # past the next one: closed
        async with asyncio.timeout(10):
            await tunnel.wait_closed()
            goaway, closed = await server_saw
        assert goaway == REKEY_BY_RECONNECT
        assert "overdue" in closed
