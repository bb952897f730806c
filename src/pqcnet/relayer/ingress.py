"""QSTP ingress: publisher streams in, durable publish, per-frame results back.

Per tunnel the ingress keeps a :class:`TunnelSession`: the highest seq accepted per
topic on this tunnel (a seq going backwards without the ``retry`` flag is refused
with ``SeqNotMonotonic``) and the shards this tunnel publishes to (who gets FLOW
PAUSE when a shard backs up). A request's valid frames are grouped per shard and
published through :class:`~pqcnet.relayer.overflow.BufferedPublisher`; the reply is sent
only after they are durable on the bus or in the overflow queue.

Bad input never costs more than its own request: a frame with a missing, oversized
or non-monotonic field is rejected with a typed code while the rest of the request
goes through; an undecodable message gets an ``ErrorReply``; an oversized length
prefix resets only that stream. Other streams and tunnels are unaffected.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast

from pqcnet.errors import PqcnetError
from pqcnet.identity.spiffe import SpiffeId
from pqcnet.qstp.aio import Stream, Tunnel
from pqcnet.relayer.authz import Authorizer, Quotas, request_demand
from pqcnet.relayer.backpressure import FlowChange
from pqcnet.relayer.counters import SignedAckCounter
from pqcnet.relayer.egress import SubscriberHub, SubscriptionRefused
from pqcnet.relayer.errors import (
    FieldTooLarge,
    FrameRejected,
    LateFrame,
    NotAuthorized,
    QuotaExceeded,
    RelayerError,
    SeqNotMonotonic,
)
from pqcnet.relayer.frame import (
    Frame,
    FrameLimits,
    Topic,
    encode,
    shard_for,
    validate,
    validate_body,
)
from pqcnet.relayer.gapfence import GapFence
from pqcnet.relayer.overflow import BufferedPublisher
from pqcnet.relayer.receipts import VolumeReceipt
from pqcnet.relayer.wire import (
    MAX_FRAMES_PER_REQUEST,
    Ack,
    Counters,
    Incoming,
    MessageReader,
    MessageTooLarge,
    ReceiptRequest,
    Result,
    Subscribe,
    accepted,
    decode_client,
    encode_error,
    encode_receipt,
    encode_reply,
)

log = logging.getLogger(__name__)

#: FLOW reason the relayer sends with PAUSE/RESUME: a shard's backlog crossed a mark
REASON_SHARD_BACKLOG = 1
#: topics whose highest seq a tunnel session remembers (oldest forgotten first)
MAX_TOPICS_PER_TUNNEL = 65_536


@dataclass(eq=False)
class TunnelSession:
    """Ingress state of one publisher tunnel."""

    tunnel: Tunnel
    highest: OrderedDict[Topic, int] = field(default_factory=OrderedDict)
    shards: set[int] = field(default_factory=set)
    paused: bool = False


class IngressServices(Protocol):
    """What the node serves besides publish/subscribe (decision 0014)."""

    def add_counters(self, peer: str, counters: Sequence[SignedAckCounter]) -> int:
        """Keep a client's signed ack counters; returns how many were kept."""

    def receipt(self, peer: str, customer: str, epoch: int) -> VolumeReceipt:
        """The signed receipt of ``customer`` for ``epoch`` (RelayerError if refused)."""


@dataclass(slots=True)
class IngressStats:
    """Counters exported as metrics."""

    accepted: int = 0
    rejected: int = 0
    overflowed: int = 0
    pauses_sent: int = 0
    #: frames and subscriptions refused by the data-plane authorization
    unauthorized: int = 0
    #: frames refused by a customer quota
    over_quota: int = 0


class Ingress:
    """The relayer's QSTP handler for publishers and subscribers."""

    def __init__(self, publisher: BufferedPublisher, hub: SubscriberHub, *,
                 limits: FrameLimits | None = None,
                 max_frames_per_request: int = MAX_FRAMES_PER_REQUEST,
                 retry_after: float = 1.0, fence: GapFence | None = None,
                 authz: Authorizer | None = None,
                 quotas: Quotas | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 services: IngressServices | None = None) -> None:
        self.publisher, self.hub = publisher, hub
        #: data-plane authorization (None: everyone may do anything — tests of other
        #: parts only; a RelayerNode always sets one)
        self.authz = authz
        self.quotas = quotas or Quotas()
        self.clock = clock
        #: refuses late frames before the ack (shared with the shard workers)
        self.fence = fence
        self.shards = publisher.bus.partitions()
        self.limits = limits or FrameLimits()
        self.max_frames_per_request = max_frames_per_request
        #: seconds publishers are told to wait in a FLOW PAUSE
        self.retry_after = retry_after
        self.sessions: set[TunnelSession] = set()
        self.paused_shards: set[int] = set()
        self.stats = IngressStats()
        self.services = services

    # ------------------------------------------------------------------ tunnels
    async def handle_tunnel(self, tunnel: Tunnel) -> None:
        """``pqcnet.qstp.aio.serve`` handler: one task per stream until the tunnel ends."""
        session = TunnelSession(tunnel)
        self.sessions.add(session)
        tasks: set[asyncio.Task[None]] = set()
        try:
            async for stream in tunnel:
                task = asyncio.create_task(self._stream(session, stream))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for task in tasks:
                task.cancel()
            self.sessions.discard(session)

    async def _stream(self, session: TunnelSession, stream: Stream) -> None:
        reader = MessageReader()
        try:
            while chunk := await stream.recv():
                try:
                    bodies = reader.feed(chunk)
                except MessageTooLarge as exc:
                    await stream.send(encode_error(exc.code, str(exc)))
                    stream.reset(reason=str(exc))
                    return
                for body in bodies:
                    try:
                        request = decode_client(body)
                    except RelayerError as exc:
                        self.stats.rejected += 1
                        await stream.send(encode_error(exc.code, str(exc)))
                        continue
                    if isinstance(request, Subscribe):
                        try:
                            if self.authz is not None:
                                self.authz.check_subscribe(session.tunnel.peer.spiffe_id,
                                                           request.customer, request.channels)
                            await self.hub.serve(stream, request, reader)
                        except NotAuthorized as exc:
                            self.stats.unauthorized += 1
                            log.warning("subscription refused", extra={
                                "peer": str(session.tunnel.peer.spiffe_id),
                                "customer": request.customer, "reason": str(exc)})
                            await stream.send(encode_error(exc.code, str(exc)))
                        except SubscriptionRefused as exc:
                            await stream.send(encode_error(exc.code, str(exc)))
                        return
                    if isinstance(request, Ack):
                        self.stats.rejected += 1
                        err = FrameRejected("ack without a subscription on this stream")
                        await stream.send(encode_error(err.code, str(err)))
                        continue
                    if isinstance(request, (Counters, ReceiptRequest)):
                        await self._serve(session, stream, request)
                        continue
                    request_id, items = request
                    results = await self.publish(session, items)
                    await stream.send(encode_reply(request_id, results))
        except PqcnetError as exc:
            log.info("ingress stream ended", extra={"stream": stream.id, "reason": str(exc)})
        except Exception:  # never let a bug take the tunnel down with a traceback to the peer
            log.exception("ingress stream failed", extra={"stream": stream.id})
            stream.reset(reason="internal error")

    async def _serve(self, session: TunnelSession, stream: Stream,
                     request: Counters | ReceiptRequest) -> None:
        """Signed counters in (no reply) or a receipt out; refusals as ErrorReply."""
        try:
            if self.services is None:
                raise FrameRejected("this relayer keeps no counters and gives no receipts")
            peer = str(session.tunnel.peer.spiffe_id)
            if isinstance(request, Counters):
                self.services.add_counters(peer, request.items)
                return
            receipt = self.services.receipt(peer, request.customer, request.epoch)
        except RelayerError as exc:
            await stream.send(encode_error(exc.code, str(exc)))
            return
        await stream.send(encode_receipt(receipt))

    # ------------------------------------------------------------------ publish
    async def publish(self, session: TunnelSession, items: Sequence[Incoming]) -> list[Result]:
        """Validate, shard, durably publish; one :class:`Result` per item, in order.

        What depends only on the topic — its ids' limits, the authorization, its shard —
        is decided once per topic per request (a request carries many frames of few
        topics); seq, payload, QoS and quota are checked per frame."""
        results: list[Result | None] = [None] * len(items)
        if len(items) > self.max_frames_per_request:
            err = FieldTooLarge(f"{len(items)} frames in one request; "
                                f"max {self.max_frames_per_request}")
            return [Result(i.seq, False, code=err.code, reason=str(err)) for i in items]
        by_shard: dict[int, list[int]] = {}
        #: topic -> its shard, for topics whose ids and authorization passed
        known: dict[Topic, int] = {}
        pending_high: dict[Topic, int] = {}
        highest = session.highest
        peer = session.tunnel.peer.spiffe_id if self.authz is not None else None
        quotas = None if self.quotas.unlimited else self.quotas
        if quotas is not None and quotas.needs_prepare:  # cluster quotas: draw first
            await quotas.prepare(request_demand(self._publishable(items, peer)))
        now = self.clock()
        limits = self.limits
        for idx, item in enumerate(items):
            try:
                if item.error is not None:
                    raise item.error
                frame = item.frame
                assert frame is not None
                topic = frame.topic
                shard = known.get(topic)
                if shard is None:
                    validate(frame, limits)
                    if self.authz is not None:
                        assert peer is not None
                        self.authz.check(peer, "publish", frame.customer, frame.channel)
                    shard = known[topic] = shard_for(frame.customer, frame.channel,
                                                     self.shards)
                else:
                    validate_body(frame, limits)
                last = pending_high.get(topic)
                if last is None:
                    last = highest.get(topic, 0)
                if frame.seq <= last and not item.retry:
                    raise SeqNotMonotonic(
                        f"seq {frame.seq} after {last} on {frame.customer}/{frame.channel} "
                        "(set retry to resend)")
                if quotas is not None:
                    quotas.take(frame.customer, 1, len(frame.payload), now)
            except NotAuthorized as exc:
                self.stats.unauthorized += 1
                results[idx] = Result(item.seq, False, code=exc.code, reason=str(exc))
                continue
            except QuotaExceeded as exc:
                self.stats.over_quota += 1
                results[idx] = Result(item.seq, False, code=exc.code, reason=str(exc),
                                      retriable=True)
                continue
            except RelayerError as exc:
                results[idx] = Result(item.seq, False, code=exc.code, reason=str(exc))
                continue
            if frame.seq > last:
                pending_high[topic] = frame.seq
            idxs = by_shard.get(shard)
            if idxs is None:
                by_shard[shard] = [idx]
            else:
                idxs.append(idx)

        if by_shard:
            await self._commit(session, items, by_shard, results)
        while len(session.highest) > MAX_TOPICS_PER_TUNNEL:
            session.highest.popitem(last=False)
        out = [r for r in results if r is not None]
        ok = sum(r.accepted for r in out)
        self.stats.accepted += ok
        self.stats.rejected += len(out) - ok
        return out

    def _publishable(self, items: Sequence[Incoming], peer: SpiffeId | None
                     ) -> Iterator[tuple[str, int]]:
        """(customer, payload bytes) of the request's frames ``peer`` may publish: only
        they draw from a customer's cluster quota — a tenant without the grant must not
        drain another customer's shared bucket into this relayer."""
        allowed: dict[tuple[str, str], bool] = {}
        for item in items:
            frame = item.frame
            if frame is None or item.error is not None:
                continue
            if self.authz is not None:
                assert peer is not None
                key = (frame.customer, frame.channel)
                ok = allowed.get(key)
                if ok is None:
                    ok = allowed[key] = self.authz.may_publish(peer, *key)
                if not ok:
                    continue
            yield frame.customer, len(frame.payload)

    async def _commit(self, session: TunnelSession, items: Sequence[Incoming],
                      by_shard: dict[int, list[int]], results: list[Result | None]) -> None:
        """Fence, then one durable publish for every shard of the request; fills
        ``results`` for the items in ``by_shard``."""

        def refuse(idxs: list[int], exc: RelayerError) -> None:
            for i in idxs:
                results[i] = Result(items[i].seq, False, code=exc.code, reason=str(exc),
                                    retriable=exc.retriable)

        # the valid items carry a frame (the loop in publish refused the others)
        frames = {s: cast(list[Frame], [items[i].frame for i in idxs])
                  for s, idxs in by_shard.items()}
        tracked: set[int] = set()
        if self.fence is not None:
            verdicts = await self.fence.admit_many(
                {s: [(f, items[i].retry) for f, i in zip(frames[s], idxs, strict=True)]
                 for s, idxs in by_shard.items()},
                retries=any(item.retry for item in items))
            tracked = {s for s in verdicts if self.fence.tracked_here(s)}  # no await since
            for shard, late in verdicts.items():
                idxs = by_shard[shard]
                if isinstance(late, RelayerError):  # marks unreadable: refuse, retriable
                    refuse(idxs, late)
                    del by_shard[shard], frames[shard]
                    continue
                if any(err is not None for err in late):
                    for i, err in zip(idxs, late, strict=True):
                        if err is not None:
                            results[i] = Result(items[i].seq, False, code=err.code,
                                                reason=str(err))
                    by_shard[shard] = [i for i, e in zip(idxs, late, strict=True) if e is None]
                    frames[shard] = [f for f, e in zip(frames[shard], late, strict=True)
                                     if e is None]
                    if not by_shard[shard]:
                        del by_shard[shard], frames[shard]
            if not by_shard:
                return
        outcome = await self.publisher.publish_many(
            {s: [encode(f) for f in fs] for s, fs in frames.items()})
        await self._confirm_elsewhere(items, outcome, by_shard, frames, tracked, results)
        top: dict[Topic, int] = {}
        for shard, idxs in by_shard.items():
            acc = outcome[shard]
            if isinstance(acc, RelayerError):  # bus and overflow both refused (OverflowFull…)
                refuse(idxs, acc)
                if self.fence is not None:
                    self.fence.release_many(frames[shard])
                continue
            session.shards.add(shard)
            overflowed = acc.overflowed
            for i, frame in zip(idxs, frames[shard], strict=True):
                results[i] = accepted(items[i].seq, overflowed)
                topic = frame.topic
                if frame.seq > top.get(topic, 0):
                    top[topic] = frame.seq
            if overflowed:
                self.stats.overflowed += len(idxs)
        highest = session.highest
        for topic, high in top.items():  # most recently used last (the bound's order)
            highest[topic] = max(highest.pop(topic, 0), high)

    async def _confirm_elsewhere(self, items: Sequence[Incoming], outcome: Mapping[int, object],
                                 by_shard: dict[int, list[int]], frames: dict[int, list[Frame]],
                                 tracked: set[int], results: list[Result | None]) -> None:
        """Frames appended for shards owned elsewhere (or whose ownership moved since
        their admission) are recorded in the cluster's shared store before their ack
        (decision 0020); refused ones get LateFrame, all of a shard get the store's
        error (retriable) if it does not answer. ``by_shard``/``frames`` keep the rest."""
        fence = self.fence
        if fence is None or fence.confirmer is None:
            return
        elsewhere = {s: frames[s] for s in by_shard
                     if not isinstance(outcome[s], RelayerError)
                     and (s not in tracked or not fence.owned_here(s))}
        if not elsewhere:
            return
        try:
            verdicts: Mapping[int, list[LateFrame | None] | RelayerError] = (
                await fence.confirm(elsewhere))
        except RelayerError as exc:
            verdicts = dict.fromkeys(elsewhere, exc)
        for shard, late in verdicts.items():
            idxs = by_shard[shard]
            if isinstance(late, RelayerError):
                for i in idxs:
                    results[i] = Result(items[i].seq, False, code=late.code,
                                        reason=str(late), retriable=late.retriable)
                del by_shard[shard], frames[shard]
                continue
            for i, err in zip(idxs, late, strict=True):
                if err is not None:
                    results[i] = Result(items[i].seq, False, code=err.code, reason=str(err))
            keep = [e is None for e in late]
            by_shard[shard] = [i for i, k in zip(idxs, keep, strict=True) if k]
            frames[shard] = [f for f, k in zip(frames[shard], keep, strict=True) if k]
            if not by_shard[shard]:
                del by_shard[shard], frames[shard]

    # ------------------------------------------------------------------ flow
    def apply_flow(self, change: FlowChange) -> None:
        """Send FLOW PAUSE/RESUME to the tunnels publishing to ``change.shard``."""
        if change.action == "pause":
            self.paused_shards.add(change.shard)
        else:
            self.paused_shards.discard(change.shard)
        for s in list(self.sessions):
            if s.tunnel.closed:
                continue
            want = bool(s.shards & self.paused_shards)
            if want == s.paused:
                continue
            try:
                if want:
                    s.tunnel.pause(None, REASON_SHARD_BACKLOG, self.retry_after)
                    self.stats.pauses_sent += 1
                else:
                    s.tunnel.resume(None, REASON_SHARD_BACKLOG)
            except PqcnetError:
                continue
            s.paused = want
            log.info("flow " + ("pause" if want else "resume"),
                     extra={"shard": change.shard, "backlog": change.backlog})
