"""``RelayerShardWorker``: bus shard -> in-order, exactly-once delivery to subscribers.

One worker per shard runs the loop::

    consume batch -> Sequencer.offer/poll -> sink.deliver(in-order frames)
                  -> persist next_seq marks -> ack the bus prefix that is done

The order of the last three steps is the whole correctness argument: a crash after
delivery but before the marks are saved replays frames the subscriber already has
(the subscriber SDK drops seq <= last seen); a crash after the marks but before the
ack replays frames the marks suppress (on Redis the ack is in the marks' own script,
after them: :meth:`Bus.ack_in_store`). Nothing is acked before it was delivered,
so an acknowledged publish is never lost. The batch's metered volume is written
together with the marks, so it is counted exactly once across crashes too.

A failing sink or bus resets the worker to the last durable state (reload marks,
rewind the bus) and retries with capped backoff; the loop never dies on them.

**Parking** (``park_max_records`` > 0): a topic nobody subscribes to must not hold
its shard — other customers' topics share it. The worker passes over such a topic's
frames: they are neither delivered nor metered, its mark is not persisted past them,
and the bus is acknowledged only up to the first record that carried one. Every
other topic is delivered, marked and metered as usual. When a subscriber for a parked
topic appears, the worker resets: the bus replays from the first parked record, the
marks drop what the other topics already got, and the parked frames go out in order
— the same argument as a crash, which parking therefore also survives. The records
consumed past the first parked one are bounded by ``park_max_records`` (the bus
cannot trim them); at the bound the worker replays and *holds* the shard as it did
before parking existed, until the held topics are delivered, and backpressure pauses
the shard's publishers (decision 0021).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from pqcnet.errors import PqcnetError
from pqcnet.relayer.agreement import GapAgreement
from pqcnet.relayer.bus.base import Bus, Delivery
from pqcnet.relayer.errors import BusUnavailable, FrameRejected
from pqcnet.relayer.frame import Frame, Topic, decode
from pqcnet.relayer.gapfence import GapFence, SeqRanges
from pqcnet.relayer.metering import VolumeDelta, VolumeMeter
from pqcnet.relayer.seqstore import SeqStore
from pqcnet.relayer.sequencer import (
    GAP_TIMEOUT,
    MAX_REORDER,
    MAX_TOPICS,
    Deliver,
    Duplicate,
    Gap,
    HoldGap,
    Sequencer,
)

log = logging.getLogger(__name__)


class Sink(Protocol):
    """Where in-order frames go (the subscriber hub, or a test collector)."""

    async def deliver(self, shard: int, frames: Sequence[Frame], *,
                      park: bool = False) -> Sequence[Frame]:
        """Deliver ``frames`` (already in order per topic); raise to have them retried.

        A topic nobody takes waits for a subscriber; with ``park`` its frames are
        returned at once instead (in order), and nothing else is."""
        ...

    def takes(self, topic: Topic) -> bool:
        """True if a subscriber would take ``topic``'s frames now (else they are parked)."""
        ...

    @property
    def generation(self) -> int:
        """Changes whenever :meth:`takes` may have become true for a topic (a subscriber
        joined, the grants changed): parked topics are looked at again only then."""
        ...


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """Bounds and timings of one shard worker."""

    #: consumer group name on the bus
    group: str = "relayer"
    #: records per consume; bounds one batch's memory and latency
    batch: int = 512
    #: seconds a consume waits for new records
    poll_timeout: float = 0.2
    #: longest consume wait of a quiet shard: each empty consume doubles the wait from
    #: ``poll_timeout`` up to this (0: no growth). Records end any wait at once; what
    #: else a worker looks at between consumes (parked topics, settling an unsure
    #: save, catching up — on Redis also the three leases after a claim) keeps the
    #: short wait, and ``stop`` interrupts the bus.
    idle_poll_timeout: float = 0.0
    #: frames held out of order per shard
    max_reorder: int = MAX_REORDER
    #: seconds before a missing seq is reported and skipped
    gap_timeout: float = GAP_TIMEOUT
    #: topics whose marks stay cached (LRU); colder ones are read from the store per batch
    max_topics: int = MAX_TOPICS
    #: longest backoff after a bus/sink failure
    max_backoff: float = 2.0
    #: records consumed past the first parked one before the shard holds instead
    #: (the bus keeps them unacknowledged); 0 turns parking off
    park_max_records: int = 0


@dataclass(slots=True)
class WorkerStats:
    """Counters a worker keeps (exported by the node's metrics)."""

    delivered: int = 0
    duplicates: int = 0
    gaps: int = 0
    corrupt: int = 0
    resets: int = 0
    #: marks dropped from the LRU / read back from the store on a miss
    evictions: int = 0
    mark_loads: int = 0
    #: ambiguous saves (connection closed under them) found applied afterwards
    unsure_landed: int = 0
    #: frames passed over because no subscriber took their topic (counted again if
    #: a replay passes over them again)
    parked: int = 0
    #: replays because a subscriber arrived for a parked topic
    park_replays: int = 0
    #: replays because ``park_max_records`` was reached (the shard then holds)
    park_overflows: int = 0
    #: gap skips postponed (each :data:`~pqcnet.relayer.sequencer.HOLD_RECHECK`) because
    #: the worker had not yet read the records its bus held at its last reset
    held_catching_up: int = 0


class RelayerShardWorker:
    """Delivers one shard in order, exactly once."""

    def __init__(
        self,
        bus: Bus,
        shard: int,
        store: SeqStore,
        sink: Sink,
        config: WorkerConfig | None = None,
        *,
        meter: VolumeMeter | None = None,
        on_delivered: Callable[[int, Sequence[Frame]], None] | None = None,
        on_gap: Callable[[Gap], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        fence: GapFence | None = None,
        agreement: GapAgreement | None = None,
    ) -> None:
        self.bus, self.shard, self.store, self.sink = bus, shard, store, sink
        self.config = config or WorkerConfig()
        self.stats = WorkerStats()
        self.meter = meter
        self._on_delivered = on_delivered
        self._on_gap = on_gap
        self._clock = clock
        self.fence = fence
        #: the cluster's shared store, where skips are reserved first (decision 0020)
        self.agreement = agreement
        if fence is not None:
            fence.attach_worker(shard, self.cached_mark)
        self._seq: Sequencer | None = None
        self._inflight: deque[Delivery] = deque()
        self._stopping = False
        #: (token, volume) of a save that failed ambiguously, until the store tells
        self._unsure: tuple[bytes, VolumeDelta] | None = None
        #: parked topics -> the seq of their first parked frame (their durable mark)
        self._parked: dict[Topic, int] = {}
        #: records consumed since the bus acknowledgement stopped at a parked record
        self.behind_park = 0
        #: the sink's generation when the parked topics were last looked at
        self._looked_at = -1
        #: parking is off until these topics (parked when ``park_max_records`` was hit)
        #: were delivered again: the shard holds for them as without parking
        self._hold: set[Topic] = set()
        #: the next consume's wait on a quiet shard (grows to ``idle_poll_timeout``)
        self._idle_wait = self.config.poll_timeout

    @property
    def parked_topics(self) -> int:
        """Topics whose frames this worker passes over now (no subscriber)."""
        return len(self._parked)

    def cached_mark(self, topic: Topic) -> int | None:
        """The in-memory next seq of ``topic`` (None if not cached): newer than the store."""
        return None if self._seq is None else self._seq.peek(topic)

    async def _reset(self) -> None:
        # no marks loaded here: they come from the store lazily, per topic, on a miss;
        # skips reserved but not saved past (a relayer stopped between) are loaded first
        # (the rewind first: if it fails, the next step resets again)
        self._seq = None
        pending = (await self.agreement.load_pending(self.shard)
                   if self.agreement is not None else {})
        await self.bus.rewind(self.shard, self.config.group)
        self._seq = Sequencer(max_reorder=self.config.max_reorder,
                              gap_timeout=self.config.gap_timeout,
                              max_topics=self.config.max_topics,
                              defer_forced=self.agreement is not None)
        self._seq.preskip(pending)
        self._inflight.clear()
        self._parked.clear()
        self.behind_park = 0

    async def _unpark(self) -> None:
        """Replay from the first parked record if a parked topic has a subscriber now
        (it gets its frames in order) or the parking bound was reached (the shard then
        holds until the held topics are delivered)."""
        if self.behind_park >= self.config.park_max_records:
            self.stats.park_overflows += 1
            self._hold = set(self._parked)
            log.warning("parking bound reached: the shard holds until its topics with no "
                        "subscriber get one", extra={
                            "shard": self.shard, "parked_topics": len(self._parked),
                            "records_behind": self.behind_park})
        elif self.sink.generation != self._looked_at:
            self._looked_at = self.sink.generation
            if not any(map(self.sink.takes, self._parked)):
                return
            self.stats.park_replays += 1
        else:
            return
        await self._reset()  # marks come back from the store: a parked topic's stayed put

    async def _settle_unsure(self) -> None:
        """Count the volume of a save that failed without saying whether it was applied
        iff the store holds its token; either way the batch is released (its epoch may be
        proven). Raises :class:`BusUnavailable` (and stays unsure) while the store is down."""
        assert self._unsure is not None and self.meter is not None
        token, volume = self._unsure
        landed = await self.store.landed(self.shard, token)
        self._unsure = None
        if landed:
            self.meter.apply(volume)
            self.stats.unsure_landed += 1
        self.meter.release(volume)

    async def step(self) -> int:
        """One consume/deliver/persist/ack round; returns frames delivered."""
        if self._unsure is not None:
            await self._settle_unsure()
        if (self._parked or self.behind_park) and not self.bus.owns(self.shard):
            # the shard went to another relayer, which reads the parked records from the
            # bus commit: nothing is parked here any more (the gauges said so until the
            # shard came back). Reset below; a shard that comes back resets again
            self._hold.clear()
            self._seq = None
        elif self._parked:
            await self._unpark()
        if self._seq is None:
            await self._reset()
        seq = self._seq
        assert seq is not None
        now = self._clock()
        quiet = self._quiet(seq)
        wait = self._idle_wait if quiet else self.config.poll_timeout
        deadline = seq.next_deadline()
        if deadline is not None:
            wait = max(0.0, min(wait, deadline - now))
        batch = await self.bus.consume(
            self.shard, self.config.group, max_records=self.config.batch, block=wait
        )
        # an empty quiet read doubles the next one's wait; anything else starts over
        self._idle_wait = (self.config.poll_timeout if batch or not quiet else
                           min(self._idle_wait * 2,
                               max(self.config.idle_poll_timeout, self.config.poll_timeout)))
        decoded: list[tuple[Delivery, Frame | None]] = []
        for d in batch:
            try:
                decoded.append((d, decode(d.data)))
            except FrameRejected as exc:
                self.stats.corrupt += 1
                log.error("corrupt bus record skipped",
                          extra={"shard": self.shard, "offset": d.offset, "reason": str(exc)})
                decoded.append((d, None))
        cold = seq.missing(f.topic for _, f in decoded if f is not None)
        if cold:  # before anything is in flight: a failing load just retries the batch
            seq.prime(await self.store.load_topics(self.shard, cold), cold)
            self.stats.mark_loads += len(cold)
        now = self._clock()
        out: list[Frame] = []
        fence = self.fence
        self._inflight.extend(batch)
        if fence is not None:
            fence.consumed_many(f for _, f in decoded)
        gaps: dict[Topic, SeqRanges] = {}
        self._collect(seq.offer_batch([(f, d) for d, f in decoded if f is not None], now, out),
                      out, gaps)
        agreed: set[tuple[Topic, int, int]] = set()
        hold: HoldGap | None = fence.holds if fence is not None else None
        if not self.bus.caught_up(self.shard, self.config.group):
            # the log had more at the reset than was read since: a missing seq may be a
            # frame acknowledged before it and still ahead (decision 0023)
            hold = self._hold_catching_up
        elif fence is not None and self.agreement is not None:
            deadline = seq.next_deadline()
            due = ([s for s in seq.due(now) if not fence.holds(*s)]
                   if deadline is not None and deadline <= now else [])
            if due:  # skipped only once the cluster agreed (no await before the poll)
                agreed = await fence.agree(self.shard, due, self.agreement.reserve)
            hold = lambda topic, lo, hi: (topic, lo, hi) not in agreed  # noqa: E731
        polled = seq.poll(now, hold)
        self._collect(polled, out, gaps, agreed)
        pin: set[object] = set()
        park = bool(self.config.park_max_records) and not self._hold
        passed: list[Frame] = []
        if out and self._parked and park:
            # a parked topic's later frames wait behind its first (order per topic)
            parked = self._parked
            passed = [f for f in out if f.topic in parked]
            if passed:
                out = [f for f in out if f.topic not in parked]
        if out:
            held = await self.sink.deliver(self.shard, out, park=park)
            if held:  # no subscriber took these topics: parked
                ids = set(map(id, held))
                out = [f for f in out if id(f) not in ids]
                passed += held
            self.stats.delivered += len(out)
            if self._on_delivered is not None and out:
                self._on_delivered(self.shard, out)
        if passed:
            self._park(passed, decoded, polled, pin)
        # counted in the epoch it was delivered in; that epoch is not proven before the
        # volume is written and applied (or dropped with a failed write)
        meter = self.meter
        volume = meter.aggregate(out) if meter is not None and out else None
        if volume and meter is not None:
            meter.hold(volume)
        token = os.urandom(8) if volume else b""
        done = self._done(seq, pin)
        # on a bus whose store can (Redis), the acknowledgement rides in the same write
        ack = (self.bus.ack_in_store(self.shard, self.config.group, done, self.store)
               if done else None)
        try:
            # marks, the metered volume and the gaps skipped in one write: a crash keeps
            # all or none (a retry in a skipped gap is refused after a restart too)
            marks = seq.take_dirty()
            if self._parked:  # a parked topic's stays at its first parked frame
                parked = self._parked
                marks = {t: m for t, m in marks.items() if t not in parked}
            await self.store.save(self.shard, marks, volume, token=token, gaps=gaps, ack=ack)
            if volume and meter is not None:
                meter.apply(volume)
        except BusUnavailable:
            if volume and meter is not None:
                # the write may have landed before the connection closed: still held,
                # counted (or dropped) once the store says (_settle_unsure)
                self._unsure, volume = (token, volume), None
            raise
        finally:
            if volume and meter is not None:
                meter.release(volume)
        # marks are durable now: safe to forget cold ones (a parked topic's in-memory
        # mark is ahead of its durable one: kept, or its next frame would look like a gap)
        self.stats.evictions += seq.evict(self._parked)
        if self._hold and out:
            self._hold.difference_update(f.topic for f in out)
        if ack is not None:
            await self.bus.acked(self.shard, ack)
        elif done:
            await self.bus.ack(self.shard, self.config.group, done)
        return len(out)

    def _quiet(self, seq: Sequencer) -> bool:
        """Nothing but new records to wait for: no frame held or in flight, nothing
        parked or held for parking, no unsure save, the log read up to its end."""
        return (not seq.buffered and not self._inflight and not self._parked
                and not self._hold and self._unsure is None
                and self.bus.caught_up(self.shard, self.config.group))

    def _done(self, seq: Sequencer, pin: Container[object]) -> list[Delivery]:
        """Take the in-flight prefix this step acknowledges once its marks are saved.
        Taken before the save, which may carry the acknowledgement; a failed save resets
        the worker, which forgets the in-flight records anyway."""
        done: list[Delivery] = []
        if pin or self.behind_park:
            # acknowledged up to the first parked record; the rest waits for the replay
            while self._inflight and not self.behind_park and self._inflight[0].offset not in pin \
                    and not seq.is_held(self._inflight[0].offset):
                done.append(self._inflight.popleft())
            self.behind_park += len(self._inflight)
            self._inflight.clear()
        else:
            if not seq.buffered:  # nothing held out of order: the whole prefix is done
                done.extend(self._inflight)
                self._inflight.clear()
            while self._inflight and not seq.is_held(self._inflight[0].offset):
                done.append(self._inflight.popleft())
        return done

    def _hold_catching_up(self, _topic: Topic, _lo: int, _hi: int) -> bool:
        self.stats.held_catching_up += 1
        return True

    def _park(self, passed: Sequence[Frame], decoded: Iterable[tuple[Delivery, Frame | None]],
              polled: Iterable[Deliver | Duplicate | Gap], pin: set[object]) -> None:
        """Park the topics of ``passed`` (frames nobody took, in order per topic) and put
        the bus offsets of the records carrying them in ``pin`` (the first in-flight
        record when one is not known: nothing is acknowledged then)."""
        parked = self._parked
        for f in passed:
            parked.setdefault(f.topic, f.seq)
        self.stats.parked += len(passed)
        # frames released from the reorder buffer by offer_batch come without their
        # record: look in this batch and in poll's events, else pin the whole prefix
        where = {id(f): d.offset for d, f in decoded if f is not None}
        where.update((id(ev.frame), ev.delivery.offset) for ev in polled
                     if isinstance(ev, Deliver))
        for f in passed:
            offset = where.get(id(f))
            if offset is None:
                if self._inflight:
                    pin.add(self._inflight[0].offset)
                return
            pin.add(offset)

    def _collect(self, events: Sequence[Deliver | Duplicate | Gap], out: list[Frame],
                 gaps: dict[Topic, SeqRanges],
                 agreed: Container[tuple[Topic, int, int]] = ()) -> None:
        for ev in events:
            if isinstance(ev, Deliver):
                out.append(ev.frame)
            elif isinstance(ev, Duplicate):
                self.stats.duplicates += 1
                f = ev.frame
                if self.fence is not None and self.fence.dropped_in_gap(f.topic, f.seq):
                    log.error("frame of a skipped gap reached the worker after the skip: "
                              "dropped (admitted where the skip was not visible)", extra={
                                  "shard": self.shard, "customer": f.customer,
                                  "channel": f.channel, "seq": f.seq})
            else:
                self.stats.gaps += 1
                log.warning("sequence gap skipped", extra={
                    "shard": self.shard, "customer": ev.topic[0], "channel": ev.topic[1],
                    "expected": ev.expected, "resumed_at": ev.resumed_at})
                gaps.setdefault(ev.topic, []).append((ev.expected, ev.resumed_at))
                if self.fence is not None:
                    self.fence.record_gap(ev.topic, ev.expected, ev.resumed_at, agreed=(
                        ev.agreed or (ev.topic, ev.expected, ev.resumed_at) in agreed))
                if self._on_gap is not None:
                    self._on_gap(ev)

    async def run(self) -> None:
        """Loop until :meth:`stop`; failures reset to durable state and back off."""
        backoff = 0.05
        while not self._stopping:
            try:
                await self.step()
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a worker must never die: reset to durable state
                if self._stopping:
                    break
                self.stats.resets += 1
                if isinstance(exc, PqcnetError | OSError):
                    log.warning("shard worker reset",
                                extra={"shard": self.shard, "error": str(exc)})
                else:
                    log.exception("shard worker reset after a bug", extra={"shard": self.shard})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.config.max_backoff)
                with contextlib.suppress(PqcnetError, OSError):
                    await self._reset()

    def stop(self) -> None:
        """Ask :meth:`run` to return after the current step."""
        self._stopping = True
