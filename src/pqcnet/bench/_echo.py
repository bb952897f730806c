"""The QSTP small-frame echo rate: the tunnel's own ceiling for the relayer bench.

Every relayed frame crosses QSTP twice (publisher → relayer, relayer → subscriber),
so a QSTP server that echoes small frames back over the same number of tunnels is
what the relayer could at best do if it did nothing else. The echo server runs in
its own process (as the relayer does); this process sends ``size``-byte frames, one
``Stream.send`` each, on ``tunnels`` tunnels and counts the bytes that come back. The
server echoes what each read returns (QSTP hands over buffered frames joined, as the
relayer's reads see them too).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from pqcnet.bench._spawn import save_identities, spawned

PASSPHRASE = b"bench-echo"
#: Frames a client sends before it waits for echoes: bounds the bytes in flight so
#: the measurement is a rate, not a buffer fill.
ECHO_WINDOW = 8192


async def _serve(root: str, ports: Any) -> None:
    from pqcnet import qstp
    from pqcnet.identity import NodeIdentity
    from pqcnet.qstp.aio import Stream, Tunnel

    ident = NodeIdentity.load(Path(root) / "server", PASSPHRASE)

    async def echo(stream: Stream) -> None:
        async for chunk in stream:
            await stream.send(chunk)
        await stream.send(b"", end=True)

    async def handler(tunnel: Tunnel) -> None:
        tasks = [asyncio.create_task(echo(s)) async for s in tunnel]
        await asyncio.gather(*tasks, return_exceptions=True)

    server = await qstp.serve(handler, "127.0.0.1", 0, ident)
    ports.put(server.port)
    await asyncio.Event().wait()


def _server_main(root: str, ports: Any) -> None:
    asyncio.run(_serve(root, ports))


async def _client(port: int, root: Path, frames: int, size: int, tunnels: int) -> float:
    from pqcnet import qstp
    from pqcnet.identity import NodeIdentity

    ident = NodeIdentity.load(root / "client", PASSPHRASE)
    links = [await qstp.connect("127.0.0.1", port, ident) for _ in range(tunnels)]
    per = frames // tunnels
    payload = bytes(size)

    async def one(tunnel: Any) -> None:
        stream = tunnel.open_stream()
        back = asyncio.Semaphore(ECHO_WINDOW)
        want = per * size

        async def reader() -> None:
            got = released = 0
            while got < want:
                chunk = await stream.recv()
                if not chunk:
                    raise RuntimeError(f"echo stream ended after {got} of {want} bytes")
                got += len(chunk)
                for _ in range(got // size - released):
                    back.release()
                released = got // size

        task = asyncio.create_task(reader())
        for _ in range(per):
            await back.acquire()
            await stream.send(payload)
        await task
        await stream.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one(t) for t in links))
    elapsed = time.perf_counter() - t0
    for t in links:
        await t.close()
    return per * tunnels / elapsed


def echo_rate(frames: int, size: int, tunnels: int) -> dict[str, Any]:
    """Frames echoed per second (each crossing QSTP twice), server in a second process."""
    if size < 1:
        raise ValueError("echo frames need at least one byte")
    with tempfile.TemporaryDirectory(prefix="pqcnet-bench-echo-") as tmp:
        root = Path(tmp)
        save_identities(root, PASSPHRASE, "echo", "echo")
        with spawned(_server_main, root) as port:
            rate = asyncio.run(_client(port, root, frames, size, tunnels))
    return {"what": f"QSTP echo of {size}-byte frames, one Stream.send each, "
                    f"{tunnels} tunnels, server in its own process",
            "frames": frames // tunnels * tunnels, "frames_per_s": round(rate)}
