"""Publisher and subscriber SDK: what ``pqcnet publish`` / ``pqcnet subscribe`` and the
tests use to talk to a relayer over a QSTP tunnel.

Exactly-once to the application across reconnects, relayer restarts and subscriber
restarts rests on a durable **cursor** (highest seq the application took, per topic;
:mod:`pqcnet.relayer.cursor`): a :class:`SubscriberClient` starts from it and drops
every redelivered seq at or below it; it commits the cursor when the application
acknowledges a batch (asks for the next one, or calls :meth:`SubscriberClient.ack`),
then acks on the wire — never before. :class:`ResumingSubscriber` reconnects with
the same cursor.

:class:`PublisherClient` pipelines requests on one stream (replies come back in
order and are matched by request id) and honours FLOW PAUSE because
``Stream.send`` waits while the relayer has paused the tunnel; it counts the FLOW
frames it saw. :class:`SubscriberClient` yields delivered frames and drops any seq
it already has per topic — the last step of exactly-once, covering redelivery after
a relayer crash or a lost ack. It acknowledges each batch (highest seq per topic)
when the application asks for the next one, i.e. after it took the batch: the
relayer commits and meters a batch only on that ack, so a batch written to a tunnel
that died before the application read it is redelivered, not lost.

Both clients can count what they acknowledged (decision 0014): given a
:class:`~pqcnet.relayer.counters.CounterTracker` they count accepted (publisher) or
taken-and-acked (subscriber) frames per (customer, channel, epoch), and
:meth:`send_counters` sends the counters signed with the client's identity key to the
relayer — automatically at most every ``counter_interval`` seconds while acking.
:meth:`PublisherClient.receipt` asks for the customer's signed receipt of an epoch.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence

from pqcnet._util.tasks import cancel_and_wait
from pqcnet.errors import PqcnetError
from pqcnet.identity import NodeIdentity
from pqcnet.qstp import aio
from pqcnet.qstp.aio import Stream, Tunnel
from pqcnet.qstp.errors import HandshakeError, TunnelClosed
from pqcnet.qstp.events import FlowPaused
from pqcnet.qstp.tls import TlsPolicy
from pqcnet.relayer.counters import CounterTracker
from pqcnet.relayer.cursor import Cursor, MemoryCursor
from pqcnet.relayer.errors import RelayerError
from pqcnet.relayer.frame import Frame, Topic
from pqcnet.relayer.receipts import VolumeReceipt
from pqcnet.relayer.wire import (
    MAX_FRAMES_PER_REQUEST,
    MAX_MESSAGE,
    MessageReader,
    MessageTooLarge,
    Result,
    ServerError,
    decode_server,
    encode_ack,
    encode_counters,
    encode_publish,
    encode_receipt_request,
    encode_subscribe,
    message_parts,
)

#: publish requests in flight on one stream before ``publish()`` waits
MAX_INFLIGHT = 32
#: seconds between automatic signed-counter sends while acking
COUNTER_INTERVAL = 1.0


class RelayerRefused(RelayerError):
    """The relayer answered a request with an ErrorReply."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"relayer error {code}: {reason}")
        self.code = code


class PublisherClient:
    """Publishes frames over one QSTP stream."""

    def __init__(self, tunnel: Tunnel, *, max_inflight: int = MAX_INFLIGHT,
                 counters: CounterTracker | None = None) -> None:
        self.tunnel = tunnel
        self.counters = counters
        self._receipts: asyncio.Queue[VolumeReceipt | PqcnetError] = asyncio.Queue(1)
        self.stream: Stream = tunnel.open_stream()
        self.pauses_seen = 0
        self._next_id = 1
        self._waiting: dict[int, asyncio.Future[list[Result]]] = {}
        self._slots = asyncio.Semaphore(max_inflight)
        self._reader = asyncio.create_task(self._read())
        tunnel.on_flow = self._on_flow

    @classmethod
    async def connect(cls, host: str, port: int, identity: NodeIdentity,
                      policy: TlsPolicy | None = None, *,
                      counters: CounterTracker | None = None) -> PublisherClient:
        """Open a tunnel to a relayer and a publishing stream on it."""
        return cls(await aio.connect(host, port, identity, policy), counters=counters)

    def _on_flow(self, event: object) -> None:
        if isinstance(event, FlowPaused):
            self.pauses_seen += 1

    async def _read(self) -> None:
        reader = MessageReader()
        error: PqcnetError = TunnelClosed("relayer closed the stream")
        try:
            while chunk := await self.stream.recv():
                for body in reader.feed(chunk):
                    msg = decode_server(body)
                    if isinstance(msg, VolumeReceipt):
                        self._receipts.put_nowait(msg)
                        continue
                    if isinstance(msg, ServerError):
                        error = RelayerRefused(msg.code, msg.reason)
                        if not self._waiting and self._receipts.empty():
                            self._receipts.put_nowait(error)  # a refused receipt
                            continue
                        # request-level errors answer the oldest outstanding request
                        if self._waiting:
                            oldest = min(self._waiting)
                            self._waiting.pop(oldest).set_exception(error)
                        continue
                    if isinstance(msg, tuple):
                        fut = self._waiting.pop(msg[0], None)
                        if fut is not None and not fut.done():
                            fut.set_result(msg[1])
        except PqcnetError as exc:
            error = exc.with_traceback(None)  # no tb: no cycle via its frame
        if self._receipts.empty():
            self._receipts.put_nowait(error)  # wakes a receipt() waiting on a dead stream
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(error)
        self._waiting.clear()

    async def publish(self, frames: Sequence[Frame], *, retry: bool = False) -> list[Result]:
        """Send ``frames``; returns one result per frame once durable. One request when
        it fits (the common case); more than a request holds — 4096 frames, or more
        bytes than a relayer message (8 MiB) — goes as several, one after the other
        (in seq order: a topic's later part never overtakes its earlier one and fills
        the relayer's reorder buffer). Before, such a call was refused frame by frame (too
        many) or reset the publisher's stream (too large), failing every request on
        it. A transport error fails the whole call, as for one request: resend it with
        ``retry`` (parts already durable are then accepted and suppressed). A single
        frame too large for a message raises :class:`MessageTooLarge` before anything
        is sent."""
        if len(frames) <= MAX_FRAMES_PER_REQUEST:
            results = await self._request(frames, retry)
            if results is not None:
                return results
        parts = message_parts(frames, MAX_FRAMES_PER_REQUEST)
        if len(parts) == 1:
            raise MessageTooLarge(f"{len(frames)} frames do not fit a relayer message")
        out: list[Result] = []
        for part in parts:
            out += await self.publish(part, retry=retry)
        return out

    async def _request(self, frames: Sequence[Frame], retry: bool) -> list[Result] | None:
        """One PublishRequest; None (nothing sent) if it is larger than a message."""
        async with self._slots:
            if self._reader.done():
                raise TunnelClosed("publisher stream is closed")
            data = encode_publish(self._next_id, frames, retry=retry)
            if len(data) - 4 > MAX_MESSAGE:
                return None
            request_id = self._next_id
            self._next_id += 1
            fut: asyncio.Future[list[Result]] = asyncio.get_running_loop().create_future()
            self._waiting[request_id] = fut
            await self.stream.send(data)
            results = await fut
        if self.counters is not None:
            self.counters.count(f for f, r in zip(frames, results, strict=False) if r.accepted)
        return results

    async def send_counters(self) -> int:
        """Send the signed counters that changed (or closed); returns how many."""
        signed = self.counters.take() if self.counters is not None else []
        if signed:
            await self.stream.send(encode_counters(signed))
        return len(signed)

    async def receipt(self, customer: str, epoch: int) -> VolumeReceipt:
        """The relayer's signed receipt of ``customer`` for ``epoch`` (one at a time, and
        not while publishes are in flight). :class:`RelayerRefused` when refused; the
        stream's error if it ends first."""
        async with self._slots:
            if self._reader.done():
                raise TunnelClosed("publisher stream is closed")
            await self.stream.send(encode_receipt_request(customer, epoch))
            got = await self._receipts.get()
        if isinstance(got, PqcnetError):
            raise got
        return got

    async def send_raw(self, data: bytes) -> None:
        """Send arbitrary bytes on the publishing stream (tests of bad input)."""
        await self.stream.send(data)

    async def close(self) -> None:
        """Close the stream and the tunnel."""
        try:
            with contextlib.suppress(PqcnetError):
                await cancel_and_wait(self._reader)
        finally:  # the tunnel closes even when this close is cancelled
            with contextlib.suppress(PqcnetError):
                await self.tunnel.close()


class SubscriberClient:
    """Receives one customer's frames (some or all channels) in order, exactly once.

    ``cursor`` holds what the application already took (default: in memory, this
    connection only). Pass a durable one (:class:`~pqcnet.relayer.cursor.FileCursor`,
    :class:`~pqcnet.relayer.cursor.JournalCursor`) and a new client — after a reconnect,
    a relayer restart or a restart of the application — resumes exactly after it.
    """

    def __init__(self, tunnel: Tunnel, cursor: Cursor | None = None, *,
                 counters: CounterTracker | None = None,
                 counter_interval: float = COUNTER_INTERVAL,
                 seen: dict[Topic, int] | None = None) -> None:
        self.tunnel = tunnel
        #: signs per-epoch ack counters for the relayer's volume claims (decision 0014)
        self.counters = counters
        self.counter_interval = counter_interval
        self._counter_stream: Stream | None = None
        self._counters_sent_at = 0.0
        self.cursor: Cursor = cursor if cursor is not None else MemoryCursor()
        #: highest seq per topic handed to the application (committed or about to be);
        #: ``seen`` shares it between the clients of one application (one per relayer of
        #: a cluster), so a frame redelivered by another relayer after a takeover is dropped
        self.last: dict[Topic, int] = seen if seen is not None else {}
        for topic, seq in self.cursor.load().items():
            self.last[topic] = max(self.last.get(topic, 0), seq)
        #: redelivered frames dropped (at or below the cursor): never reach the application
        self.duplicates_dropped = 0
        self.batches_acked = 0
        self._pending: dict[Topic, int] = {}
        self._taken: list[Frame] = []
        self._stream: Stream | None = None

    @classmethod
    async def connect(cls, host: str, port: int, identity: NodeIdentity,
                      policy: TlsPolicy | None = None,
                      cursor: Cursor | None = None, *,
                      counters: CounterTracker | None = None) -> SubscriberClient:
        """Open a tunnel to a relayer."""
        return cls(await aio.connect(host, port, identity, policy), cursor,
                   counters=counters)

    async def subscribe(self, customer: str, channels: Iterable[str] = ()) -> None:
        """Send the subscription; frames follow on :meth:`frames`."""
        self._stream = self.tunnel.open_stream()
        await self._stream.send(encode_subscribe(customer, channels))

    async def batches(self) -> AsyncIterator[list[Frame]]:
        """Delivered frames in batches, already deduplicated, until the stream ends."""
        if self._stream is None:
            raise TunnelClosed("subscribe() first")
        reader = MessageReader()
        while chunk := await self._stream.recv():
            for body in reader.feed(chunk):
                msg = decode_server(body)
                if isinstance(msg, ServerError):
                    raise RelayerRefused(msg.code, msg.reason)
                if not isinstance(msg, list):
                    continue
                fresh = []
                upto: dict[Topic, int] = {}
                for f in msg:
                    upto[f.topic] = max(upto.get(f.topic, 0), f.seq)
                    if f.seq <= self.last.get(f.topic, 0):
                        self.duplicates_dropped += 1
                        continue
                    self.last[f.topic] = f.seq
                    fresh.append(f)
                self._pending = upto
                self._taken = fresh
                if fresh:
                    yield fresh  # resumed: the application took the batch
                await self.ack()

    async def ack(self, upto: Mapping[Topic, int] | None = None) -> None:
        """Acknowledge the batch last yielded by :meth:`batches` (done automatically
        when the next one is asked for), or only ``upto`` (highest seq per topic taken)
        when the application stops part-way through a batch.

        The cursor is committed first (with the frames taken), the wire ack second: a
        crash in between redelivers frames the cursor then drops.
        """
        pending, self._pending = (upto or self._pending), {}
        taken, self._taken = self._taken, []
        if upto is not None:
            taken = [f for f in taken if f.seq <= upto.get(f.topic, 0)]
        committed = {f.topic: f.seq for f in taken}  # in order per topic: last is highest
        if committed:
            self.cursor.commit(taken, committed)
        if pending and self._stream is not None:
            await self._stream.send(encode_ack(pending))
            self.batches_acked += 1
            if self.counters is not None:
                self.counters.count(taken)
                now = asyncio.get_running_loop().time()
                if now - self._counters_sent_at >= self.counter_interval:
                    self._counters_sent_at = now
                    await self.send_counters()

    async def send_counters(self) -> int:
        """Send the signed counters that changed (or closed) on a stream of their own
        (the subscription stream carries only acks); returns how many."""
        signed = self.counters.take() if self.counters is not None else []
        if signed:
            if self._counter_stream is None:
                self._counter_stream = self.tunnel.open_stream()
            await self._counter_stream.send(encode_counters(signed))
        return len(signed)

    async def close(self) -> None:
        """Close the tunnel."""
        with contextlib.suppress(PqcnetError):
            await self.tunnel.close()


class ResumingSubscriber:
    """A subscriber that reconnects (to any of ``targets``, in turn) until closed,
    resuming from its cursor each time: the application sees each seq once, in order,
    across relayer restarts and lost tunnels.

    Connection failures and lost tunnels are retried after ``retry_delay`` seconds;
    a refusal the relayer says is final (not ``retriable``) is raised.
    """

    def __init__(self, targets: Sequence[tuple[str, int]], identity: NodeIdentity,
                 customer: str, channels: Iterable[str] = (), *,
                 cursor: Cursor | None = None, policy: TlsPolicy | None = None,
                 retry_delay: float = 0.2, seen: dict[Topic, int] | None = None) -> None:
        if not targets:
            raise ValueError("at least one relayer target")
        self.seen = seen
        self.targets = list(targets)
        self.identity, self.policy = identity, policy
        self.customer, self.channels = customer, tuple(channels)
        self.cursor: Cursor = cursor if cursor is not None else MemoryCursor()
        self.retry_delay = retry_delay
        self.reconnects = 0
        self.duplicates_dropped = 0
        self.client: SubscriberClient | None = None
        self._closed = False

    async def batches(self) -> AsyncIterator[list[Frame]]:
        """Batches across connections; acknowledging works as in :class:`SubscriberClient`."""
        attempt = 0
        while not self._closed:
            host, port = self.targets[attempt % len(self.targets)]
            attempt += 1
            try:
                client = SubscriberClient(await aio.connect(host, port, self.identity,
                                                            self.policy),
                                          self.cursor, seen=self.seen)
            except (PqcnetError, OSError):
                await asyncio.sleep(self.retry_delay)
                continue
            self.client = client
            try:
                await client.subscribe(self.customer, self.channels)
                async for batch in client.batches():
                    yield batch
            except RelayerRefused as exc:
                if exc.code != 31:  # only "too many subscriptions" is worth retrying
                    raise
            except PqcnetError:
                pass
            finally:
                self.duplicates_dropped += client.duplicates_dropped
                client.duplicates_dropped = 0
                await client.close()
                self.client = None
            if self._closed:
                return
            self.reconnects += 1
            await asyncio.sleep(self.retry_delay)

    async def ack(self, upto: Mapping[Topic, int] | None = None) -> None:
        """Acknowledge (part of) the batch last yielded; see :meth:`SubscriberClient.ack`.

        A tunnel lost under the wire ack (a GOAWAY on rotation, a relayer restart) is
        not an error: the cursor was committed first, and the next connection resumes
        from it (the relayer sends the batch again, the cursor drops it). A cursor
        that cannot commit still raises."""
        if self.client is not None:
            with contextlib.suppress(TunnelClosed):
                await self.client.ack(upto)

    async def close(self) -> None:
        """Stop reconnecting and close the current tunnel."""
        self._closed = True
        if self.client is not None:
            await self.client.close()


#: handshake refusals about *our* identity: every relayer of the cluster would refuse it
#: too (a slash or revocation is mesh-wide), so failing over only hides the answer
IDENTITY_REFUSALS = frozenset({"certificate-refused", "revoked", "denied", "unknown-ca",
                               "spiffe-not-allowed", "bad-certificate"})


def _refusal_reason(exc: HandshakeError) -> str:
    """The refusal code of a handshake error (``reason``, or the ``[code]`` its message
    ends with when the tunnel re-raised it as a plain HandshakeError)."""
    reason = getattr(exc, "reason", "")
    if reason:
        return str(reason)
    text = str(exc)
    return text[text.rfind("[") + 1:-1] if text.endswith("]") and "[" in text else ""


class FailoverPublisher:
    """A publisher that takes a list of relayers (a cluster sharing one bus) and fails
    over between them, client-side.

    Requests go to the current relayer; when the connection fails, the tunnel is lost
    or a request takes longer than ``attempt_timeout`` seconds, the same frames — same
    seqs — are sent again to the next relayer, marked as a retry. A frame the first
    relayer had already put on the bus is then on it twice, and the shard worker's
    dedup marks deliver it once: exactly once across failovers. :meth:`publish` gives
    up (raising the last error) after ``give_up`` seconds without an answer.
    """

    def __init__(self, targets: Sequence[tuple[str, int]], identity: NodeIdentity,
                 policy: TlsPolicy | None = None, *,
                 counters: CounterTracker | None = None, attempt_timeout: float = 10.0,
                 retry_delay: float = 0.2, give_up: float = 60.0) -> None:
        if not targets:
            raise ValueError("at least one relayer target")
        self.targets = list(targets)
        self.identity, self.policy, self.counters = identity, policy, counters
        self.attempt_timeout, self.retry_delay, self.give_up = (attempt_timeout,
                                                                retry_delay, give_up)
        self.client: PublisherClient | None = None
        #: times this publisher moved to another relayer (or reconnected)
        self.failovers = 0
        self._pauses = 0
        self._next = 0
        self._retry = False

    @property
    def pauses_seen(self) -> int:
        """FLOW PAUSE frames seen across connections."""
        return self._pauses + (self.client.pauses_seen if self.client is not None else 0)

    async def _connected(self) -> PublisherClient:
        if self.client is None:
            host, port = self.targets[self._next % len(self.targets)]
            self._next += 1
            self.client = await PublisherClient.connect(host, port, self.identity,
                                                        self.policy, counters=self.counters)
        return self.client

    async def _drop(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            self._pauses += client.pauses_seen
            with contextlib.suppress(PqcnetError, OSError):
                await client.close()
        self.failovers += 1
        self._retry = True  # what was sent may be on the bus already

    async def publish(self, frames: Sequence[Frame], *, retry: bool = False) -> list[Result]:
        """Send ``frames`` (one request) to the current relayer, failing over to the
        next with the same seqs until one answers; one result per frame."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.give_up
        while True:
            try:
                client = await self._connected()
                async with asyncio.timeout(self.attempt_timeout):
                    results = await client.publish(frames, retry=retry or self._retry)
            except RelayerRefused:
                raise  # the relayer answered: not a connectivity problem
            except HandshakeError as exc:
                if _refusal_reason(exc) in IDENTITY_REFUSALS:
                    raise  # our identity is refused (slashed, revoked...): so would the rest be
                await self._drop()
                if loop.time() >= deadline:
                    raise
                await asyncio.sleep(self.retry_delay)
                continue
            except (PqcnetError, OSError, TimeoutError) as exc:
                await self._drop()
                if loop.time() >= deadline:
                    if isinstance(exc, PqcnetError):
                        raise
                    raise TunnelClosed(f"no relayer answered: {exc or 'timeout'}") from None
                await asyncio.sleep(self.retry_delay)
                continue
            self._retry = False
            return results

    async def close(self) -> None:
        """Close the current connection."""
        client, self.client = self.client, None
        if client is not None:
            self._pauses += client.pauses_seen
            await client.close()


class ClusterSubscriber:
    """A subscriber of a relayer cluster: one :class:`ResumingSubscriber` per relayer,
    their batches merged into one stream for the application.

    In a cluster each relayer delivers only the shards (bus partitions) it owns, and
    ownership moves when relayers join, leave or die, so a subscriber listens to every
    relayer. All of them share one cursor and one "highest seq taken" table: a frame
    redelivered by the relayer that took a shard over is dropped, so the application
    sees each seq once, in order per topic. Each batch is acknowledged to the relayer
    it came from when the application asks for the next one (or calls :meth:`ack`).
    """

    def __init__(self, targets: Sequence[tuple[str, int]], identity: NodeIdentity,
                 customer: str, channels: Iterable[str] = (), *,
                 cursor: Cursor | None = None, policy: TlsPolicy | None = None,
                 retry_delay: float = 0.2) -> None:
        if not targets:
            raise ValueError("at least one relayer target")
        self.cursor: Cursor = cursor if cursor is not None else MemoryCursor()
        self._seen: dict[Topic, int] = dict(self.cursor.load())
        self.subs = [ResumingSubscriber([t], identity, customer, channels, cursor=self.cursor,
                                        policy=policy, retry_delay=retry_delay,
                                        seen=self._seen)
                     for t in targets]
        self._source: ResumingSubscriber | None = None

    @property
    def duplicates_dropped(self) -> int:
        """Redelivered frames dropped across relayers and connections."""
        return sum(s.duplicates_dropped + (s.client.duplicates_dropped if s.client else 0)
                   for s in self.subs)

    @property
    def reconnects(self) -> int:
        """Reconnections across relayers."""
        return sum(s.reconnects for s in self.subs)

    async def batches(self) -> AsyncIterator[list[Frame]]:
        """Batches from every relayer, in the order they arrived."""
        Item = tuple[ResumingSubscriber, list[Frame], asyncio.Future[None]] | BaseException
        queue: asyncio.Queue[Item] = asyncio.Queue(len(self.subs))
        loop = asyncio.get_running_loop()

        async def pump(sub: ResumingSubscriber) -> None:
            try:
                async for batch in sub.batches():
                    taken: asyncio.Future[None] = loop.create_future()
                    await queue.put((sub, batch, taken))
                    await taken  # acked when the generator resumes: after the app took it
            except Exception as exc:  # a final refusal: hand it to the application
                await queue.put(exc)

        tasks = [asyncio.create_task(pump(s), name=f"cluster-sub-{i}")
                 for i, s in enumerate(self.subs)]
        taken: asyncio.Future[None] | None = None
        try:
            while True:
                if taken is not None and not taken.done():
                    taken.set_result(None)
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                self._source, batch, taken = item
                yield batch
        finally:
            with contextlib.suppress(PqcnetError, OSError):
                await cancel_and_wait(*tasks)

    async def ack(self, upto: Mapping[Topic, int] | None = None) -> None:
        """Acknowledge (part of) the batch last yielded, to the relayer it came from."""
        if self._source is not None:
            await self._source.ack(upto)

    async def close(self) -> None:
        """Stop every subscription."""
        for s in self.subs:
            await s.close()
