"""The one seam between the control plane and Waku: :class:`Transport`.

Two implementations share it: :class:`InProcessTransport` (the embedded default for
``make demo`` and unit tests, an in-memory pub/sub hub with the same delivery
semantics — every subscriber of a content topic gets every message, including the
publisher's own) and :class:`pqcnet.mesh.waku.WakuTransport` (any nwaku / go-waku REST
endpoint). Everything above this module speaks only ``publish`` / ``subscribe``.

Content topics follow Waku's ``/<app>/<version>/<name>/<encoding>`` convention:
``/pqcnet/1/<name>/proto``.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from pqcnet.mesh.errors import ConfigError, TransportClosed, WakuUnavailable

#: Messages a subscriber may have pending before the oldest are dropped (and counted).
DEFAULT_MAX_PENDING = 4096

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def content_topic(name: str) -> str:
    """``/pqcnet/1/<name>/proto``; names are lower-case ``[a-z0-9._-]``."""
    if not _NAME.match(name):
        raise ConfigError(f"invalid content topic name {name!r}")
    return f"/pqcnet/1/{name}/proto"


def inbox_topic(node_id: str, namespace: str = "") -> str:
    """A node's private inbox (sealed gossip, DTN bundles, DAG pulls)."""
    name = "inbox-" + hashlib.sha256(node_id.encode()).hexdigest()[:16]
    return content_topic(f"{namespace}.{name}" if namespace else name)


TOPIC_NAMES = ("announce", "routes", "governance", "gossip", "dagsync", "relay-reports")


def topic_map(namespace: str = "") -> dict[str, str]:
    """The standard topics; a ``namespace`` keeps separate meshes (test runs, networks)
    sharing one Waku network apart: ``/pqcnet/1/<namespace>.<name>/proto``."""
    return {n: content_topic(f"{namespace}.{n}" if namespace else n) for n in TOPIC_NAMES}


#: The control plane's standard topics (no namespace).
TOPICS: dict[str, str] = topic_map()


@dataclass(frozen=True, slots=True)
class WakuMessage:
    """One message as delivered by the transport."""

    #: the content topic it was published on
    content_topic: str
    #: raw payload bytes
    payload: bytes
    #: publisher-supplied timestamp in nanoseconds (0 if absent)
    timestamp_ns: int = 0


class Subscription:
    """A bounded queue of received messages, iterated with ``async for``.

    When the consumer falls behind by ``max_pending`` messages the oldest are
    dropped and counted in :attr:`overflowed` rather than growing without bound.
    """

    def __init__(self, topics: Sequence[str], max_pending: int = DEFAULT_MAX_PENDING) -> None:
        if max_pending < 1:
            raise ConfigError("max_pending must be >= 1")
        self.topics = frozenset(topics)
        self.max_pending = max_pending
        self.overflowed = 0
        self._queue: asyncio.Queue[WakuMessage | None] = asyncio.Queue()
        self.closed = False

    def put(self, msg: WakuMessage) -> None:
        """Deliver one message (called by the transport)."""
        if self.closed:
            return
        while self._queue.qsize() >= self.max_pending:
            self._queue.get_nowait()
            self.overflowed += 1
        self._queue.put_nowait(msg)

    @property
    def pending(self) -> int:
        """Messages received and not taken yet (at most ``max_pending``)."""
        return max(0, self._queue.qsize() - self.closed)  # a closed queue holds one sentinel

    async def get(self) -> WakuMessage:
        """Next message; raises :class:`TransportClosed` once closed and drained."""
        item = await self._queue.get()
        if item is None:
            self._queue.put_nowait(None)
            raise TransportClosed("subscription closed")
        return item

    def close(self) -> None:
        """Wake any waiting consumer with :class:`TransportClosed`."""
        if not self.closed:
            self.closed = True
            self._queue.put_nowait(None)

    async def __aiter__(self) -> AsyncIterator[WakuMessage]:
        while True:
            try:
                yield await self.get()
            except TransportClosed:
                return


class Transport(Protocol):
    """Publish bytes to a content topic; subscribe to content topics."""

    async def publish(self, content_topic: str, payload: bytes) -> None: ...

    async def subscribe(self, content_topics: Sequence[str]) -> Subscription: ...

    async def close(self) -> None: ...


class InProcessHub:
    """The shared medium of in-process transports (one per simulated network)."""

    def __init__(self) -> None:
        self._subs: list[tuple[InProcessTransport, Subscription]] = []

    def attach(self, transport: InProcessTransport, sub: Subscription) -> None:
        self._subs.append((transport, sub))

    def detach(self, sub: Subscription) -> None:
        self._subs = [(t, s) for t, s in self._subs if s is not sub]

    def deliver(self, msg: WakuMessage) -> None:
        for transport, sub in list(self._subs):
            if transport.online and msg.content_topic in sub.topics:
                sub.put(msg)


class InProcessTransport:
    """In-memory Waku stand-in. ``online = False`` simulates a node that is down:
    publishing fails with :class:`WakuUnavailable`, nothing is received meanwhile."""

    def __init__(self, hub: InProcessHub, *, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self.hub = hub
        self.max_pending = max_pending
        self.online = True
        self._subs: list[Subscription] = []

    async def publish(self, content_topic: str, payload: bytes) -> None:
        if not self.online:
            raise WakuUnavailable("in-process node is offline")
        self.hub.deliver(WakuMessage(content_topic, payload, time.time_ns()))

    async def subscribe(self, content_topics: Sequence[str]) -> Subscription:
        sub = Subscription(content_topics, self.max_pending)
        self._subs.append(sub)
        self.hub.attach(self, sub)
        return sub

    async def close(self) -> None:
        for sub in self._subs:
            self.hub.detach(sub)
            sub.close()
        self._subs.clear()
