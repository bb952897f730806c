"""Subscriber hub: the shard workers' sink, fanning in-order frames out to QSTP streams.

A subscriber opens a stream and sends ``Subscribe(customer, channels)``; the hub
registers it with a bounded queue. ``deliver()`` (called by a shard worker) puts
each subscriber's share of a batch on its queue together with a future, and returns
only when every share was written to its stream — so a worker never acks frames
that did not leave the relayer. A failed write fails the future; the worker resets
and redelivers (the subscriber SDK drops seqs it already has).

Frames of a topic with no subscriber are *held*: ``deliver()`` waits until one
subscribes. The shard's bus lag then grows and backpressure pauses its publishers —
the same path as a slow subscriber, and nothing is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from qstp.aio import Stream
from qstp.errors import PqcnetError, TunnelClosed
from relayer.errors import RelayerError
from relayer.frame import Frame
from relayer.wire import Subscribe, encode_deliveries

log = logging.getLogger(__name__)

#: delivery batches queued per subscriber; bounds memory held for a slow subscriber
MAX_SUBSCRIBER_QUEUE = 64
#: subscriptions one relayer accepts; bounds the fan-out table
MAX_SUBSCRIPTIONS = 10_000

_Item = tuple[list[Frame], asyncio.Future[None]]


class SubscriptionRefused(RelayerError):
    """The relayer is at :data:`MAX_SUBSCRIPTIONS`; try another relayer or later."""

    code = 31
    retriable = True


@dataclass(eq=False)
class Subscription:
    """One subscriber stream."""

    customer: str
    channels: frozenset[str]
    queue: asyncio.Queue[_Item] = field(
        default_factory=lambda: asyncio.Queue(MAX_SUBSCRIBER_QUEUE))

    def matches(self, frame: Frame) -> bool:
        """Whether ``frame`` is for this subscriber."""
        return frame.customer == self.customer and (
            not self.channels or frame.channel in self.channels)


class SubscriberHub:
    """Implements :class:`relayer.worker.Sink` over subscriber streams."""

    def __init__(self, max_subscriptions: int = MAX_SUBSCRIPTIONS) -> None:
        self.max_subscriptions = max_subscriptions
        self._subs: dict[str, list[Subscription]] = {}
        self._changed = asyncio.Event()
        self.held = 0

    def count(self) -> int:
        """Active subscriptions."""
        return sum(len(v) for v in self._subs.values())

    async def deliver(self, shard: int, frames: Sequence[Frame]) -> None:
        """Deliver ``frames`` to every matching subscriber; hold those with none."""
        todo = list(frames)
        while todo:
            shares: dict[int, tuple[Subscription, list[Frame]]] = {}
            held: list[Frame] = []
            for f in todo:
                subs = [s for s in self._subs.get(f.customer, ()) if s.matches(f)]
                if not subs:
                    held.append(f)
                for s in subs:
                    shares.setdefault(id(s), (s, []))[1].append(f)
            futs = []
            loop = asyncio.get_running_loop()
            for sub, share in shares.values():
                fut: asyncio.Future[None] = loop.create_future()
                await sub.queue.put((share, fut))
                futs.append(fut)
            await asyncio.gather(*futs)
            todo = held
            if todo:
                self.held = len(todo)
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self._changed.wait()
        self.held = 0

    async def serve(self, stream: Stream, request: Subscribe) -> None:
        """Feed one subscriber stream until it ends or fails."""
        if self.count() >= self.max_subscriptions:
            raise SubscriptionRefused(f"relayer has {self.max_subscriptions} subscriptions")
        sub = Subscription(request.customer, request.channels)
        self._subs.setdefault(sub.customer, []).append(sub)
        self._changed.set()
        watcher = asyncio.create_task(self._watch_end(stream))
        log.info("subscriber joined", extra={"customer": sub.customer,
                                             "channels": sorted(sub.channels)})
        try:
            while not watcher.done():
                getter = asyncio.create_task(sub.queue.get())
                done, _ = await asyncio.wait({getter, watcher},
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    break
                frames, fut = getter.result()
                try:
                    await stream.send(encode_deliveries(frames))
                except PqcnetError as exc:
                    fut.set_exception(TunnelClosed(f"subscriber stream failed: {exc}"))
                    break
                fut.set_result(None)
        finally:
            watcher.cancel()
            self._subs[sub.customer].remove(sub)
            if not self._subs[sub.customer]:
                del self._subs[sub.customer]
            while not sub.queue.empty():
                _, fut = sub.queue.get_nowait()
                fut.set_exception(TunnelClosed("subscriber went away"))
            log.info("subscriber left", extra={"customer": sub.customer})

    @staticmethod
    async def _watch_end(stream: Stream) -> None:
        with contextlib.suppress(PqcnetError):
            while await stream.recv():
                pass  # a subscriber sends nothing after Subscribe; ignore stray bytes
