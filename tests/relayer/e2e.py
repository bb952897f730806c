"""Helpers for end-to-end relayer tests over real QSTP tunnels on loopback."""

from __future__ import annotations

import asyncio
import functools
from collections import defaultdict
from pathlib import Path
from typing import Any

from pqcnet.identity import NodeIdentity, dev_identities
from pqcnet.relayer.client import PublisherClient, SubscriberClient
from pqcnet.relayer.config import RelayerConfig
from pqcnet.relayer.frame import Frame, Topic
from pqcnet.relayer.node import RelayerNode

TD = "pqcnet.test"
#: an explicit grant: the test tenant ``acme`` may publish and subscribe every customer
#: (these tests publish as ``cust1``, ``c``, ...; by default a tenant is only its own
#: customer — tests/relayer/test_authz.py covers that)
GRANT_ALL: dict[str, Any] = {"customers": {"*": [{
    "from": [f"spiffe://{TD}/acme/*/*"], "methods": ["publish", "subscribe"]}]}}


@functools.cache
def identities() -> tuple[NodeIdentity, NodeIdentity, NodeIdentity]:
    """(relayer, publisher, subscriber) identities from one real in-memory mesh CA."""
    _, nodes = dev_identities(TD, f"spiffe://{TD}/acme/relayer/r1",
                              f"spiffe://{TD}/acme/publisher/p1",
                              f"spiffe://{TD}/acme/subscriber/s1")
    return nodes[0], nodes[1], nodes[2]


async def start_node(tmp: Path, **kw: Any) -> RelayerNode:
    kw.setdefault("shards", 8)
    kw.setdefault("authz", GRANT_ALL)
    cfg = RelayerConfig(listen_port=0, data_dir=str(tmp / "relayer"), **kw)
    node = RelayerNode(cfg, identities()[0])
    await node.start()
    return node


async def publisher(port: int) -> PublisherClient:
    return await PublisherClient.connect("127.0.0.1", port, identities()[1])


class Collector:
    """Runs a subscriber and records what it yields per topic."""

    def __init__(self, client: SubscriberClient) -> None:
        self.client = client
        self.by_topic: dict[Topic, list[int]] = defaultdict(list)
        self.frames: list[Frame] = []
        self.task = asyncio.create_task(self._run())
        # The error is re-raised by wait_for(); a test that ends without waiting must
        # not leave "Task exception was never retrieved" to be logged into a later test.
        self.task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _run(self) -> None:
        async for batch in self.client.batches():
            for f in batch:
                self.by_topic[f.topic].append(f.seq)
                self.frames.append(f)

    async def wait_for(self, n: int, limit: float = 60.0) -> None:
        async with asyncio.timeout(limit):
            while len(self.frames) < n:
                if self.task.done():
                    self.task.result()
                    raise AssertionError("subscriber ended early")
                await asyncio.sleep(0.02)

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.client.close()


async def subscriber(port: int, customer: str, channels: tuple[str, ...] = ()) -> Collector:
    client = await SubscriberClient.connect("127.0.0.1", port, identities()[2])
    await client.subscribe(customer, channels)
    return Collector(client)


async def close_clients(*clients: Collector | PublisherClient | None) -> None:
    """Close each client that was made (a test's ``finally``: some may not have been)."""
    for c in clients:
        if c is not None:
            await c.close()
