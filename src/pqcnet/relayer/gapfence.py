"""``GapFence``: late frames are refused before they are acknowledged, never discarded after.

A shard worker skips a missing seq after ``gap_timeout`` (delivery must not stall on a
publisher that lost a frame). A frame of that seq arriving later can no longer be
delivered in order. Before this fence the ingress acknowledged it and the worker then
dropped it as a duplicate: an acknowledged frame silently lost. The rule now
(docs/decisions/0012-late-frames.md) is: **refuse it before the ack** with
:class:`~pqcnet.relayer.errors.LateFrame`, naming the seq delivery resumed at.

One fence is shared by the ingress and the shard workers of one relayer process:

* ``admit`` (ingress, before publishing): a frame whose seq is below the topic's next
  seq is refused if it falls in a gap this relayer skipped, or if it is not a retry
  (a fresh frame below the delivery point cannot be delivered; a *retry* below it is a
  resend of a frame already delivered, accepted and suppressed as before). Admitted
  seqs are registered as in flight.
* ``consumed`` (worker, when it reads the frame from the bus) / ``release`` (ingress,
  publish failed) end the in-flight registration.
* ``holds`` (worker, via ``Sequencer.poll``): a gap whose range contains an admitted,
  not yet consumed seq is not skipped yet — that frame was acknowledged and is on its
  way (on the bus or in the overflow queue). This closes the race between the check in
  ``admit`` and a skip that happens before the worker reads the frame.
* ``record_gap`` (worker): remember skipped ranges, so retries inside them are refused.
  The worker also writes them to the marks store in the same write as the marks that
  move past them; a *retry* below the delivery point that no remembered range holds is
  checked against the stored ranges (``gaps`` lookup) before it is admitted, so after a
  restart, or at a relayer of the cluster that does not own the shard (a failed-over
  publisher's retry), it is refused too instead of acknowledged and suppressed.

Everything is synchronous: a check and its registration happen with no ``await`` in
between, and so do the worker's skip decision and its ``record_gap``.

Bounds: skipped ranges per topic (:data:`MAX_RANGES_PER_TOPIC`) and topics remembered
(:data:`MAX_GAP_TOPICS`, oldest forgotten first); in-flight seqs
(:data:`MAX_INFLIGHT_SEQS`; beyond it admissions are not registered and the gap race is
open for those frames — counted in ``untracked``). The in-flight registry is in memory
and per process: frames still in the overflow queue are registered from the queue when
the workers start and when a shard moves here (a Redis lease, a Kafka partition:
``restore``). Another relayer's admissions hold this one's skips through the shared
store (decision 0020, :mod:`pqcnet.relayer.agreement`): the ingress ``confirm``-s frames
it appended for a shard it does not own, and the worker reserves a skip there first
(``agree``); while a reservation is pending, local admissions inside its range are
refused.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from pqcnet.relayer.errors import LateFrame, RelayerError
from pqcnet.relayer.frame import Frame, Topic

#: skipped seq ranges remembered per topic (the most recent ones)
MAX_RANGES_PER_TOPIC = 16
#: topics whose skipped ranges are remembered; bounds memory on many-topic relayers
MAX_GAP_TOPICS = 65_536
#: admitted-but-not-consumed seqs tracked; bounds memory during a long bus outage
MAX_INFLIGHT_SEQS = 1_000_000

#: skipped seq ranges of one topic, ``[lo, hi)`` each, oldest first
SeqRanges = list[tuple[int, int]]
#: ``(shard, topics) -> next seq per topic`` as far as this relayer knows (absent: new)
MarkLookup = Callable[[int, Sequence[Topic]], Awaitable[Mapping[Topic, int]]]
#: ``(shard, topics) -> recorded skipped ranges per topic`` (the marks store's)
GapLookup = Callable[[int, Sequence[Topic]], Awaitable[Mapping[Topic, SeqRanges]]]
#: ``(topic, lo, hi)``: seqs ``lo .. hi-1`` of ``topic``
Span = tuple[Topic, int, int]
#: ``{shard: [(topic, seq)]} -> {shard: [refused?]}`` (the shared store's confirm)
Confirm = Callable[[Mapping[int, Sequence[tuple[Topic, int]]]],
                   Awaitable[Mapping[int, list[bool]]]]
#: ``(shard, spans) -> [reserved?]`` (the shared store's reserve)
Reserve = Callable[[int, Sequence[Span]], Awaitable[list[bool]]]


@dataclass(slots=True)
class FenceStats:
    """Counters exported as metrics."""

    #: frames refused with LateFrame
    refused: int = 0
    #: gap skips postponed because an admitted frame of the range was still in flight
    held: int = 0
    #: admissions not tracked because :data:`MAX_INFLIGHT_SEQS` was reached
    untracked: int = 0
    #: retries below the delivery point checked against the store's recorded gaps
    gap_reads: int = 0
    #: frames of a gap skipped here that reached the worker afterwards (admitted where
    #: the skip could not be seen: another relayer process, or a skip forced by a full
    #: reorder buffer) and were dropped as below the delivery point — each one very
    #: likely an acknowledged frame never delivered, so it is counted and logged
    late_on_bus: int = 0
    #: frames of the overflow queue registered in flight when the workers started
    #: (acknowledged before a restart, not on the bus yet)
    restored: int = 0
    #: frames appended here for a shard owned elsewhere, recorded in the shared store
    #: as acknowledged before their ack (decision 0020)
    marked: int = 0
    #: gap skips reserved in the shared store before they were made
    reserved: int = 0
    #: gap skips held because a frame of the range was acknowledged by another relayer
    held_elsewhere: int = 0
    #: frames of an agreed skip that reached the worker: refused at their ingress after
    #: their append (not acknowledged), dropped — expected, unlike ``late_on_bus``
    refused_on_bus: int = 0


class GapFence:
    """Late-frame refusal and the in-flight registry shared by ingress and workers."""

    def __init__(self, marks: MarkLookup | None = None, gaps: GapLookup | None = None, *,
                 owns: Callable[[int], bool] | None = None,
                 assigned: Callable[[int], bool] | None = None,
                 max_inflight: int = MAX_INFLIGHT_SEQS,
                 confirm: Confirm | None = None) -> None:
        self._marks = marks
        #: the cluster's shared store (decision 0020); None: one relayer, or no store
        self.confirmer = confirm
        self._stored_gaps = gaps
        #: whether a worker of this process takes a shard's records now (a cluster's
        #: lease or group assignment); None: the shards of attached workers
        self._owns = owns
        #: whether a shard stays this process's until an ownership change is reported
        #: (``owns`` without a Redis lease's time bound); None: ``owns``
        self._assigned = assigned
        self._cached: dict[int, Callable[[Topic], int | None]] = {}
        self._gaps: OrderedDict[Topic, list[tuple[int, int]]] = OrderedDict()
        #: skips agreed through the shared store (their frames were refused, not lost)
        self._agreed: OrderedDict[Span, None] = OrderedDict()
        #: ranges being reserved now: local admissions inside them are refused
        self._pending: dict[Topic, list[tuple[int, int]]] = {}
        #: topic -> admitted seq -> how many admissions of it are in flight
        self._inflight: dict[Topic, dict[int, int]] = {}
        self._n_inflight = 0
        #: shard of each topic in ``_inflight``, and how many such topics per shard
        self._topic_shard: dict[Topic, int] = {}
        self._shard_topics: dict[int, int] = {}
        self.max_inflight = max_inflight
        self.stats = FenceStats()

    # ------------------------------------------------------------------ wiring
    def attach_worker(self, shard: int, cached_mark: Callable[[Topic], int | None]) -> None:
        """Let the fence read ``shard``'s in-memory marks (newer than the store)."""
        self._cached[shard] = cached_mark

    def owned_here(self, shard: int) -> bool:
        """A worker of this process takes ``shard``'s records now. Only then is an
        admission registered in flight: a frame for a shard another relayer owns is
        never read (``consumed``) here, and would stay registered for good."""
        return self._owns(shard) if self._owns is not None else shard in self._cached

    def tracked_here(self, shard: int) -> bool:
        """Admissions of ``shard`` are registered in flight: a worker of this process
        reads it now, or will once the lease round running late renews it. A Redis
        lease whose validity ran out before the next round is not :meth:`owned_here`
        for that moment, but no loss was reported; dropping and not registering its
        admissions then opened the gap race for acknowledged frames once the round
        renewed the lease (a real loss is reported: :meth:`forget_shards`)."""
        return self._assigned(shard) if self._assigned is not None else self.owned_here(shard)

    def _local_marks(self, shard: int, owned: bool) -> Callable[[Topic], int | None] | None:
        """The in-memory marks of ``shard``'s worker while it owns the shard (after the
        shard moved away they are stale until the worker resets: the store is read)."""
        return self._cached.get(shard) if owned else None

    # ------------------------------------------------------------------ ingress side
    async def admit(self, shard: int,
                    frames: Sequence[tuple[Frame, bool]]) -> list[LateFrame | None]:
        """Check ``(frame, retry)`` pairs of one shard; register the admitted ones.

        Returns one entry per frame: ``None`` (admitted, now in flight) or the
        :class:`LateFrame` to answer with. A marks read that fails raises its error.
        """
        got = (await self.admit_many({shard: frames}))[shard]
        if isinstance(got, RelayerError):
            raise got
        return got

    async def admit_many(self, by_shard: Mapping[int, Sequence[tuple[Frame, bool]]], *,
                         retries: bool = True,
                         ) -> dict[int, list[LateFrame | None] | RelayerError]:
        """:meth:`admit` for the frames of several shards (one ingress request): the
        marks store is read for the cold topics of all of them concurrently, then every
        frame is checked and registered with no ``await`` in between. A shard whose
        marks read failed gets that error instead of a list (its frames not admitted).
        ``retries=False`` (the caller knows no frame is a resend) skips the search for
        retries that need the stored gaps."""
        # whether a worker here owns each shard now decides whose marks are read; whether
        # admissions are registered in flight is asked below, after the awaits
        # (ownership may have moved meanwhile): ``tracked_here``, whose worker's cached
        # marks then also count (the higher of them and the store's)
        owned = {shard: self.owned_here(shard) for shard in by_shard}
        # a local worker's cached mark is at least as new as the store: read the store
        # only for topics it does not hold (cold topics, shards owned elsewhere)
        colds: dict[int, list[Topic]] = {}
        for shard, frames in by_shard.items():
            cached = self._local_marks(shard, owned[shard])
            cold = [t for t in dict.fromkeys(f.topic for f, _ in frames)
                    if cached is None or cached(t) is None]
            if cold and self._marks is not None:
                colds[shard] = cold
        stored: dict[int, Mapping[Topic, int] | BaseException] = {}
        if colds:
            marks = self._marks
            assert marks is not None
            got = await asyncio.gather(*(marks(s, t) for s, t in colds.items()),
                                       return_exceptions=True)
            stored = dict(zip(colds, got, strict=True))
        gaps = await self._recorded_gaps(by_shard, stored, owned) if retries else {}
        # no await from here on: the checks and the registrations are one step
        out: dict[int, list[LateFrame | None] | RelayerError] = {}
        for shard, frames in by_shard.items():
            known = stored.get(shard, {})
            recorded = gaps.get(shard, {})
            failed = next((e for e in (known, recorded) if isinstance(e, BaseException)), None)
            if failed is not None:
                if not isinstance(failed, RelayerError):
                    raise failed
                out[shard] = failed
                continue
            assert not isinstance(known, BaseException)
            assert not isinstance(recorded, BaseException)
            track = self.tracked_here(shard)
            if not track and shard in self._shard_topics:
                self.forget_shards((shard,))  # admitted while owned, moved away unread
            out[shard] = self._admit(shard, known, frames, recorded, track)
        return out

    @staticmethod
    def _next_seq(cached: Callable[[Topic], int | None] | None, stored: Mapping[Topic, int],
                  topic: Topic) -> int:
        nxt = stored.get(topic, 1)
        if cached is not None:
            mem = cached(topic)
            if mem is not None:
                nxt = max(nxt, mem)
        return nxt

    async def _recorded_gaps(
            self, by_shard: Mapping[int, Sequence[tuple[Frame, bool]]],
            stored: Mapping[int, Mapping[Topic, int] | BaseException],
            owned: Mapping[int, bool],
    ) -> dict[int, Mapping[Topic, SeqRanges] | BaseException]:
        """The store's skipped ranges for topics with a *retry* below the delivery point
        that no range in memory holds (rare: a resend after a failover or a restart).
        A failed read is that shard's error (retriable :class:`BusUnavailable`): a retry
        that cannot be checked is refused for now, never acknowledged and suppressed."""
        lookup = self._stored_gaps
        if lookup is None:
            return {}
        wanted: dict[int, list[Topic]] = {}
        for shard, frames in by_shard.items():
            known = stored.get(shard, {})
            if isinstance(known, BaseException):
                continue
            cached = self._local_marks(shard, owned[shard])
            for frame, retry in frames:
                if (retry and frame.seq < self._next_seq(cached, known, frame.topic)
                        and not self._in_gap(frame.topic, frame.seq)):
                    topics = wanted.setdefault(shard, [])
                    if frame.topic not in topics:
                        topics.append(frame.topic)
        if not wanted:
            return {}
        self.stats.gap_reads += sum(len(t) for t in wanted.values())
        got = await asyncio.gather(*(lookup(s, t) for s, t in wanted.items()),
                                   return_exceptions=True)
        return dict(zip(wanted, got, strict=True))

    def _in_gap(self, topic: Topic, seq: int) -> tuple[int, int] | None:
        for lo, hi in self._gaps.get(topic, ()):
            if lo <= seq < hi:
                return lo, hi
        return None

    def _admit(self, shard: int, stored: Mapping[Topic, int], frames: Sequence[tuple[Frame, bool]],
               recorded: Mapping[Topic, SeqRanges], track: bool) -> list[LateFrame | None]:
        out: list[LateFrame | None] = []
        nxts: dict[Topic, int] = {}
        cached = self._local_marks(shard, track)
        pending = self._pending
        for frame, retry in frames:
            topic = frame.topic
            nxt = nxts.get(topic)
            if nxt is None:  # once per topic: the marks do not move during this loop
                nxt = nxts[topic] = self._next_seq(cached, stored, topic)
            if frame.seq < nxt or (pending and topic in pending):
                err = self._check(frame, retry, nxt, recorded.get(topic, ()))
                if err is not None:
                    self.stats.refused += 1
                    out.append(err)
                    continue
            if track:  # admitted: registered as in flight
                self._track(shard, topic, frame.seq)
            out.append(None)
        return out

    def _track(self, shard: int, topic: Topic, seq: int) -> None:
        if self._n_inflight >= self.max_inflight:
            self.stats.untracked += 1
            return
        c = self._inflight.get(topic)
        if c is None:
            self._inflight[topic] = {seq: 1}
            self._topic_shard[topic] = shard
            self._shard_topics[shard] = self._shard_topics.get(shard, 0) + 1
        else:
            c[seq] = c.get(seq, 0) + 1
        self._n_inflight += 1

    def restore(self, shard: int, frames: Iterable[Frame]) -> int:
        """Register frames acknowledged before and still queued locally (the overflow
        queue) as in flight, unchecked — they were admitted then. Called when
        ``shard``'s worker starts, before it reads, and when ``shard`` moves here from
        another member: nothing of it is tracked at those points (the process is new;
        admissions of a shard not assigned here are not registered, and its
        registrations were dropped when it went), so nothing is counted twice. Returns
        how many were registered (past :data:`MAX_INFLIGHT_SEQS` they count as
        ``untracked`` instead)."""
        if not self.tracked_here(shard):
            return 0
        before = self._n_inflight
        for f in frames:
            self._track(shard, f.topic, f.seq)
        n = self._n_inflight - before
        self.stats.restored += n
        return n

    def _check(self, frame: Frame, retry: bool, nxt: int,
               recorded: Iterable[tuple[int, int]]) -> LateFrame | None:
        name = f"{frame.customer}/{frame.channel}"
        for lo, hi in self._pending.get(frame.topic, ()):
            if lo <= frame.seq < hi:
                return LateFrame(
                    f"seq {frame.seq} of {name} is late: delivery is giving up the gap "
                    f"{lo}..{hi - 1} now; publish it under a new seq")
        if frame.seq >= nxt:
            return None
        gap = self._in_gap(frame.topic, frame.seq) or next(
            ((lo, hi) for lo, hi in recorded if lo <= frame.seq < hi), None)
        if gap is not None:
            lo, hi = gap
            return LateFrame(
                f"seq {frame.seq} of {name} is late: the topic moved past it, delivery "
                f"resumed at seq {hi} after the gap {lo}..{hi - 1} was skipped; "
                "publish it under a new seq")
        if retry:
            return None  # a resend of a delivered frame: accepted, the worker suppresses it
        return LateFrame(
            f"seq {frame.seq} of {name} is late: the topic moved past it, next seq is "
            f"{nxt} (delivered or skipped); publish it under a new seq, or set retry "
            "if it is a resend")

    def release(self, topic: Topic, seq: int) -> None:
        """An admitted frame will not reach the bus (its publish failed)."""
        c = self._inflight.get(topic)
        if c is None:
            return
        n = c.get(seq, 0)
        if n <= 0:
            return
        self._n_inflight -= 1
        if n > 1:
            c[seq] = n - 1
            return
        del c[seq]
        if not c:
            del self._inflight[topic]
            shard = self._topic_shard.pop(topic)
            left = self._shard_topics[shard] - 1
            if left:
                self._shard_topics[shard] = left
            else:
                del self._shard_topics[shard]

    def forget_shards(self, shards: Iterable[int]) -> int:
        """Drop the in-flight registrations of ``shards`` (no longer owned here: their
        frames are read by another relayer, never ``consumed`` here). Called when the
        cluster's assignment changes, and by an admission that finds its shard gone.
        Returns how many were dropped."""
        gone = {s for s in shards if s in self._shard_topics}
        if not gone:
            return 0
        before = self._n_inflight
        for topic in [t for t, s in self._topic_shard.items() if s in gone]:
            self._n_inflight -= sum(self._inflight.pop(topic).values())
            del self._topic_shard[topic]
        for s in gone:
            del self._shard_topics[s]
        return before - self._n_inflight

    def release_many(self, frames: Iterable[Frame]) -> None:
        """:meth:`release` of each of ``frames``."""
        release = self.release
        for f in frames:
            release(f.topic, f.seq)

    # ------------------------------------------------------------------ worker side
    def consumed(self, topic: Topic, seq: int) -> None:
        """The worker read this frame from the bus: it is no longer in flight."""
        self.release(topic, seq)

    def consumed_many(self, frames: Iterable[Frame | None]) -> None:
        """:meth:`consumed` of each frame of a batch the worker read (None: corrupt)."""
        if not self._n_inflight:
            return  # nothing in flight (frames replayed after a restart, other publishers)
        release = self.release
        for f in frames:
            if f is not None:
                release(f.topic, f.seq)

    def holds(self, topic: Topic, lo: int, hi: int) -> bool:
        """True while an admitted seq in ``lo .. hi-1`` has not reached the worker."""
        c = self._inflight.get(topic)
        if not c:
            return False
        if any(lo <= s < hi for s in c):
            self.stats.held += 1
            return True
        return False

    def record_gap(self, topic: Topic, lo: int, hi: int, *, agreed: bool = False) -> None:
        """The worker skipped seqs ``lo .. hi-1`` of ``topic`` (``agreed``: reserved in
        the cluster's shared store first)."""
        ranges = self._gaps.pop(topic, [])
        ranges.append((lo, hi))
        self._gaps[topic] = ranges[-MAX_RANGES_PER_TOPIC:]
        while len(self._gaps) > MAX_GAP_TOPICS:
            self._gaps.popitem(last=False)
        if agreed:
            self._agreed[(topic, lo, hi)] = None
            while len(self._agreed) > MAX_GAP_TOPICS:
                self._agreed.popitem(last=False)

    def dropped_in_gap(self, topic: Topic, seq: int) -> bool:
        """The worker suppresses ``seq`` as below the delivery point: True (and counted)
        if it lies in a gap skipped here, i.e. it arrived after its slot was given up —
        as ``refused_on_bus`` if the skip was agreed (its ingress refused it after the
        append), else as ``late_on_bus`` (very likely acknowledged and lost)."""
        gap = self._in_gap(topic, seq)
        if gap is None:
            return False
        if (topic, *gap) in self._agreed:
            self.stats.refused_on_bus += 1
            return False
        self.stats.late_on_bus += 1
        return True

    async def agree(self, shard: int, spans: Sequence[Span], reserve: Reserve) -> set[Span]:
        """Reserve ``spans`` of ``shard`` for skips in the shared store; returns the
        reserved ones (skip them now, with no ``await`` in between). While the call is
        pending, local admissions inside the spans are refused. If it fails the spans
        are remembered as skipped here anyway (the script may have run: refusing a
        local retry inside one loses nothing) and the error is raised."""
        pending = self._pending
        for topic, lo, hi in spans:
            pending.setdefault(topic, []).append((lo, hi))
        try:
            got = await reserve(shard, spans)
        except BaseException:
            for topic, lo, hi in spans:
                self.record_gap(topic, lo, hi)
            raise
        finally:
            for topic, lo, hi in spans:
                ranges = pending.get(topic)
                if ranges is not None:
                    ranges.remove((lo, hi))
                    if not ranges:
                        del pending[topic]
        out = {span for span, ok in zip(spans, got, strict=True) if ok}
        self.stats.reserved += len(out)
        self.stats.held_elsewhere += len(spans) - len(out)
        return out

    async def confirm(self, by_shard: Mapping[int, Sequence[Frame]]
                      ) -> dict[int, list[LateFrame | None]]:
        """Record frames appended here for shards owned elsewhere as acknowledged, in
        the shared store, before their ack: a :class:`LateFrame` for each one whose
        seq the owner reserved or skipped. The store's error is raised (retriable:
        nothing is acknowledged, the publisher retries with the same seq)."""
        assert self.confirmer is not None
        got = await self.confirmer(
            {s: [(f.topic, f.seq) for f in fs] for s, fs in by_shard.items()})
        out: dict[int, list[LateFrame | None]] = {}
        for shard, frames in by_shard.items():
            verdicts: list[LateFrame | None] = []
            for frame, refused in zip(frames, got[shard], strict=True):
                if not refused:
                    self.stats.marked += 1
                    verdicts.append(None)
                    continue
                self.stats.refused += 1
                verdicts.append(LateFrame(
                    f"seq {frame.seq} of {frame.customer}/{frame.channel} is late: the "
                    "relayer that owns its shard gave up its gap; publish it under a new "
                    "seq"))
            out[shard] = verdicts
        return out

    @property
    def inflight(self) -> int:
        """Admitted seqs not yet consumed by a worker."""
        return self._n_inflight
