"""A process-wide receive budget (``tunnel_buffer_total_bytes``): many tunnels together
cannot make a server buffer more than the budget plus the initial window each.

Checked from the peers' side: what each client could send before it ran out of credit
is counted at the client, never read from the server's own accounting."""

from __future__ import annotations

import asyncio
import os

import pytest

from pqcnet import qstp
from pqcnet.qstp import events as ev
from pqcnet.qstp import frames as fr
from pqcnet.qstp.aio import Stream, Tunnel
from pqcnet.qstp.budget import ReceiveBudget
from pqcnet.qstp.config import INITIAL_WINDOW, QstpConfiguration
from pqcnet.qstp.connection import Connection
from pqcnet.qstp.frames import ErrorCode, FrameType

from .qstputil import Mesh, make_mesh, running_server
from .test_connection import drain, inject, open_pair, pump, terminated

pytestmark = pytest.mark.timeout(60)

WINDOW = 4 * INITIAL_WINDOW  # 256 KiB per tunnel
EXTRA = WINDOW - INITIAL_WINDOW


def _pair(server_cfg: QstpConfiguration) -> tuple[Connection, Connection]:
    """A client with default settings against a server with ``server_cfg``, open."""
    return open_pair(QstpConfiguration(), server_cfg)


def _server_cfg(total: int) -> QstpConfiguration:
    return QstpConfiguration().with_buffer(WINDOW, total)


def test_windows_come_from_the_budget_first_come_first_served() -> None:
    cfg = _server_cfg(EXTRA + EXTRA // 2)
    budget = cfg.receive_budget
    assert budget is not None
    pairs = [_pair(cfg) for _ in range(3)]
    # what each client was granted, as the client sees it
    assert [c.connection_send_window for c, _ in pairs] == [
        WINDOW, INITIAL_WINDOW + EXTRA // 2, INITIAL_WINDOW]
    assert budget.reserved == budget.total and budget.free == 0
    assert budget.reduced_starts == 2
    for c, s in pairs:
        c.close()
        pump(c, s)
        assert s.closed
    assert budget.reserved == 0


def test_a_peer_sending_past_its_reduced_window_is_cut_off() -> None:
    """The attacker's case: a client ignores the smaller window it was granted."""
    cfg = _server_cfg(0)  # nothing beyond the initial window
    c, s = _pair(cfg)
    assert c.connection_send_window == INITIAL_WINDOW
    chunk = b"x" * fr.MAX_DATA_CHUNK
    raw = b"".join(fr.encode(FrameType.DATA, 1, i, chunk)
                   for i in range(INITIAL_WINDOW // len(chunk) + 1))
    inject(c, s, raw)
    assert terminated(s).error_code == ErrorCode.FLOW_CONTROL_ERROR


def test_a_reduced_window_still_moves_data() -> None:
    """Credit comes back at half of the window the connection holds, not half of the
    configured one (which a 64 KiB window would never reach): 1 MiB goes through."""
    cfg = _server_cfg(0)
    c, s = _pair(cfg)
    sid = c.open_stream()
    sent = received = 0
    total = 1 << 20
    for _ in range(10_000):
        if sent < total:
            n = min(c.send_window(sid), fr.MAX_DATA_CHUNK, total - sent)
            if n:
                c.send_data(sid, b"y" * n)
                sent += n
        pump(c, s)
        for e in drain(s):
            if isinstance(e, ev.DataReceived):
                received += len(e.data)
                s.consumed(sid, len(e.data))
        pump(c, s)
        drain(c)
        if received == total:
            break
    assert received == total
    assert c.connection_send_window <= INITIAL_WINDOW  # never more than it was granted


def test_freed_budget_tops_a_reduced_window_up_and_every_end_gives_back() -> None:
    cfg = _server_cfg(EXTRA)
    budget = cfg.receive_budget
    assert budget is not None
    (c1, s1), (c2, s2) = _pair(cfg), _pair(cfg)
    assert c2.connection_send_window == INITIAL_WINDOW
    c1.close()
    pump(c1, s1)
    assert budget.reserved == 0
    # c2 sends half of its window; when the server consumes it, the ACK also carries
    # the freed budget: the client's window grows to the full one
    sid = c2.open_stream()
    c2.send_data(sid, b"z" * (INITIAL_WINDOW // 2))
    pump(c2, s2)
    got = sum(len(e.data) for e in drain(s2) if isinstance(e, ev.DataReceived))
    assert s2.consumed(sid, got) is True
    pump(c2, s2)
    assert c2.connection_send_window == WINDOW
    assert budget.reserved == EXTRA
    # an abrupt end (the socket lost, no close) gives the reservation back too
    s2.receive_eof(0.0)
    assert s2.closed and budget.reserved == 0


def test_budget_rejects_bad_bookkeeping() -> None:
    b = ReceiveBudget(10)
    assert b.take(7) == 7 and b.take(7) == 3 and b.take(1) == 0
    with pytest.raises(ValueError):
        b.give_back(11)
    b.give_back(10)
    assert b.free == 10
    with pytest.raises(ValueError):
        ReceiveBudget(-1)


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    return make_mesh()


async def test_many_tunnels_against_a_server_that_does_not_read(mesh: Mesh) -> None:
    """Six tunnels blast data at a server whose handler never reads. Without a budget
    they could make it buffer 6 windows; with one of two windows, what all clients
    managed to send (counted at the clients) stays within the budget plus the initial
    window each — and the budget was used, not bypassed."""
    n = 6
    cfg = QstpConfiguration().with_buffer(WINDOW, 2 * WINDOW)
    budget = cfg.receive_budget
    assert budget is not None
    streams: list[Stream] = []
    hold = asyncio.Event()

    async def handler(tunnel: Tunnel) -> None:
        async for stream in tunnel:
            streams.append(stream)  # never read
        await hold.wait()

    async def blast(tunnel: Tunnel) -> int:
        stream = tunnel.open_stream()
        chunk = os.urandom(16 * 1024)
        sent = 0
        try:
            while True:
                await asyncio.wait_for(stream.send(chunk), 0.5)
                sent += len(chunk)
        except TimeoutError:
            return sent  # out of credit: the server stopped granting

    async with running_server(mesh, handler, config=cfg) as server:
        tunnels = [await qstp.connect("127.0.0.1", server.port, mesh.client)
                   for _ in range(n)]
        try:
            sent = await asyncio.gather(*(blast(t) for t in tunnels))
            limit = budget.total + n * INITIAL_WINDOW
            assert sum(sent) <= limit, (sent, limit)
            assert sum(sent) > n * INITIAL_WINDOW  # the budget's credit was granted
            assert budget.reserved == budget.total
            assert budget.reduced_starts >= n - 2
        finally:
            for t in tunnels:
                await t.close()
            hold.set()
        for _ in range(200):
            if budget.reserved == 0:
                break
            await asyncio.sleep(0.02)
        assert budget.reserved == 0
