"""The bench sentry's own load client, seen from the server side: what it sends is what
the bench says it sends."""

from __future__ import annotations

import asyncio

import pytest

from pqcnet.bench import sentry as bench_sentry

pytestmark = [pytest.mark.timeout(60)]


async def _capture(ids: bool) -> list[bytes]:
    """The heads a real server receives from 20 warm-up + 5 timed requests (the host
    header's port replaced, so two runs compare)."""
    heads: list[bytes] = []
    done = asyncio.Event()

    async def client(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await r.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    break
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                assert await r.readexactly(length) == bench_sentry._RPC
                heads.append(head.replace(b":%d\r\n" % port, b":PORT\r\n"))
                w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            w.close()
        finally:
            done.set()

    server = await asyncio.start_server(client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        await bench_sentry._latency(port, 5, ids)
        await asyncio.wait_for(done.wait(), 10)
    return heads


def test_request_ids_make_every_head_unique_and_nothing_else_differ() -> None:
    """`bench sentry --request-ids`: requests differ only in their x-request-id, one per
    request; without it every request is the same bytes (so the head memos hit)."""
    same = asyncio.run(_capture(False))
    assert len(same) == 25 and len(set(same)) == 1
    unique = asyncio.run(_capture(True))
    assert len(unique) == 25 and len(set(unique)) == 25
    ids = [next(line for line in h.split(b"\r\n") if line.startswith(b"x-request-id: "))
           for h in unique]
    assert len(set(ids)) == 25
    assert {h.replace(i + b"\r\n", b"") for h, i in zip(unique, ids, strict=True)} == set(same)
