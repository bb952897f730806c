"""A client that stops reading a response lets go of what it held.

The sentry streams a large backend response to the client through QSTP flow control:
when the client stops reading, the sentry's write waits. It waited for good, holding a
concurrency-gate slot (``max_in_flight``, shared by every tenant) and a pooled backend
connection — a handful of such clients shut everyone out. Now a write that waits
``bounds.response_write_timeout`` resets the stream: the slot and the connection are
released and ``pqcnet_sentry_rejections_total{reason="ClientTooSlow"}`` counts it. A
slow client that keeps reading is not cut (the deadline is per write, not per
response)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pqcnet.sentry.sidecar import serve_http
from tests.relayer.helpers import eventually

from .harness import (
    HttpBackend,
    Mesh,
    Stack,
    config_dict,
    sentry_stack,
    sidecar_to,
    write_config,
)

pytestmark = pytest.mark.timeout(90)


@contextlib.asynccontextmanager
async def _stack(tmp_path: Path, mesh: Mesh, **cfg_kw: Any
                 ) -> AsyncIterator[tuple[HttpBackend, Stack, int]]:
    """Backend, sentry (a write may wait 1 s) and a sidecar's local HTTP port."""
    with HttpBackend() as backend:
        cfg = config_dict(backend.port, 1, 1, **cfg_kw)
        cfg["bounds"]["response_write_timeout"] = 1.0
        path = write_config(tmp_path, mesh, cfg)
        async with sentry_stack(mesh, path) as s:
            sidecar = sidecar_to(s.port, mesh.acme, mesh.acme_issuer)
            server = await serve_http(sidecar)
            try:
                yield backend, s, server.sockets[0].getsockname()[1]
            finally:
                server.close()
                await sidecar.aclose()


async def test_a_client_that_stops_reading_frees_the_gate_and_the_backend(
        tmp_path: Path, mesh: Mesh) -> None:
    async with _stack(tmp_path, mesh, max_in_flight=1) as (backend, s, port):
        writer = None
        try:
            # 64 MiB asked for, never read: more than every buffer on the way
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /big/67108864 HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            gate = s.sentry.gate
            await eventually(lambda: gate.in_flight == 1, 20)  # the one slot, taken
            await eventually(lambda: gate.in_flight == 0, 30)  # and given back
            assert s.sentry.metrics.value("pqcnet_sentry_rejections_total",
                                          {"reason": "ClientTooSlow"}) == 1
            await eventually(lambda: backend.seen.in_flight == 0, 30)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                         timeout=10) as c:
                assert (await c.get("/status")).status_code == 200
        finally:
            if writer is not None:
                writer.close()


async def test_a_slow_reader_that_keeps_reading_gets_the_whole_response(
        tmp_path: Path, mesh: Mesh) -> None:
    """8 MiB read in 256 KiB steps with pauses shorter than the deadline, longer in
    total than it: all of it arrives."""
    async with _stack(tmp_path, mesh) as (_backend, s, port):
        size = 8 * 1024 * 1024
        got = 0
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                     timeout=30) as c, \
                c.stream("GET", f"/big/{size}") as resp:
            assert resp.status_code == 200
            async for chunk in resp.aiter_bytes(256 * 1024):
                got += len(chunk)
                await asyncio.sleep(0.2)
        assert got == size
        assert s.sentry.metrics.value("pqcnet_sentry_rejections_total",
                                      {"reason": "ClientTooSlow"}) == 0


async def test_the_watch_cuts_only_a_write_that_waited_and_forgets_every_write() -> None:
    """``WriteWatch.send`` on real QSTP streams: a write blocked on a peer that reads
    nothing is reset after the limit (``ClientTooSlow``); a write that completes, and
    one whose task is cancelled, leave nothing behind."""
    from pqcnet import qstp
    from pqcnet.qstp.aio import Stream, Tunnel
    from pqcnet.qstp.config import QstpConfiguration
    from pqcnet.sentry.errors import ClientTooSlow
    from pqcnet.sentry.writewatch import WriteWatch
    from tests.qstp.qstputil import make_mesh, running_server

    small = QstpConfiguration(stream_window=65_536, connection_window=131_072)
    got: asyncio.Queue[Stream] = asyncio.Queue()
    done = asyncio.Event()

    async def handler(tunnel: Tunnel) -> None:
        async for stream in tunnel:
            await got.put(stream)  # and never read
        await done.wait()

    qmesh = make_mesh()
    watch = WriteWatch(0.4)
    async with running_server(qmesh, handler, config=small) as server:
        tunnel = await qstp.connect("127.0.0.1", server.port, qmesh.client, config=small)

        async def write(stream: Stream, data: bytes) -> bool:
            try:
                await watch.send(stream, data)
            except ClientTooSlow:
                return True
            return False

        quick = tunnel.open_stream()
        assert await write(quick, b"fits the window") is False
        blocked = tunnel.open_stream()
        assert await asyncio.wait_for(write(blocked, b"x" * 1_000_000), 10) is True
        cancelled = tunnel.open_stream()
        task = asyncio.create_task(write(cancelled, b"y" * 1_000_000))
        await asyncio.sleep(0.1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert watch.watching() == 0
        done.set()
        await tunnel.close()
    await watch.aclose()
