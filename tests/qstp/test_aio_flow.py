"""Backpressure, PAUSE/RESUME, rekey and cancellation over real loopback sockets."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from pqcnet import qstp
from pqcnet.qstp import events as ev
from pqcnet.qstp.aio import Stream, Tunnel
from pqcnet.qstp.config import QstpConfiguration
from pqcnet.qstp.errors import TunnelClosed

from .qstputil import Mesh, make_mesh, running_server

pytestmark = pytest.mark.timeout(60)

SMALL = QstpConfiguration(stream_window=128 * 1024, connection_window=256 * 1024)


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    return make_mesh()


async def _until(cond: object, what: str) -> None:
    for _ in range(500):
        if callable(cond) and cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


class _Parked:
    """A server handler that hands every stream its peers open to the test (which
    reads them, or not) and keeps each tunnel until ``done`` is set."""

    def __init__(self) -> None:
        self.got: asyncio.Queue[Stream] = asyncio.Queue()
        self.done = asyncio.Event()
        self.tunnels: list[Tunnel] = []

    async def handler(self, tunnel: Tunnel) -> None:
        self.tunnels.append(tunnel)
        async for stream in tunnel:
            await self.got.put(stream)
        await self.done.wait()


async def test_slow_reader_makes_the_sender_wait(mesh: Mesh) -> None:
    parked = _Parked()
    got, done, handler = parked.got, parked.done, parked.handler

    payload = os.urandom(4 * 1024 * 1024)
    async with running_server(mesh, handler, config=SMALL) as server:
        tunnel = await qstp.connect("127.0.0.1", server.port, mesh.client, config=SMALL)
        stream = tunnel.open_stream()
        sender = asyncio.create_task(stream.send(payload, end=True))
        far = await got.get()
        # the receiver reads nothing: the sender runs out of credit and waits
        await _until(lambda: tunnel.connection.send_window(stream.id) == 0, "sender blocked")
        await asyncio.sleep(0.05)
        assert not sender.done()
        buffered = sum(len(c) for c in far._chunks)
        assert buffered <= SMALL.stream_window
        assert tunnel.connection.bytes_sent < len(payload) // 4
        # now read: the sender finishes and every byte arrives in order
        received = await far.read_all(len(payload))
        await sender
        assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
        done.set()
        await tunnel.close()


async def test_pause_and_resume_are_observed_end_to_end(mesh: Mesh) -> None:
    server_tunnel: asyncio.Future[Tunnel] = asyncio.get_running_loop().create_future()
    received: list[bytes] = []
    finished = asyncio.Event()

    async def handler(tunnel: Tunnel) -> None:
        server_tunnel.set_result(tunnel)
        async for stream in tunnel:
            async for chunk in stream:
                received.append(chunk)
        finished.set()

    async with running_server(mesh, handler) as server:
        tunnel = await qstp.connect("127.0.0.1", server.port, mesh.client)
        flow: list[ev.FlowPaused | ev.FlowResumed] = []
        tunnel.on_flow = flow.append
        stream = tunnel.open_stream()
        await stream.send(b"before")
        far = await server_tunnel
        await _until(lambda: received == [b"before"], "first chunk")

        far.pause(None, reason=7)
        await _until(lambda: len(flow) == 1, "PAUSE at the client")
        assert isinstance(flow[0], ev.FlowPaused) and flow[0].reason == 7
        assert tunnel.peer_paused() is not None
        blocked = asyncio.create_task(stream.send(b"during"))
        await asyncio.sleep(0.1)
        assert not blocked.done()
        assert received == [b"before"]

        far.resume(None, reason=7)
        await blocked
        await _until(lambda: received == [b"before", b"during"], "chunk after RESUME")
        assert isinstance(flow[1], ev.FlowResumed)
        assert tunnel.peer_paused() is None
        await stream.close()
        await tunnel.close()
        await asyncio.wait_for(finished.wait(), 5)


async def test_pause_with_retry_after_lets_the_sender_retry(mesh: Mesh) -> None:
    server_tunnel: asyncio.Future[Tunnel] = asyncio.get_running_loop().create_future()
    received: list[bytes] = []

    async def handler(tunnel: Tunnel) -> None:
        server_tunnel.set_result(tunnel)
        async for stream in tunnel:
            async for chunk in stream:
                received.append(chunk)

    async with running_server(mesh, handler) as server:
        tunnel = await qstp.connect("127.0.0.1", server.port, mesh.client)
        stream = tunnel.open_stream()
        await stream.send(b"a")
        far = await server_tunnel
        paused = asyncio.Event()
        tunnel.on_flow = lambda e: paused.set()
        far.pause(stream.id, reason=3, retry_after=0.2)
        await asyncio.wait_for(paused.wait(), 5)
        p = tunnel.peer_paused(stream.id)
        assert p is not None and p.retry_after == pytest.approx(0.2)
        await stream.send(b"b")  # waits out retry_after, then goes
        await _until(lambda: received == [b"a", b"b"], "retry after pause")
        await tunnel.close()


async def test_rekey_after_n_bytes_while_data_flows_intact(mesh: Mesh) -> None:
    cfg = QstpConfiguration(rekey_after_bytes=256 * 1024)
    seen: list[ev.KeyUpdated] = []
    async with running_server(mesh) as server:
        tunnel = await qstp.connect("127.0.0.1", server.port, mesh.client, config=cfg)
        tunnel.on_key_update = seen.append
        payload = os.urandom(3 * 1024 * 1024)
        stream = tunnel.open_stream()
        sender = asyncio.create_task(stream.send(payload, end=True))
        echoed = await stream.read_all(len(payload))
        await sender
        assert echoed == payload
        assert tunnel.key_updates >= 10
        assert len(seen) == tunnel.key_updates and all(e.local for e in seen)
        # the TLS connection still works after all those KeyUpdates
        assert await tunnel.ping() >= 0
        await tunnel.close()


async def test_cancelled_send_and_recv_leave_the_stream_usable(mesh: Mesh) -> None:
    async with running_server(mesh, config=SMALL) as server:
        tunnel = await qstp.connect("127.0.0.1", server.port, mesh.client, config=SMALL)
        stream = tunnel.open_stream()
        reader = asyncio.create_task(stream.recv())
        await asyncio.sleep(0.02)
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        await stream.send(b"ping")
        assert await stream.recv() == b"ping"
        await stream.close()
        assert await stream.recv() == b""
        await tunnel.close()


async def test_streams_nobody_accepts_are_refused_not_queued(mesh: Mesh) -> None:
    cfg = QstpConfiguration(max_streams=4)
    release = asyncio.Event()

    async def handler(tunnel: Tunnel) -> None:
        await release.wait()  # never accepts a stream

    async with running_server(mesh, handler, config=cfg) as server:
        tunnel = await qstp.connect("127.0.0.1", server.port, mesh.client, config=cfg)
        streams = [tunnel.open_stream() for _ in range(10)]
        for s in streams:
            await s.send(b"x", end=True)
        refused = 0
        for s in streams[4:]:
            with pytest.raises(TunnelClosed, match="reset by peer"):
                await asyncio.wait_for(s.recv(), 5)
            refused += 1
        assert refused == 6
        release.set()
        await tunnel.close()


async def test_reset_after_the_peers_end_reaches_a_blocked_sender(mesh: Mesh) -> None:
    """A peer that ended its side and then resets the stream (a gRPC client that
    cancels after its last message): ``recv`` has reported the clean end, but the local
    side still learns of the reset — ``wait_failed`` returns and a ``send`` waiting for
    credit fails instead of waiting forever — and the tunnel drops both streams."""
    parked = _Parked()
    got, done, handler, tunnels = parked.got, parked.done, parked.handler, parked.tunnels

    async with running_server(mesh, handler, config=SMALL) as server:
        tunnel = await qstp.connect("127.0.0.1", server.port, mesh.client, config=SMALL)
        stream = tunnel.open_stream()
        await stream.send(b"request", end=True)
        far = await got.get()
        assert await far.read_all(100) == b"request"
        # the far side answers faster than we read: it blocks on our window
        sender = asyncio.create_task(far.send(os.urandom(4 * SMALL.stream_window)))
        await _until(lambda: tunnels[0].connection.send_window(far.id) == 0, "sender blocked")
        watcher = asyncio.create_task(far.wait_failed())
        await asyncio.sleep(0.05)
        assert not sender.done() and not watcher.done()
        stream.reset()  # we give up
        with pytest.raises(TunnelClosed):
            await asyncio.wait_for(sender, 10)
        assert isinstance(await asyncio.wait_for(watcher, 10), TunnelClosed)
        assert stream.id not in tunnel._streams  # a local reset releases the stream
        assert far.id not in tunnels[0]._streams
        await tunnel.close()
        done.set()


async def test_a_local_reset_reaches_a_sender_blocked_on_that_stream(mesh: Mesh) -> None:
    """The sender's own side gives up on a stream whose peer stopped reading (the
    sentry's write watch, a timeout elsewhere): ``reset()`` from another task must fail
    the ``send`` waiting for credit at once. Before, it waited on until the tunnel's
    next credit — which a peer that reads nothing never sends."""
    parked = _Parked()
    got, done, handler = parked.got, parked.done, parked.handler

    async with running_server(mesh, handler, config=SMALL) as server:
        tunnel = await qstp.connect("127.0.0.1", server.port, mesh.client, config=SMALL)
        stream = tunnel.open_stream()
        sender = asyncio.create_task(stream.send(os.urandom(4 * SMALL.stream_window)))
        await got.get()  # the far side never reads it
        await _until(lambda: tunnel.connection.send_window(stream.id) == 0, "sender blocked")
        await asyncio.sleep(0.05)
        assert not sender.done()
        stream.reset()
        with pytest.raises(TunnelClosed, match="reset locally"):
            await asyncio.wait_for(sender, 5)
        other = tunnel.open_stream()  # the tunnel is fine
        await other.send(b"still here", end=True)
        assert await (await got.get()).read_all(100) == b"still here"
        done.set()
        await tunnel.close()


async def test_default_window_is_granted_in_full_and_bounds_a_reader_that_stops(
        mesh: Mesh) -> None:
    """With default windows a sender gets exactly ``stream_window`` bytes in flight
    to a receiver that reads nothing (a bulk sender is not held to less, and a
    stopped reader buffers no more), then everything arrives once it reads."""
    window = QstpConfiguration().stream_window
    got: asyncio.Queue[Stream] = asyncio.Queue()

    async def handler(tunnel: Tunnel) -> None:
        async for stream in tunnel:
            await got.put(stream)

    payload = os.urandom(2 * window + 12345)
    async with running_server(mesh, handler) as server:
        tunnel = await qstp.connect("127.0.0.1", server.port, mesh.client)
        stream = tunnel.open_stream()
        sender = asyncio.create_task(stream.send(payload, end=True))
        far = await got.get()
        await _until(lambda: tunnel.connection.send_window(stream.id) == 0, "sender blocked")
        await _until(lambda: sum(len(c) for c in far._chunks) == window,
                     "the whole window buffered at the receiver")
        await asyncio.sleep(0.05)
        assert sum(len(c) for c in far._chunks) == window
        assert not sender.done()
        received = await far.read_all(len(payload))
        await sender
        assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
        await tunnel.close()


async def test_a_local_reset_reaches_a_sender_waiting_for_a_full_transport(
        mesh: Mesh) -> None:
    """The peer stopped reading its *socket* (not just its streams): the sender's
    transport fills and its ``send`` waits for the drain, with QSTP credit left. The
    local reset must fail that ``send`` too; before, it waited until the socket
    drained."""
    big = QstpConfiguration(stream_window=64 * 1024 * 1024,
                            connection_window=64 * 1024 * 1024)
    parked = _Parked()
    got, done, handler, peers = parked.got, parked.done, parked.handler, parked.tunnels

    async with running_server(mesh, handler, config=big) as server:
        tunnel = await qstp.connect("127.0.0.1", server.port, mesh.client, config=big)
        stream = tunnel.open_stream()
        await stream.send(os.urandom(16 * 1024 * 1024))  # read in full: credit granted
        far = await got.get()
        n = 0
        while n < 16 * 1024 * 1024:
            n += len(await far.recv())
        await _until(lambda: tunnel.connection.send_window(stream.id) > 16 * 1024 * 1024,
                     "credit for more")
        assert peers[0]._transport is not None
        peers[0]._transport.pause_reading()  # now the peer reads nothing from its socket
        sender = asyncio.create_task(stream.send(os.urandom(48 * 1024 * 1024)))
        await _until(lambda: tunnel._write_paused, "transport full")
        await asyncio.sleep(0.5)  # the kernel's buffers fill too: nothing drains any more
        assert tunnel._write_paused and not sender.done()
        assert tunnel.connection.send_window(stream.id) > 0  # credit left: not a credit wait
        stream.reset()
        with pytest.raises(TunnelClosed, match="reset locally"):
            await asyncio.wait_for(sender, 5)
        peers[0]._transport.resume_reading()
        done.set()
        await tunnel.close()


async def test_sends_on_one_stream_leave_in_the_order_they_were_made(mesh: Mesh) -> None:
    """Three sends on one stream: ``big`` (more than the window: it waits for credit),
    ``middle`` from another task (queued behind it), then ``last`` made by the first
    task the moment ``big`` returns — credit is there by then. The bytes must arrive
    big, middle, last. Before, ``last`` took the fast path (the send lock was free for
    the instant between ``big`` releasing it and ``middle`` running) and overtook
    ``middle``: a publisher's concurrent requests reached the relayer out of order,
    which refuses a seq below the last it accepted ("seq 57 after 72", seen in CI)."""
    parked = _Parked()
    big, middle, last = b"B" * (SMALL.stream_window + 4096), b"M" * 100, b"L" * 100
    async with running_server(mesh, parked.handler, config=SMALL) as server:
        tunnel = await qstp.connect("127.0.0.1", server.port, mesh.client, config=SMALL)
        stream = tunnel.open_stream()

        async def first() -> None:
            await stream.send(big)
            await stream.send(last)  # no await in between: right after the release

        sender = asyncio.create_task(first())
        far = await parked.got.get()
        await _until(lambda: tunnel.connection.send_window(stream.id) == 0, "big blocked")
        queued = asyncio.create_task(stream.send(middle))
        await asyncio.sleep(0.05)
        assert not queued.done()
        received = b""
        while len(received) < len(big) + len(middle) + len(last):
            received += await far.recv()
        await asyncio.gather(sender, queued)
        assert received == big + middle + last, (
            received[len(big):len(big) + 1], received[-1:])
        parked.done.set()
        await tunnel.close()
