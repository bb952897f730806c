"""Subscriber hub: the shard workers' sink, fanning in-order frames out to QSTP streams.

A subscriber opens a stream and sends ``Subscribe(customer, channels)``; the hub
registers it with a bounded queue. ``deliver()`` (called by a shard worker) puts
each subscriber's share of a batch on its queue together with a future, and returns
only when every subscriber *acknowledged* its share: the SDK sends a cumulative
``DeliveryAck`` (highest seq per topic) once the application took the batch. Only
then does the worker commit dedup marks and metered volume and ack the bus, so the
meter counts what subscribers acknowledged. A written-but-unacknowledged share is
not delivered: if the subscriber's tunnel dies first, its futures fail, the worker
resets to its durable marks and the frames go to the next subscriber (the SDK drops
seqs it already has, so the application still sees each seq once).

Each subscriber has at most ``max_unacked`` shares written and awaiting its ack
(:data:`MAX_UNACKED`), and at most :data:`MAX_SUBSCRIBER_QUEUE` queued behind them.

A subscriber that acknowledges nothing for ``ack_timeout`` seconds while a share waits
for it (a hung application on a live tunnel, or one that stopped reading its stream) is
**evicted**: its stream is reset, its shares fail and the worker delivers them again to
the subscribers left (their cursors drop what they had). Without the deadline one such
subscriber stalled ``deliver()`` — and with it every topic of the shard, other
customers' included — for as long as its tunnel lived. A slow subscriber that keeps
acknowledging is not evicted: it slows its shard, as backpressure intends. A peer
whose subscriptions to a customer are evicted a second time within an hour has its
new subscriptions to that customer refused (``SubscriberQuarantined``) for
``ack_timeout``, doubling with each further eviction up to :data:`MAX_QUARANTINE`:
otherwise a hung application that reconnects stalls its shard for ``ack_timeout``
every time.

Frames of a topic with no subscriber are *held*: ``deliver()`` waits until one
subscribes. The shard workers ask :meth:`SubscriberHub.takes` first and *park* such a
topic instead (:mod:`pqcnet.relayer.worker`), so its shard's other topics keep
flowing; a worker holds only once its parking bound is reached, and then the shard's
bus lag grows and backpressure pauses its publishers — the same path as a slow
subscriber, and nothing is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pqcnet.errors import PqcnetError
from pqcnet.identity.spiffe import SpiffeId
from pqcnet.qstp.aio import Stream
from pqcnet.qstp.errors import TunnelClosed
from pqcnet.qstp.frames import ErrorCode
from pqcnet.relayer.errors import FrameRejected, RelayerError
from pqcnet.relayer.frame import Frame, Topic
from pqcnet.relayer.wire import (
    Ack,
    MessageReader,
    Subscribe,
    decode_client,
    encode_delivery_messages,
    encode_error,
)

log = logging.getLogger(__name__)

#: delivery batches queued per subscriber; bounds memory held for a slow subscriber
MAX_SUBSCRIBER_QUEUE = 64
#: subscriptions one relayer accepts; bounds the fan-out table
MAX_SUBSCRIPTIONS = 10_000
#: shares written to one subscriber and awaiting its ack (its in-flight window)
MAX_UNACKED = 64
#: bytes of queued delivery messages one stream write may coalesce
MAX_COALESCE_BYTES = 1 << 20
#: default seconds a subscriber may leave a written share unacknowledged
ACK_TIMEOUT = 30.0
#: seconds an eviction counts against its (peer, customer)
STRIKE_MEMORY = 3600.0
#: longest a repeat offender's new subscriptions are refused, seconds
MAX_QUARANTINE = 600.0
#: (peer, customer) pairs with evictions remembered (least recently evicted forgotten)
MAX_STRIKES = 10_000

_Item = tuple[list[Frame], asyncio.Future[None]]


class SubscriptionRefused(RelayerError):
    """The relayer is at :data:`MAX_SUBSCRIPTIONS`; try another relayer or later."""

    code = 31
    retriable = True


class SubscriberQuarantined(SubscriptionRefused):
    """This peer's subscriptions to this customer were evicted again and again for not
    acknowledging; new ones are refused for ``retry_after`` seconds."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(eq=False)
class Subscription:
    """One subscriber stream."""

    customer: str
    channels: frozenset[str]
    #: authenticated identity of the subscriber's tunnel (None: not known, tests)
    peer: SpiffeId | None = None
    queue: asyncio.Queue[_Item] = field(
        default_factory=lambda: asyncio.Queue(MAX_SUBSCRIBER_QUEUE))
    #: written shares awaiting the ack: (highest seq per topic, future), in write order
    unacked: deque[tuple[dict[Topic, int], asyncio.Future[None]]] = field(default_factory=deque)
    #: loop time the oldest share in ``unacked`` started waiting for its ack (moves on
    #: with each ack that resolves a share)
    waiting_since: float = 0.0
    #: highest seq per topic the subscriber acknowledged
    acked: dict[Topic, int] = field(default_factory=dict)
    #: set by an ack, a queued share and the end of the ack reader: what the stream's
    #: writer loop waits for (one event, not a task per queue read)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    #: the stream ended (:meth:`fail_all` ran): nothing put in the queue later is read
    gone: bool = False
    #: the ack deadline's timer (:meth:`SubscriberHub._watch`), while serving
    watchdog: asyncio.TimerHandle | None = None

    def ack(self, upto: dict[Topic, int]) -> None:
        """Apply a cumulative ack; resolve every share it covers."""
        for topic, seq in upto.items():
            if seq > self.acked.get(topic, 0):
                self.acked[topic] = seq
        resolved = False
        while self.unacked and all(self.acked.get(t, 0) >= n
                                   for t, n in self.unacked[0][0].items()):
            _, fut = self.unacked.popleft()
            resolved = True
            if not fut.done():
                fut.set_result(None)
        if resolved:  # progress: the next share's wait starts now
            self.waiting_since = asyncio.get_running_loop().time()
        self.wake.set()

    def fail_all(self, reason: str) -> None:
        """The subscriber is gone: every unacked or queued share fails."""
        self.gone = True
        while self.unacked:
            _, fut = self.unacked.popleft()
            if not fut.done():
                fut.set_exception(TunnelClosed(reason))
        while not self.queue.empty():
            _, fut = self.queue.get_nowait()
            if not fut.done():
                fut.set_exception(TunnelClosed(reason))

    def matches(self, frame: Frame) -> bool:
        """Whether ``frame`` is for this subscriber."""
        return frame.customer == self.customer and (
            not self.channels or frame.channel in self.channels)


class SubscriberHub:
    """Implements :class:`pqcnet.relayer.worker.Sink` over subscriber streams."""

    def __init__(self, max_subscriptions: int = MAX_SUBSCRIPTIONS, *,
                 max_unacked: int = MAX_UNACKED, ack_timeout: float = ACK_TIMEOUT) -> None:
        if max_unacked < 1:
            raise ValueError("max_unacked must be >= 1")
        if ack_timeout <= 0:
            raise ValueError("ack_timeout must be > 0")
        self.max_subscriptions = max_subscriptions
        self.max_unacked = max_unacked
        self.ack_timeout = ack_timeout
        self._subs: dict[str, list[Subscription]] = {}
        self._changed = asyncio.Event()
        #: frames waiting for a subscriber, per shard (``held`` sums them)
        self._held: dict[int, int] = {}
        #: subscribers evicted for leaving a share unacknowledged past ``ack_timeout``
        self.ack_timeouts = 0
        #: bumped when a subscriber joins or the grants change (Sink.generation)
        self.generation = 0
        #: called right after each bump (the node wakes workers holding parked topics)
        self.on_generation: Callable[[], None] | None = None
        #: (peer, customer) -> (evictions, loop time of the last), least recent first
        self._strikes: OrderedDict[tuple[str, str], tuple[int, float]] = OrderedDict()
        #: subscriptions refused because their peer is quarantined for the customer
        self.quarantine_refusals = 0
        #: delivery-time authorization ``(peer, customer, channel) -> bool``: a grant
        #: withdrawn by a reload stops delivery to subscriptions made under it (their
        #: topics are then parked, like topics nobody subscribed to). None: no check.
        self.may_receive: Callable[[SpiffeId, str, str], bool] | None = None

    @property
    def held(self) -> int:
        """Frames the shard workers hold now because no subscriber takes their topic."""
        return sum(self._held.values())

    def count(self) -> int:
        """Active subscriptions."""
        return sum(len(v) for v in self._subs.values())

    async def deliver(self, shard: int, frames: Sequence[Frame], *,
                      park: bool = False) -> Sequence[Frame]:
        """Deliver ``frames`` to every matching subscriber; hold those with none until
        one subscribes, or with ``park`` return them (in order) once the rest was
        acknowledged."""
        todo = list(frames)
        while todo:
            shares: dict[int, tuple[Subscription, list[Frame]]] = {}
            held: list[Frame] = []
            #: who gets a topic's frames: decided once per topic per round
            targets: dict[Topic, list[list[Frame]]] = {}
            for f in todo:
                topic = f.topic
                lists = targets.get(topic)
                if lists is None:
                    lists = targets[topic] = [
                        shares.setdefault(id(s), (s, []))[1]
                        for s in self._subs.get(f.customer, ())
                        if s.matches(f) and self._allowed(s, f.customer, f.channel)]
                if not lists:
                    held.append(f)
                for share in lists:
                    share.append(f)
            futs = []
            loop = asyncio.get_running_loop()
            for sub, share in shares.values():
                fut: asyncio.Future[None] = loop.create_future()
                await sub.queue.put((share, fut))
                sub.wake.set()
                if sub.gone:  # it left while we were putting: nobody will read this share
                    sub.fail_all("subscriber went away before acknowledging")
                futs.append(fut)
            errors = [r for r in await asyncio.gather(*futs, return_exceptions=True)
                      if isinstance(r, BaseException)]
            if errors:
                raise errors[0]
            todo = held
            if todo and park:
                return todo
            if todo:
                self._held[shard] = len(todo)
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self._changed.wait()
        self._held.pop(shard, None)
        return ()

    def policy_changed(self) -> None:
        """The grants changed (a reload): held and parked topics are looked at again."""
        self._bump()

    def _bump(self) -> None:
        self.generation += 1
        self._changed.set()
        if self.on_generation is not None:
            self.on_generation()

    def takes(self, topic: Topic) -> bool:
        """True if a subscriber (allowed by a live grant) takes ``topic`` now."""
        customer, channel = topic
        return any((not s.channels or channel in s.channels)
                   and self._allowed(s, customer, channel)
                   for s in self._subs.get(customer, ()))

    def _allowed(self, sub: Subscription, customer: str, channel: str) -> bool:
        check = self.may_receive
        return check is None or sub.peer is None or check(sub.peer, customer, channel)

    def unacked(self) -> int:
        """Shares written to subscribers and not yet acknowledged."""
        return sum(len(s.unacked) for subs in self._subs.values() for s in subs)

    async def serve(self, stream: Stream, request: Subscribe,
                    reader: MessageReader | None = None) -> None:
        """Feed one subscriber stream (and read its acks) until it ends or fails."""
        if self.count() >= self.max_subscriptions:
            raise SubscriptionRefused(f"relayer has {self.max_subscriptions} subscriptions")
        self._check_quarantine(str(stream.tunnel.peer.spiffe_id), request.customer)
        peer = stream.tunnel.peer.spiffe_id if self.may_receive is not None else None
        sub = Subscription(request.customer, request.channels, peer)
        self._subs.setdefault(sub.customer, []).append(sub)
        self._bump()
        acks = asyncio.create_task(self._read_acks(stream, sub, reader or MessageReader()))
        acks.add_done_callback(lambda _: sub.wake.set())
        log.info("subscriber joined", extra={"customer": sub.customer,
                                             "channels": sorted(sub.channels)})
        # this handler may be cancelled (its tunnel ended: GOAWAY on rotation,
        # revocation, shutdown) at any await; a share is taken from the queue only
        # between awaits and is in ``unacked`` before the next one, so fail_all finds
        # every share not acknowledged
        queue = sub.queue
        loop = asyncio.get_running_loop()
        # one timer per subscriber, re-armed at the oldest share's deadline: eviction
        # resets the stream, which ends this loop's wait or its blocked write (no timer
        # per write on the delivery path)
        sub.watchdog = loop.call_later(self.ack_timeout, self._watch, stream, sub)
        try:
            while not acks.done():
                if len(sub.unacked) >= self.max_unacked or queue.empty():
                    sub.wake.clear()  # window full or nothing queued: wait for a change
                    await sub.wake.wait()
                    continue
                items = [queue.get_nowait()]
                # shares already queued go out in the same write (one QSTP send, not one
                # per share), within the window and :data:`MAX_COALESCE_BYTES`; a share
                # too large for one message goes as several (the subscriber acks each)
                messages = encode_delivery_messages(items[0][0])
                size = sum(map(len, messages))
                while (not queue.empty() and size < MAX_COALESCE_BYTES
                       and len(sub.unacked) + len(items) < self.max_unacked):
                    items.append(queue.get_nowait())
                    more = encode_delivery_messages(items[-1][0])
                    messages += more
                    size += sum(map(len, more))
                if not sub.unacked:
                    sub.waiting_since = loop.time()
                for frames, fut in items:
                    upto: dict[Topic, int] = {}
                    for f in frames:
                        upto[f.topic] = f.seq  # in order per topic: the last is the highest
                    sub.unacked.append((upto, fut))
                try:
                    await stream.send(messages[0] if len(messages) == 1
                                      else b"".join(messages))
                except PqcnetError:
                    break
        finally:
            if sub.watchdog is not None:
                sub.watchdog.cancel()
            acks.cancel()
            self._subs[sub.customer].remove(sub)
            if not self._subs[sub.customer]:
                del self._subs[sub.customer]
            sub.fail_all("subscriber went away before acknowledging")
            log.info("subscriber left", extra={"customer": sub.customer})

    def _watch(self, stream: Stream, sub: Subscription) -> None:
        """The subscriber's ack deadline: evict it if its oldest share waited
        ``ack_timeout``, else look again at that share's deadline (or a timeout from now
        when nothing waits)."""
        if sub.gone:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        due = sub.waiting_since + self.ack_timeout if sub.unacked else now + self.ack_timeout
        if sub.unacked and now >= due:
            self._evict(stream, sub)
            return
        sub.watchdog = loop.call_at(due, self._watch, stream, sub)

    def _check_quarantine(self, peer: str, customer: str) -> None:
        """Refuse a repeat offender (second eviction within :data:`STRIKE_MEMORY`) for
        ``ack_timeout`` x 2^(evictions - 2), at most :data:`MAX_QUARANTINE`."""
        got = self._strikes.get((peer, customer))
        if got is None:
            return
        n, at = got
        now = asyncio.get_running_loop().time()
        if now - at > STRIKE_MEMORY:
            del self._strikes[(peer, customer)]
            return
        if n < 2:
            return
        left = at + min(self.ack_timeout * 2 ** (n - 2), MAX_QUARANTINE) - now
        if left > 0:
            self.quarantine_refusals += 1
            raise SubscriberQuarantined(
                f"{peer}'s subscriptions to {customer!r} were evicted {n} times for not "
                f"acknowledging; refused for {left:.0f} s more", retry_after=left)

    def _strike(self, peer: str, customer: str) -> None:
        key = (peer, customer)
        n, at = self._strikes.pop(key, (0, 0.0))
        now = asyncio.get_running_loop().time()
        self._strikes[key] = (1 if now - at > STRIKE_MEMORY else n + 1, now)
        while len(self._strikes) > MAX_STRIKES:
            self._strikes.popitem(last=False)

    def _evict(self, stream: Stream, sub: Subscription) -> None:
        """End a subscriber that left a share unacknowledged past ``ack_timeout``: its
        stream is reset (the serve loop's wait or write ends), its shares fail
        (``serve``'s cleanup) and go to the subscribers left."""
        self.ack_timeouts += 1
        with contextlib.suppress(PqcnetError, AttributeError):  # a tunnel without a peer
            self._strike(str(stream.tunnel.peer.spiffe_id), sub.customer)
        log.warning("subscriber evicted: no acknowledgement in time", extra={
            "customer": sub.customer, "peer": str(sub.peer) if sub.peer else None,
            "ack_timeout_s": self.ack_timeout, "unacked": len(sub.unacked)})
        with contextlib.suppress(PqcnetError):  # already ended: nothing to reset
            stream.reset(ErrorCode.CANCELLED,
                         f"no acknowledgement within {self.ack_timeout:g} s")

    @staticmethod
    async def _read_acks(stream: Stream, sub: Subscription, reader: MessageReader) -> None:
        try:
            while chunk := await stream.recv():
                for body in reader.feed(chunk):
                    request = decode_client(body)
                    if not isinstance(request, Ack):
                        raise FrameRejected("only acks are allowed after subscribing")
                    sub.ack(request.upto)
        except FrameRejected as exc:
            log.warning("subscriber sent a bad message; closing its stream",
                        extra={"customer": sub.customer, "reason": str(exc)})
            with contextlib.suppress(PqcnetError):
                await stream.send(encode_error(exc.code, str(exc)))
        except PqcnetError:
            pass

