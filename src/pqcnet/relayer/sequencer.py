"""Per-shard ordering and duplicate suppression, as a sans-IO state machine.

The bus gives at-least-once, roughly-ordered records; subscribers must see each
(customer, channel) topic exactly once and in ``seq`` order. :class:`Sequencer`
does that with three pieces of state per topic:

* ``next_seq`` — the next sequence number to deliver (the dedup high-water mark;
  persisted by the worker, so duplicates are suppressed across restarts);
* a bounded reorder buffer of frames that arrived ahead of ``next_seq``;
* the time the topic started waiting for a missing seq.

Marks are a bounded LRU of hot topics (``max_topics``): a relayer may see millions of
(customer, channel) topics over its life and must not hold a mark for each in memory.
The durable marks store is the source of truth; the worker asks :meth:`missing` which
topics of a batch are not cached, loads just those (:meth:`prime`), and calls
:meth:`evict` after it persisted the step's marks. A topic is never evicted while it
has frames in the reorder buffer or an unsaved mark, so eviction never loses state.

It never reads a clock or does I/O: the worker feeds ``offer(frame, delivery, now)``
and ``poll(now)`` and acts on the returned events. A gap older than
``gap_timeout`` is reported and skipped (delivery resumes at the lowest buffered
seq); a late arrival of a skipped seq is then a duplicate. When the reorder buffer
is full, the topic waiting longest is skipped early, so memory stays bounded — in a
cluster that agrees on skips (``defer_forced``) it is made due instead, so the next
:meth:`poll` skips it once agreed, and only past twice the bound is a skip forced.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pqcnet.relayer.bus.base import Delivery, Offset
from pqcnet.relayer.frame import Frame, Topic, slot_setters

#: frames one shard may hold out of order; bounds memory per shard worker
MAX_REORDER = 4096
#: seconds a topic waits for a missing seq before reporting a gap and skipping it
GAP_TIMEOUT = 5.0
#: topics whose next_seq stays cached per shard worker. Bounds the memory a relayer with
#: many (customer, channel) topics spends on marks; the cost of a too-small value is one
#: marks-store read per batch for each cold topic (never a wrong dedup decision). The
#: cache may exceed it within one step by the batch's new topics plus buffered ones.
#: 8,192 per worker is 262,144 per relayer on the default 32 shards: room for 100k active
#: topics (≈ 3.1k a shard) while a relayer that has seen 1M topics does not keep them
#: all (65,536 per worker meant 2M, ≈ 150 B each).
MAX_TOPICS = 8192
#: seconds before a gap skip that was held (see :meth:`Sequencer.poll`) is reconsidered
HOLD_RECHECK = 0.1

#: ``(topic, lo, hi) -> True`` to postpone skipping seqs ``lo .. hi-1`` (a frame in that
#: range was acknowledged and has not reached the worker yet)
HoldGap = Callable[[Topic, int, int], bool]


@dataclass(frozen=True, slots=True)
class Deliver:
    """Deliver ``frame`` now (it is the next in its topic)."""

    frame: Frame
    #: the bus record it came from
    delivery: Delivery


@dataclass(frozen=True, slots=True)
class Duplicate:
    """``frame`` was already delivered (or skipped); suppress it."""

    frame: Frame
    delivery: Delivery


@dataclass(frozen=True, slots=True)
class Gap:
    """Seqs ``expected .. resumed_at-1`` of ``topic`` never arrived and were skipped."""

    topic: Topic
    expected: int
    resumed_at: int
    #: the cluster agreed on this skip before it was made (decision 0020): no frame of
    #: it was acknowledged anywhere, so one reaching the worker later was refused
    agreed: bool = False


Event = Deliver | Duplicate | Gap
_DELIVER_SET = slot_setters(Deliver, "frame", "delivery")


def _deliver(frame: Frame, delivery: Delivery,
             _set: tuple[Callable[[Any, Any], None], ...] = _DELIVER_SET) -> Deliver:
    """``Deliver(frame, delivery)``, cheaper (see :func:`pqcnet.relayer.frame.slot_setters`)."""
    ev: Deliver = object.__new__(Deliver)
    _set[0](ev, frame)
    _set[1](ev, delivery)
    return ev


class Sequencer:
    """Ordering + dedup for one shard."""

    def __init__(
        self,
        next_seq: Mapping[Topic, int] | None = None,
        *,
        max_reorder: int = MAX_REORDER,
        gap_timeout: float = GAP_TIMEOUT,
        max_topics: int = MAX_TOPICS,
        defer_forced: bool = False,
    ) -> None:
        if max_reorder < 1:
            raise ValueError("max_reorder must be >= 1")
        if max_topics < 1:
            raise ValueError("max_topics must be >= 1")
        #: cached marks, least recently used first
        self._next: OrderedDict[Topic, int] = OrderedDict(next_seq or {})
        self._buf: dict[Topic, dict[int, tuple[Frame, Delivery]]] = {}
        self._waiting_since: dict[Topic, float] = {}
        self._held: set[Offset] = set()
        self._dirty: dict[Topic, int] = {}
        #: ranges skipped by agreement before this sequencer began (:meth:`preskip`)
        self._skips: dict[Topic, tuple[int, int]] = {}
        self.max_reorder = max_reorder
        self.gap_timeout = gap_timeout
        self.max_topics = max_topics
        #: a full reorder buffer makes the oldest gap due instead of skipping it at once,
        #: so the skip can be agreed first (decision 0020); the buffer may then hold up
        #: to twice ``max_reorder`` before a skip is forced
        self.defer_forced = defer_forced
        #: topics dropped from the cache so far (exported as a stat)
        self.evictions = 0

    # ------------------------------------------------------------------ queries
    def next_seq(self, topic: Topic) -> int:
        """Next seq that will be delivered for ``topic`` (1 for a new topic)."""
        return self._next.get(topic, 1)

    @property
    def cached_topics(self) -> int:
        """Topics whose mark is currently in memory."""
        return len(self._next)

    def peek(self, topic: Topic) -> int | None:
        """The cached next seq of ``topic`` (None if not cached); does not touch the LRU."""
        return self._next.get(topic)

    def missing(self, topics: Iterable[Topic]) -> list[Topic]:
        """The distinct ``topics`` whose mark is not cached (load them, then :meth:`prime`)."""
        return [t for t in dict.fromkeys(topics) if t not in self._next]

    def prime(self, marks: Mapping[Topic, int], topics: Iterable[Topic] = ()) -> None:
        """Cache durable ``marks``; each of ``topics`` absent from them is new (next 1).

        A topic already cached keeps its in-memory mark (it may be newer than the store).
        """
        for topic in topics:
            self._next.setdefault(topic, marks.get(topic, 1))
        for topic, nxt in marks.items():
            self._next.setdefault(topic, nxt)

    def evict(self, keep: Container[Topic] = ()) -> int:
        """Drop least recently used marks beyond ``max_topics``; returns how many.

        Call after the dirty marks were persisted: a topic with an unsaved mark or
        frames in the reorder buffer is kept (it still needs its in-memory state), and
        so is every topic in ``keep``.
        """
        excess = len(self._next) - self.max_topics
        if excess <= 0:
            return 0
        drop: list[Topic] = []
        for topic in self._next:
            if len(drop) >= excess:
                break
            if topic not in self._buf and topic not in self._dirty and topic not in keep:
                drop.append(topic)
        for topic in drop:
            del self._next[topic]
        self.evictions += len(drop)
        return len(drop)

    def is_held(self, offset: Offset) -> bool:
        """True while the record at ``offset`` sits in the reorder buffer (do not ack it)."""
        return offset in self._held

    @property
    def buffered(self) -> int:
        """Frames currently held out of order."""
        return len(self._held)

    def next_deadline(self) -> float | None:
        """Earliest time :meth:`poll` has work (a gap timeout), or None."""
        if not self._waiting_since:
            return None
        return min(self._waiting_since.values()) + self.gap_timeout

    def due(self, now: float) -> list[tuple[Topic, int, int]]:
        """The skips :meth:`poll` at ``now`` would make with nothing held, as
        ``(topic, lo, hi)``: seqs ``lo .. hi-1`` given up (to agree on them first)."""
        out: list[tuple[Topic, int, int]] = []
        for topic, since in self._waiting_since.items():
            buf = self._buf.get(topic)
            if buf and now - since >= self.gap_timeout:
                out.append((topic, self._next.get(topic, 1), min(buf)))
        return out

    def preskip(self, spans: Mapping[Topic, tuple[int, int]]) -> None:
        """Seqs ``lo .. hi-1`` of each topic were given up by agreement before this
        sequencer began (a relayer reserved the skip and stopped before its marks moved
        past it): a frame of such a range is a refused frame, suppressed, and the topic
        jumps to ``hi`` when it reaches the range."""
        self._skips.update(spans)

    def take_dirty(self) -> dict[Topic, int]:
        """``next_seq`` values changed since the last call (to persist)."""
        dirty, self._dirty = self._dirty, {}
        return dirty

    # ------------------------------------------------------------------ inputs
    def offer(self, frame: Frame, delivery: Delivery, now: float) -> list[Event]:
        """Feed one record; returns what to deliver / suppress / report.

        The frame's topic must have been :meth:`prime`-d if it has a durable mark
        (an uncached topic counts as new, next seq 1).
        """
        topic = frame.topic
        if self._skips and topic in self._skips:
            lo, hi = self._skips[topic]
            pre = self._enter_skip(topic)
            if topic in self._skips and lo <= frame.seq < hi:
                return [*pre, Duplicate(frame, delivery)]
            if pre:
                return pre + self.offer(frame, delivery, now)
        expected = self._next.get(topic, 1)
        if topic in self._next:
            self._next.move_to_end(topic)
        buf = self._buf.get(topic)
        if frame.seq < expected or (buf is not None and frame.seq in buf):
            return [Duplicate(frame, delivery)]
        if frame.seq == expected:
            out: list[Event] = [_deliver(frame, delivery)]
            self._advance(topic, expected + 1, out)
            return out
        out = []
        if len(self._held) >= self.max_reorder:
            oldest = min(self._waiting_since, key=self._waiting_since.__getitem__)
            if self.defer_forced and len(self._held) < 2 * self.max_reorder:
                # due now: the next poll skips it once the cluster agreed
                self._waiting_since[oldest] = min(self._waiting_since[oldest],
                                                  now - self.gap_timeout)
            else:
                out.extend(self._skip(oldest, now))
                if topic == oldest:  # the skip moved next_seq: re-evaluate this frame
                    return out + self.offer(frame, delivery, now)
        self._buf.setdefault(topic, {})[frame.seq] = (frame, delivery)
        self._held.add(delivery.offset)
        self._waiting_since.setdefault(topic, now)
        return out

    def offer_batch(self, records: Iterable[tuple[Frame, Delivery]], now: float,
                    delivered: list[Frame]) -> list[Event]:
        """:meth:`offer` of each record in turn: the frames to deliver are appended to
        ``delivered`` (in order), the other events (duplicates, gaps) returned.

        The common case — a cached topic with nothing buffered receives its next seq —
        is decided inline, without the per-frame event objects :meth:`offer` builds."""
        other: list[Event] = []
        marks, bufs, dirty, waiting = self._next, self._buf, self._dirty, self._waiting_since
        skips = self._skips
        for frame, delivery in records:
            topic = frame.topic
            expected = marks.get(topic)
            if expected is not None and frame.seq == expected and topic not in bufs \
                    and topic not in skips:
                marks[topic] = dirty[topic] = expected + 1
                marks.move_to_end(topic)
                if waiting:
                    waiting.pop(topic, None)
                delivered.append(frame)
                continue
            for ev in self.offer(frame, delivery, now):
                if isinstance(ev, Deliver):
                    delivered.append(ev.frame)
                else:
                    other.append(ev)
        return other

    def poll(self, now: float, hold: HoldGap | None = None) -> list[Event]:
        """Skip gaps that have waited ``gap_timeout``; returns the resulting events.

        ``hold(topic, lo, hi)`` returning True postpones that skip by
        :data:`HOLD_RECHECK` seconds: an acknowledged frame of the range is on its way.
        """
        out: list[Event] = []
        for topic, since in list(self._waiting_since.items()):
            if now - since < self.gap_timeout:
                continue
            buf = self._buf.get(topic)
            if hold is not None and buf and hold(topic, self._next.get(topic, 1), min(buf)):
                self._waiting_since[topic] = now - self.gap_timeout + HOLD_RECHECK
                continue
            out.extend(self._skip(topic, now))
        return out

    # ------------------------------------------------------------------ internals
    def _enter_skip(self, topic: Topic) -> list[Event]:
        """Apply ``topic``'s agreed skip if its next seq is in it (forgotten once passed)."""
        lo, hi = self._skips[topic]
        nxt = self._next.get(topic, 1)
        if nxt >= hi:
            del self._skips[topic]
        elif nxt >= lo:
            out: list[Event] = []
            self._advance(topic, nxt, out)
            return out
        return []

    def _advance(self, topic: Topic, nxt: int, out: list[Event]) -> None:
        buf = self._buf.get(topic)
        while True:
            while buf and nxt in buf:
                frame, delivery = buf.pop(nxt)
                self._held.discard(delivery.offset)
                out.append(_deliver(frame, delivery))
                nxt += 1
            skip = self._skips.get(topic) if self._skips else None
            if skip is None or not skip[0] <= nxt < skip[1]:
                break
            del self._skips[topic]  # an agreed skip reached: its frames were refused
            out.append(Gap(topic, nxt, skip[1], agreed=True))
            for s in [s for s in buf or () if s < skip[1]]:
                assert buf is not None
                frame, delivery = buf.pop(s)
                self._held.discard(delivery.offset)
                out.append(Duplicate(frame, delivery))
            nxt = skip[1]
        self._next[topic] = nxt
        self._next.move_to_end(topic)
        self._dirty[topic] = nxt
        if not buf:
            self._buf.pop(topic, None)
            self._waiting_since.pop(topic, None)

    def _skip(self, topic: Topic, now: float) -> Iterable[Event]:
        buf = self._buf.get(topic)
        if not buf:
            self._waiting_since.pop(topic, None)
            return []
        lowest = min(buf)
        out: list[Event] = [Gap(topic, self._next.get(topic, 1), lowest)]
        self._waiting_since.pop(topic, None)
        self._advance(topic, lowest, out)
        if topic in self._buf:  # frames beyond a further gap: that gap's clock starts now
            self._waiting_since[topic] = now
        return out
