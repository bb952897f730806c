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

Everything is synchronous: a check and its registration happen with no ``await`` in
between, and so do the worker's skip decision and its ``record_gap``.

Bounds: skipped ranges per topic (:data:`MAX_RANGES_PER_TOPIC`) and topics remembered
(:data:`MAX_GAP_TOPICS`, oldest forgotten first); in-flight seqs
(:data:`MAX_INFLIGHT_SEQS`; beyond it admissions are not registered and the gap race is
open for those frames — counted in ``untracked``). The fence is in memory: after a
restart the skipped ranges are forgotten (a *retry* in an old gap is then accepted as a
duplicate) and frames already in the overflow queue are not in flight — both are
documented limits in the ADR.
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

#: ``(shard, topics) -> next seq per topic`` as far as this relayer knows (absent: new)
MarkLookup = Callable[[int, Sequence[Topic]], Awaitable[Mapping[Topic, int]]]


@dataclass(slots=True)
class FenceStats:
    """Counters exported as metrics."""

    #: frames refused with LateFrame
    refused: int = 0
    #: gap skips postponed because an admitted frame of the range was still in flight
    held: int = 0
    #: admissions not tracked because :data:`MAX_INFLIGHT_SEQS` was reached
    untracked: int = 0


class GapFence:
    """Late-frame refusal and the in-flight registry shared by ingress and workers."""

    def __init__(self, marks: MarkLookup | None = None, *,
                 max_inflight: int = MAX_INFLIGHT_SEQS) -> None:
        self._marks = marks
        self._cached: dict[int, Callable[[Topic], int | None]] = {}
        self._gaps: OrderedDict[Topic, list[tuple[int, int]]] = OrderedDict()
        #: topic -> admitted seq -> how many admissions of it are in flight
        self._inflight: dict[Topic, dict[int, int]] = {}
        self._n_inflight = 0
        self.max_inflight = max_inflight
        self.stats = FenceStats()

    # ------------------------------------------------------------------ wiring
    def attach_worker(self, shard: int, cached_mark: Callable[[Topic], int | None]) -> None:
        """Let the fence read ``shard``'s in-memory marks (newer than the store)."""
        self._cached[shard] = cached_mark

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

    async def admit_many(self, by_shard: Mapping[int, Sequence[tuple[Frame, bool]]]
                         ) -> dict[int, list[LateFrame | None] | RelayerError]:
        """:meth:`admit` for the frames of several shards (one ingress request): the
        marks store is read for the cold topics of all of them concurrently, then every
        frame is checked and registered with no ``await`` in between. A shard whose
        marks read failed gets that error instead of a list (its frames not admitted)."""
        # a local worker's cached mark is at least as new as the store: read the store
        # only for topics it does not hold (cold topics, shards owned elsewhere)
        colds: dict[int, list[Topic]] = {}
        for shard, frames in by_shard.items():
            cached = self._cached.get(shard)
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
        # no await from here on: the checks and the registrations are one step
        out: dict[int, list[LateFrame | None] | RelayerError] = {}
        for shard, frames in by_shard.items():
            known = stored.get(shard, {})
            if isinstance(known, BaseException):
                if not isinstance(known, RelayerError):
                    raise known
                out[shard] = known
                continue
            out[shard] = self._admit(self._cached.get(shard), known, frames)
        return out

    def _admit(self, cached: Callable[[Topic], int | None] | None, stored: Mapping[Topic, int],
               frames: Sequence[tuple[Frame, bool]]) -> list[LateFrame | None]:
        out: list[LateFrame | None] = []
        nxts: dict[Topic, int] = {}
        inflight = self._inflight
        for frame, retry in frames:
            topic = frame.topic
            nxt = nxts.get(topic)
            if nxt is None:  # once per topic: the marks do not move during this loop
                nxt = stored.get(topic, 1)
                if cached is not None:
                    mem = cached(topic)
                    if mem is not None:
                        nxt = max(nxt, mem)
                nxts[topic] = nxt
            if frame.seq < nxt:
                err = self._check(frame, retry, nxt)
                if err is not None:
                    self.stats.refused += 1
                    out.append(err)
                    continue
            # admitted: registered as in flight (inline: this runs for every frame)
            if self._n_inflight >= self.max_inflight:
                self.stats.untracked += 1
            else:
                c = inflight.get(topic)
                if c is None:
                    inflight[topic] = {frame.seq: 1}
                else:
                    c[frame.seq] = c.get(frame.seq, 0) + 1
                self._n_inflight += 1
            out.append(None)
        return out

    def _check(self, frame: Frame, retry: bool, nxt: int) -> LateFrame | None:
        if frame.seq >= nxt:
            return None
        name = f"{frame.customer}/{frame.channel}"
        for lo, hi in self._gaps.get(frame.topic, ()):
            if lo <= frame.seq < hi:
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

    def record_gap(self, topic: Topic, lo: int, hi: int) -> None:
        """The worker skipped seqs ``lo .. hi-1`` of ``topic``."""
        ranges = self._gaps.pop(topic, [])
        ranges.append((lo, hi))
        self._gaps[topic] = ranges[-MAX_RANGES_PER_TOPIC:]
        while len(self._gaps) > MAX_GAP_TOPICS:
            self._gaps.popitem(last=False)

    @property
    def inflight(self) -> int:
        """Admitted seqs not yet consumed by a worker."""
        return self._n_inflight
