"""The control plane over Waku REST nodes, failing over across all configured URLs.

:class:`WakuTransport` is the :class:`~pqcnet.mesh.transport.Transport` seam over one or
more nodes' REST APIs (:class:`~pqcnet.mesh.waku_rest.WakuRestClient`, re-exported here).

**Publishing** goes to the *active* node — the first of the configured URLs that
works. When it does not answer (:class:`~pqcnet.mesh.errors.WakuUnavailable`) the next
healthy node becomes active and the same message (same Waku timestamp, so the relay
network's own dedup still applies) is published there. The active node stays active
until it fails: no flapping back.

**Receiving**: each subscription is placed on up to ``replicas`` nodes (the active one
and standbys), one poller ("leg") per node; the active leg polls every
``poll_interval_s``, standbys every ``standby_poll_interval_s`` — a standby holds what
the relay delivered while the active node dies, so a failover loses nothing. A
message seen through two legs reaches the application once: legs dedup on (content
topic, Waku timestamp, payload digest) in a bounded window; anything beyond it is a
duplicate the envelope replay window drops.

**Subscriptions are never left undrained** (go-waku: every subscription POST makes a
new 1000-message buffer, and one nobody drains blocks the node's broadcaster): a leg
re-subscribes only when the node answers 404 (it restarted and forgot us), never after
a timeout; a node whose leg failed ``failure_threshold`` polls in a row is given up,
the leg moves to the next healthy node, and once the failed node answers again its
stale subscriptions are deleted (or, if a subscription is short of legs, adopted as
they are). :meth:`WakuTransport.close` deletes ours too. A DELETE removes *every*
subscription to those content topics on that node, so another transport of the same
topics on the same node gets a 404 on its next poll and re-subscribes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pqcnet._util.tasks import cancel_and_wait
from pqcnet.mesh.errors import ConfigError, WakuError, WakuUnavailable
from pqcnet.mesh.metrics import WAKU_CLEANUPS, WAKU_DUPLICATES, WAKU_FAILOVERS, WAKU_LEG_MOVES
from pqcnet.mesh.transport import DEFAULT_MAX_PENDING, Subscription, WakuMessage
from pqcnet.mesh.waku_rest import WakuClientConfig, WakuRestClient

__all__ = ["WakuClientConfig", "WakuRestClient", "WakuTransport"]

log = logging.getLogger("pqcnet.mesh.waku")

#: Message keys remembered per subscription to drop copies seen through two legs.
DEFAULT_DEDUP_CAPACITY = 16_384


@dataclass(eq=False)
class _Placed:
    """One subscription and the legs (node index -> poller) it runs on."""

    sub: Subscription
    topics: list[str]
    legs: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    seen: OrderedDict[bytes, None] = field(default_factory=OrderedDict)


class WakuTransport:
    """:class:`~pqcnet.mesh.transport.Transport` over one or more Waku nodes (see module)."""

    def __init__(self, clients: WakuRestClient | Sequence[WakuRestClient], *,
                 max_pending: int = DEFAULT_MAX_PENDING, replicas: int = 2,
                 standby_poll_interval_s: float = 0.5, failure_threshold: int = 2,
                 health_interval_s: float = 1.0,
                 dedup_capacity: int = DEFAULT_DEDUP_CAPACITY) -> None:
        self.clients = [clients] if isinstance(clients, WakuRestClient) else list(clients)
        if not self.clients:
            raise ConfigError("a Waku transport needs at least one REST URL")
        if replicas < 1 or failure_threshold < 1 or dedup_capacity < 1:
            raise ConfigError("replicas, failure_threshold and dedup_capacity must be >= 1")
        self.max_pending = max_pending
        self.replicas = min(replicas, len(self.clients))
        self.standby_poll_interval_s = standby_poll_interval_s
        self.failure_threshold = failure_threshold
        self.health_interval_s = health_interval_s
        self.dedup_capacity = dedup_capacity
        #: index of the node publishes go to
        self.active = 0
        self._healthy = [True] * len(self.clients)
        #: content topics we subscribed on each node and have not deleted there
        self._topics_on: list[set[str]] = [set() for _ in self.clients]
        self._placed: dict[Subscription, _Placed] = {}
        self._health: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        #: poll cycles that failed (a node down); the legs keep going or move
        self.poll_errors = 0
        #: times a leg re-subscribed because its node had forgotten the subscription
        self.resubscribes = 0
        #: times the active node changed, and legs moved to another node
        self.failovers = 0
        self.leg_moves = 0
        #: copies of one message seen through two legs, dropped here
        self.duplicates_suppressed = 0
        #: stale subscriptions deleted on a node we had moved away from
        self.cleanups = 0

    @classmethod
    def connect(cls, base_url: str, **kwargs: Any) -> WakuTransport:
        """One node (``kwargs``: :class:`WakuClientConfig` fields)."""
        return cls(WakuRestClient(WakuClientConfig(base_url, **kwargs)))

    @classmethod
    def connect_many(cls, base_urls: Sequence[str], *, replicas: int = 2,
                     standby_poll_interval_s: float = 0.5, failure_threshold: int = 2,
                     health_interval_s: float = 1.0, **kwargs: Any) -> WakuTransport:
        """Fail over across ``base_urls`` in order (``kwargs``: :class:`WakuClientConfig`
        fields, applied to each; keep ``timeout_s * (retries + 1)`` short, it is how
        long a dead node holds a publish before the next one is tried)."""
        return cls([WakuRestClient(WakuClientConfig(u, **kwargs)) for u in base_urls],
                   replicas=replicas, standby_poll_interval_s=standby_poll_interval_s,
                   failure_threshold=failure_threshold, health_interval_s=health_interval_s)

    @property
    def client(self) -> WakuRestClient:
        """The active node's client."""
        return self.clients[self.active]

    def url(self, node: int) -> str:
        return self.clients[node].config.base_url

    def legs(self) -> dict[str, int]:
        """Running pollers per node URL (what each subscription is placed on)."""
        out = {self.url(n): 0 for n in range(len(self.clients))}
        for placed in self._placed.values():
            for node, task in placed.legs.items():
                if not task.done():
                    out[self.url(node)] += 1
        return out

    # ------------------------------------------------------------------ publishing

    async def publish(self, content_topic: str, payload: bytes) -> None:
        """Publish through the active node, failing over to the next healthy ones."""
        ts = time.time_ns()  # one Waku message, whichever node carries it
        last: WakuError | None = None
        for _ in range(len(self.clients)):
            node = self.active
            try:
                await self.clients[node].publish(content_topic, payload, timestamp_ns=ts)
                return
            except WakuUnavailable as exc:
                last = exc.with_traceback(None)  # no tb: no cycle via its frame
                await self._node_failed(node, exc)
                if self.active == node:
                    break  # nowhere else to go
        assert last is not None
        raise last

    # ------------------------------------------------------------------ subscribing

    async def subscribe(self, content_topics: Sequence[str]) -> Subscription:
        sub = Subscription(content_topics, self.max_pending)
        placed = _Placed(sub, sorted(sub.topics))
        async with self._lock:
            await self._place(placed)
        if not placed.legs:
            raise WakuUnavailable("no Waku node accepted the subscription: "
                                  + ", ".join(c.config.base_url for c in self.clients))
        self._placed[sub] = placed
        if len(self.clients) > 1 and self._health is None:
            self._health = asyncio.create_task(self._health_loop(), name="waku-health")
        return sub

    def _candidates(self) -> list[int]:
        """Nodes in preference order, the active one first."""
        n = len(self.clients)
        return [(self.active + i) % n for i in range(n)]

    async def _place(self, placed: _Placed) -> None:
        """Add legs on healthy nodes until ``replicas`` (call with the lock held)."""
        for node in self._candidates():
            if len(placed.legs) >= self.replicas or placed.sub.closed:
                return
            if node in placed.legs or not self._healthy[node]:
                continue
            missing = [t for t in placed.topics if t not in self._topics_on[node]]
            try:
                await self.clients[node].subscribe(missing)
            except WakuUnavailable as exc:
                self._mark_down(node, exc)
                continue
            self._topics_on[node].update(missing)
            placed.legs[node] = asyncio.create_task(self._leg(placed, node),
                                                    name=f"waku-poll-{node}")

    async def _leg(self, placed: _Placed, node: int) -> None:
        client = self.clients[node]
        cfg = client.config
        delay = cfg.poll_interval_s
        failures = 0
        while not placed.sub.closed:
            got = 0
            try:
                for topic in placed.topics:
                    try:
                        msgs = await client.messages(topic)
                    except WakuError as exc:
                        if exc.status != 404:
                            raise
                        # the node restarted (or a co-located transport deleted the
                        # topic) and forgot us: subscribe this topic again, only it
                        await client.subscribe([topic])
                        self._topics_on[node].add(topic)
                        self.resubscribes += 1
                        log.info("waku resubscribed", extra={"url": cfg.base_url})
                        continue
                    for msg in msgs:
                        got += self._deliver(placed, msg)
                failures = 0
            except WakuError as exc:
                self.poll_errors += 1
                failures += 1
                log.warning("waku poll failed", extra={"url": cfg.base_url, "error": str(exc)})
                if len(self.clients) > 1 and failures >= self.failure_threshold:
                    placed.legs.pop(node, None)
                    await self._node_failed(node, exc)
                    return
                delay = min(max(delay * 2, cfg.backoff_s), cfg.max_backoff_s)
            else:
                delay = (cfg.poll_interval_s if node == self.active
                         else self.standby_poll_interval_s)
            if not got:
                await asyncio.sleep(delay)

    def _deliver(self, placed: _Placed, msg: WakuMessage) -> int:
        key = hashlib.sha256(b"%s\0%d\0" % (msg.content_topic.encode(), msg.timestamp_ns)
                             + msg.payload).digest()[:16]
        if key in placed.seen:
            self.duplicates_suppressed += 1
            WAKU_DUPLICATES.inc()
            return 0
        placed.seen[key] = None
        while len(placed.seen) > self.dedup_capacity:
            placed.seen.popitem(last=False)
        placed.sub.put(msg)
        return 1

    # ------------------------------------------------------------------ failover

    def _mark_down(self, node: int, exc: WakuError) -> None:
        if self._healthy[node]:
            self._healthy[node] = False
            if len(self.clients) > 1:
                log.warning("waku node given up; failing over", extra={
                    "url": self.url(node), "error": str(exc)})
        self._pick_active()

    def _pick_active(self) -> None:
        """Keep the active node while it is healthy; else take the next healthy one."""
        if self._healthy[self.active]:
            return
        healthy = [n for n in self._candidates() if self._healthy[n]]
        if healthy:
            self.active = healthy[0]
            self.failovers += 1
            WAKU_FAILOVERS.inc()
            log.warning("waku active node changed", extra={"url": self.url(self.active)})

    async def _node_failed(self, node: int, exc: WakuError) -> None:
        """Stop using ``node``: move the active role and every leg on it elsewhere."""
        async with self._lock:
            self._mark_down(node, exc)
            if len(self.clients) == 1:
                self._healthy[node] = True  # the only node: keep trying it
                return
            for placed in list(self._placed.values()):
                leg = placed.legs.pop(node, None)
                if leg is not None and leg is not asyncio.current_task():
                    leg.cancel()
                before = len(placed.legs)
                await self._place(placed)
                moved = len(placed.legs) - before
                self.leg_moves += moved
                WAKU_LEG_MOVES.inc(moved)

    async def _health_loop(self) -> None:
        """Probe given-up nodes; when one answers, delete or adopt what we left there."""
        while True:
            await asyncio.sleep(self.health_interval_s)
            for node, ok in enumerate(self._healthy):
                if ok:
                    continue
                try:
                    await self.clients[node].health()
                except WakuError:
                    continue
                async with self._lock:
                    await self._recover(node)

    async def _recover(self, node: int) -> None:
        """``node`` answers again (call with the lock held)."""
        short = [p for p in self._placed.values() if len(p.legs) < self.replicas
                 and not p.sub.closed]
        adopt: set[str] = set()
        for placed in short:
            adopt.update(placed.topics)
        stale = sorted(self._topics_on[node] - adopt)
        try:
            await self.clients[node].unsubscribe(stale)
        except WakuError:
            return  # still sick: next round
        self._topics_on[node] -= set(stale)
        self.cleanups += len(stale)
        WAKU_CLEANUPS.inc(len(stale))
        self._healthy[node] = True
        self._pick_active()
        log.info("waku node back", extra={"url": self.url(node), "deleted": len(stale)})
        for placed in short:
            await self._place(placed)  # subscribes only the topics not already there

    # ------------------------------------------------------------------ closing

    async def close(self) -> None:
        """Stop every leg, delete our subscriptions where nodes answer, close clients."""
        try:
            await cancel_and_wait(self._health)
            self._health = None
            for placed in self._placed.values():
                placed.sub.close()
            await cancel_and_wait(*(t for p in self._placed.values() for t in p.legs.values()))
            self._placed.clear()
            for node, topics in enumerate(self._topics_on):
                if topics:  # also on given-up nodes: they may be paused, not dead
                    client = self.clients[node]
                    with contextlib.suppress(WakuError, TimeoutError):
                        async with asyncio.timeout(client.config.timeout_s):
                            await client.unsubscribe(sorted(topics))
                topics.clear()
        finally:  # the HTTP clients close even when this close is cancelled
            for client in self.clients:
                await client.aclose()
