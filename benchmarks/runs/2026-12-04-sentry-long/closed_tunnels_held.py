"""Python heap held per closed QSTP tunnel with the cyclic collector off (both sides in
this process): what a serving process (rare full collections) keeps until one runs.

Run from a checkout: ``PYTHONPATH=src:. python closed_tunnels_held.py``
"""

import asyncio
import gc
import tracemalloc

import uvloop

from pqcnet import qstp
from tests.qstp.qstputil import make_mesh, running_server

TUNNELS = 200


async def main() -> None:
    mesh = make_mesh()
    async with running_server(mesh) as server:
        warm = await qstp.connect("127.0.0.1", server.port, mesh.client)
        await warm.close()
        del warm
        await asyncio.sleep(0.3)
        gc.collect()
        gc.disable()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(TUNNELS):
            t = await qstp.connect("127.0.0.1", server.port, mesh.client)
            s = t.open_stream()
            await s.send(b"hello", end=True)
            await s.read_all(100)
            await t.close()
        del t, s
        await asyncio.sleep(0.5)
        held = tracemalloc.get_traced_memory()[0] - base
        gc.collect()
        after = tracemalloc.get_traced_memory()[0] - base
        print(f"held per closed tunnel (Python heap): {held / TUNNELS / 1024:.1f} KiB "
              f"before a collection, {after / TUNNELS / 1024:.1f} KiB after")
        gc.enable()


uvloop.run(main())
