"""Publishers and subscribers that survive a relayer restart, for crash/outage tests.

A publisher keeps every frame until the relayer ACKed it and resends unACKed
frames (``retry=True``) after reconnecting; so every seq is eventually ACKed once.
The subscriber is the SDK's :class:`ResumingSubscriber` with an in-process cursor;
``by_topic`` is what the application saw.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Callable

from pqcnet.errors import PqcnetError
from pqcnet.relayer.client import PublisherClient, ResumingSubscriber
from pqcnet.relayer.cursor import MemoryCursor
from pqcnet.relayer.frame import Frame, Topic
from tests.relayer.e2e import identities
from tests.relayer.helpers import eventually


class ResilientPublisher:
    def __init__(self, port: Callable[[], int], topics: list[Topic], n: int,
                 batch: int = 20, size: int = 32, pace: float = 0.0) -> None:
        self.port, self.topics, self.n, self.batch, self.size = port, topics, n, batch, size
        self.pace = pace  # seconds between requests: keeps a publisher busy for a while
        self.acked: dict[Topic, int] = dict.fromkeys(topics, 0)
        self.reconnects = 0
        self.overflowed = 0
        self.pauses = 0
        self.task = asyncio.create_task(self._run())

    def total_acked(self) -> int:
        return sum(self.acked.values())

    async def _run(self) -> None:
        client: PublisherClient | None = None
        retry = False
        while any(v < self.n for v in self.acked.values()):
            if client is None:
                try:
                    client = await PublisherClient.connect("127.0.0.1", self.port(),
                                                           identities()[1])
                except PqcnetError:
                    await asyncio.sleep(0.2)
                    continue
            frames = [Frame(c, ch, s, bytes([s % 251]) * self.size)
                      for (c, ch) in self.topics
                      for s in range(self.acked[(c, ch)] + 1,
                                     min(self.acked[(c, ch)] + self.batch, self.n) + 1)]
            try:
                async with asyncio.timeout(30):
                    results = await client.publish(frames, retry=retry)
            except (PqcnetError, TimeoutError):
                self.pauses += client.pauses_seen
                with contextlib.suppress(PqcnetError):
                    await client.close()
                client, retry = None, True
                self.reconnects += 1
                await asyncio.sleep(0.2)
                continue
            retry = False
            if self.pace:
                await asyncio.sleep(self.pace)
            for f, r in zip(frames, results):
                if r.accepted:
                    self.acked[f.topic] = max(self.acked[f.topic], f.seq)
                    self.overflowed += r.overflowed
                else:
                    assert r.retriable, r  # only "come back later" is acceptable here
                    retry = True
                    break
        if client is not None:
            self.pauses += client.pauses_seen
            await client.close()


class ResilientSubscriber:
    """The shipped :class:`ResumingSubscriber` (durable-cursor resume), recording what the
    application saw. Nothing is copied between connections: the SDK resumes by itself.
    ``app_duplicates`` counts seqs the application saw twice (must stay 0);
    ``wire_duplicates`` counts redelivered frames the SDK dropped below its cursor."""

    def __init__(self, port: Callable[[], int], customer: str) -> None:
        self.port, self.customer = port, customer
        self.by_topic: dict[Topic, list[int]] = defaultdict(list)
        self.app_duplicates = 0
        self.cursor = MemoryCursor()  # the application's: survives every reconnect
        self.sdk: ResumingSubscriber | None = None
        self.task = asyncio.create_task(self._run())

    @property
    def wire_duplicates(self) -> int:
        return 0 if self.sdk is None else self.sdk.duplicates_dropped

    def total(self) -> int:
        return sum(len(v) for v in self.by_topic.values())

    async def _run(self) -> None:
        while True:  # the port may change across restarts: one SDK per port
            port = self.port()
            self.sdk = sdk = ResumingSubscriber([("127.0.0.1", port)], identities()[2],
                                                self.customer, cursor=self.cursor)
            async for batch in sdk.batches():
                for f in batch:
                    seen = self.by_topic[f.topic]
                    if f.seq in seen:
                        self.app_duplicates += 1
                    seen.append(f.seq)
                if self.port() != port:
                    break
            await sdk.close()

    async def wait_for(self, n: int, limit: float = 90.0) -> None:
        await eventually(lambda: self.total() >= n, limit)

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
