"""Volume metering: every delivered frame counted per (customer, channel, QoS, epoch).

The shard workers call :meth:`VolumeMeter.record` with each delivered batch, so the
meter counts exactly what left the relayer (duplicates suppressed by the sequencer
never reach it). One meter feeds all three outputs, which is why they agree:

* Prometheus counters ``pqcnet_relayer_volume_bytes_total`` /
  ``pqcnet_relayer_volume_frames_total`` (labels customer, channel, qos). Label values
  are bounded: at most ``max_label_series`` (customer, channel) pairs get their own
  series; later ones are counted under ``customer="other", channel="other"`` (totals
  stay exact). When epochs are pruned (:meth:`VolumeMeter.forget_before`), the series of
  pairs with no traffic left in memory are removed, which frees their slots;
* the governance gRPC service (:meth:`query`);
* the signed per-epoch volume proofs (:meth:`records` of a closed epoch).

Epochs are ``floor(time / epoch_seconds)``. The worker computes a batch's delta
(:meth:`VolumeMeter.aggregate`), persists it in the same write as its dedup marks
(:mod:`pqcnet.relayer.seqstore`), and only then applies it here (:meth:`apply`). So a crash
either loses both the marks and the count (the batch is redelivered and counted
then) or keeps both — a restarted relayer loads its totals and counts nothing twice.

The worker aggregates a batch once it was delivered (its epoch is the delivery's), then
writes it; the write can straddle the end of the epoch, so the worker
:meth:`~VolumeMeter.hold` s the batch meanwhile and the node proves an epoch only once
it is :meth:`~VolumeMeter.settled` — otherwise the batch would land in an epoch already
signed and anchored: metered, never proven.

Once an epoch is proven the node :meth:`~VolumeMeter.seal` s it: its per-topic volume
leaves memory (the signed proof file holds exactly those records) and the meter keeps
its per-customer totals (settlement's "metered") and which named series it fed (the
label bookkeeping). :meth:`~VolumeMeter.records` of a sealed epoch reads the proof's
records back through ``sealed_records`` and adds whatever reached the meter after the
proof (late entries, kept per topic as before). Without sealing, a relayer with 100k
distinct topics per epoch held ~35 MiB more for each of its ``keep_epochs`` (1024) epochs.
"""

from __future__ import annotations

import bisect
import builtins
import heapq
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter

from pqcnet.crypto.pqc import length_prefixed
from pqcnet.relayer.frame import Frame

#: epochs kept in memory for queries and proofs
MAX_EPOCHS = 1024
#: (customer, channel) pairs with their own Prometheus series; bounds the label
#: cardinality a scrape (and the Prometheus server) must hold — every customer and
#: channel a publisher invents would otherwise be a series forever.
MAX_LABEL_SERIES = 1000
#: the customer and channel label value of the series that pairs beyond the bound share
OTHER_LABEL = "other"

Key = tuple[str, str, int]
VolumeKey = tuple[int, str, str, int]
"""(epoch, customer, channel, qos)"""
VolumeDelta = dict[VolumeKey, list[int]]
"""VolumeKey -> [bytes, frames]"""


@dataclass(frozen=True, slots=True)
class VolumeRecord:
    """Traffic of one (customer, channel, qos) in one epoch."""

    customer: str
    channel: str
    bytes: int
    frames: int
    qos: int
    epoch: int

    def canonical(self) -> builtins.bytes:
        """Bytes the Merkle leaf hashes (length-prefixed, fixed field order)."""
        return length_prefixed(self.customer.encode(), self.channel.encode(),
                               self.bytes.to_bytes(8, "big"), self.frames.to_bytes(8, "big"),
                               self.qos.to_bytes(1, "big"), self.epoch.to_bytes(8, "big"))


@dataclass(slots=True)
class _Sealed:
    """What stays in memory of a proven epoch."""

    #: customer -> [bytes, frames] of the records its proof covers
    customers: dict[str, list[int]]
    #: pairs with their own series that had traffic in it (at most ``max_label_series``)
    named: frozenset[tuple[str, str]]
    #: qos values of its traffic counted under ``other``
    folded_qos: frozenset[int]
    #: bumped by each late apply into it (WatchVolume re-reads it then)
    version: int = field(default=0)


class VolumeMeter:
    """Per-epoch aggregates plus the matching Prometheus counters."""

    def __init__(self, epoch_seconds: float = 60.0, *, clock: Callable[[], float] = time.time,
                 registry: CollectorRegistry | None = None, max_epochs: int = MAX_EPOCHS,
                 max_label_series: int = MAX_LABEL_SERIES) -> None:
        if epoch_seconds <= 0:
            raise ValueError("epoch_seconds must be > 0")
        if max_label_series < 0:
            raise ValueError("max_label_series must be >= 0")
        self.epoch_seconds = epoch_seconds
        self.max_epochs = max_epochs
        self.max_label_series = max_label_series
        #: (customer, channel) with its own series -> the qos values it has series for
        #: (at most ``max_label_series`` pairs). The pairs counted under ``other`` are
        #: not kept: a pair is folded exactly while it has traffic in memory and no
        #: series of its own, which the epochs already say (so nothing here grows with
        #: the number of distinct pairs).
        self._named: dict[tuple[str, str], set[int]] = {}
        #: qos values with an ``other`` series; one goes when no folded traffic with
        #: that qos is left in memory
        self._other_qos: set[int] = set()
        #: every qos value applied (at most 256), to look a pair up in the epochs
        self._qos_seen: set[int] = set()
        self._clock = clock
        #: epoch -> (customer, channel, qos) -> [bytes, frames]; of a sealed epoch, only
        #: what its proof does not cover (late entries)
        self._epochs: dict[int, dict[Key, list[int]]] = {}
        self._sealed: dict[int, _Sealed] = {}
        self.sealed_records: Callable[[int], Sequence[VolumeRecord]] | None = None
        """Reads a sealed epoch's proven records (the node's proof files), leaf order."""
        #: epoch -> batches aggregated for it and not yet applied or dropped (at most one
        #: per shard worker)
        self._held: dict[int, int] = {}
        self.version = 0
        """Bumped on every change (the gRPC watcher polls it)."""
        self.registry = registry or CollectorRegistry()
        labels = ("customer", "channel", "qos")
        self._bytes = Counter("pqcnet_relayer_volume_bytes", "Payload bytes delivered",
                              labels, registry=self.registry)
        self._frames = Counter("pqcnet_relayer_volume_frames", "Frames delivered",
                               labels, registry=self.registry)
        #: (customer, channel, qos) labels -> their (bytes, frames) children: one dict
        #: lookup per apply instead of two ``labels()`` calls (validation and a lock
        #: each); entries leave with their series in :meth:`_drop_series`
        self._children: dict[tuple[str, str, str], tuple[Counter, Counter]] = {}

    def epoch(self, now: float | None = None) -> int:
        """The epoch number at ``now`` (default: the clock)."""
        return int((self._clock() if now is None else now) // self.epoch_seconds)

    def aggregate(self, frames: Sequence[Frame]) -> VolumeDelta:
        """The batch's volume per (epoch, customer, channel, qos); changes nothing."""
        epoch = self.epoch()
        batch: VolumeDelta = {}
        for f in frames:  # aggregate first: one counter update per key, not per frame
            key = (epoch, f.customer, f.channel, f.qos)
            agg = batch.get(key)
            if agg is None:
                agg = batch[key] = [0, 0]
            agg[0] += len(f.payload)
            agg[1] += 1
        return batch

    def hold(self, delta: VolumeDelta) -> None:
        """A batch of ``delta`` is on its way to :meth:`apply` (or will be dropped):
        its epochs are not :meth:`settled` until :meth:`release`."""
        for e in {k[0] for k in delta}:
            self._held[e] = self._held.get(e, 0) + 1

    def release(self, delta: VolumeDelta) -> None:
        """The held batch was applied or dropped (call exactly once per :meth:`hold`)."""
        for e in {k[0] for k in delta}:
            left = self._held.get(e, 0) - 1
            if left > 0:
                self._held[e] = left
            else:
                self._held.pop(e, None)

    def settled(self, epoch: int) -> bool:
        """No batch of ``epoch`` (or an earlier one) is between aggregate and apply."""
        return not any(e <= epoch for e in self._held)

    def apply(self, delta: VolumeDelta) -> None:
        """Add a delta (from :meth:`aggregate`, or loaded from the store at start)."""
        for (epoch, customer, channel, qos), (nbytes, nframes) in delta.items():
            # labels first: whether the pair was folded depends on the traffic before
            labels = (*self._label_pair(customer, channel, qos), str(qos))
            ep = self._epochs.setdefault(epoch, {})
            total = ep.get((customer, channel, qos))
            if total is None:
                total = ep[(customer, channel, qos)] = [0, 0]
            total[0] += nbytes
            total[1] += nframes
            sealed = self._sealed.get(epoch)
            if sealed is not None:
                sealed.version += 1
            children = self._children.get(labels)
            if children is None:
                children = self._children[labels] = (self._bytes.labels(*labels),
                                                     self._frames.labels(*labels))
            children[0].inc(nbytes)
            children[1].inc(nframes)
        self.version += 1

    def _label_pair(self, customer: str, channel: str, qos: int) -> tuple[str, str]:
        pair = (customer, channel)
        self._qos_seen.add(qos)
        named = self._named.get(pair)
        if named is None and pair != (OTHER_LABEL, OTHER_LABEL) \
                and len(self._named) < self.max_label_series and not self._live(pair):
            # a free slot, and the pair is not folded already (a live pair without a
            # series is counted under ``other`` until its traffic leaves memory)
            named = self._named[pair] = set()
        if named is not None:
            named.add(qos)
            return pair
        self._other_qos.add(qos)
        return OTHER_LABEL, OTHER_LABEL

    def _live(self, pair: tuple[str, str]) -> bool:
        """``pair`` has traffic in a held epoch (of a sealed epoch, only the named pairs
        are remembered: a folded pair whose traffic is all sealed may get a slot)."""
        c, ch = pair
        return any((c, ch, q) in ep for ep in self._epochs.values() for q in self._qos_seen) \
            or any(pair in s.named for s in self._sealed.values())

    def _drop_series(self) -> None:
        """Remove the series of pairs with no traffic left in any in-memory epoch."""
        for pair in [p for p in self._named if not self._live(p)]:
            for q in self._named.pop(pair):
                self._bytes.remove(*pair, str(q))
                self._frames.remove(*pair, str(q))
                self._children.pop((*pair, str(q)), None)
        other_qos = {q for ep in self._epochs.values() for (c, ch, q) in ep
                     if (c, ch) not in self._named}
        other_qos.update(q for s in self._sealed.values() for q in s.folded_qos)
        for q in self._other_qos - other_qos:
            self._bytes.remove(OTHER_LABEL, OTHER_LABEL, str(q))
            self._frames.remove(OTHER_LABEL, OTHER_LABEL, str(q))
            self._children.pop((OTHER_LABEL, OTHER_LABEL, str(q)), None)
        self._other_qos = other_qos

    def record(self, shard: int, frames: Sequence[Frame]) -> None:
        """Count a delivered batch now (no persistence; the worker uses aggregate/apply)."""
        self.apply(self.aggregate(frames))

    def epochs(self) -> list[int]:
        """Epochs with traffic, ascending."""
        return sorted(self._epochs.keys() | self._sealed.keys())

    def sealed(self, epoch: int) -> bool:
        return epoch in self._sealed

    def seal_version(self, epoch: int) -> int:
        """Changes whenever a sealed ``epoch``'s records change (a late apply)."""
        return self._sealed[epoch].version

    def seal(self, epoch: int, proven: Sequence[VolumeRecord] | None = None) -> None:
        """``epoch`` is proven: drop its per-topic volume, keep its per-customer totals.

        ``proven``: the proof's records when the meter's may differ from them (volume
        loaded at start holds the late frames metered after the proof); what they do not
        cover stays in memory as late entries. Without it the meter's records are taken
        to be the proof's (sealing right after proving). Idempotent."""
        if epoch in self._sealed:
            return
        ep = self._epochs.pop(epoch, {})
        late: dict[Key, list[int]] = {}
        if proven is not None:
            signed = {(r.customer, r.channel, r.qos): (r.bytes, r.frames) for r in proven}
            for k in ep.keys() | signed.keys():
                mine, theirs = ep.get(k, (0, 0)), signed.get(k, (0, 0))
                if (mine[0], mine[1]) != theirs:
                    late[k] = [mine[0] - theirs[0], mine[1] - theirs[1]]
        customers: dict[str, list[int]] = {}
        for (c, _, _), v in ep.items():
            t = customers.setdefault(c, [0, 0])
            t[0] += v[0]
            t[1] += v[1]
        for (c, _, _), v in late.items():  # the proof covers the rest
            t = customers.setdefault(c, [0, 0])
            t[0] -= v[0]
            t[1] -= v[1]
        self._sealed[epoch] = _Sealed(
            {c: t for c, t in customers.items() if t != [0, 0]},
            frozenset((c, ch) for (c, ch, _) in ep if (c, ch) in self._named),
            frozenset(q for (c, ch, q) in ep if (c, ch) not in self._named))
        if late:
            self._epochs[epoch] = late
        self.version += 1

    def customer_totals(self, epoch: int) -> dict[str, list[int]]:
        """customer -> [bytes, frames] metered in ``epoch`` (no proof file read)."""
        out: dict[str, list[int]] = {}
        sealed = self._sealed.get(epoch)
        if sealed is not None:
            out = {c: list(t) for c, t in sealed.customers.items()}
        for (c, _, _), v in self._epochs.get(epoch, {}).items():
            t = out.setdefault(c, [0, 0])
            t[0] += v[0]
            t[1] += v[1]
        return {c: t for c, t in out.items() if t != [0, 0]}

    def records(self, epoch: int) -> list[VolumeRecord]:
        """The epoch's records in canonical (Merkle leaf) order (a sealed epoch's are
        read through :attr:`sealed_records`, late entries added)."""
        ep = self._epochs.get(epoch, {})
        if epoch not in self._sealed:
            return [VolumeRecord(c, ch, v[0], v[1], q, epoch)
                    for (c, ch, q), v in sorted(ep.items())]
        if self.sealed_records is None:
            raise RuntimeError("a sealed epoch's records need VolumeMeter.sealed_records")
        proven = self.sealed_records(epoch)
        if not ep:
            return list(proven)
        merged = {(r.customer, r.channel, r.qos): [r.bytes, r.frames] for r in proven}
        for k, v in ep.items():
            t = merged.setdefault(k, [0, 0])
            t[0] += v[0]
            t[1] += v[1]
        return [VolumeRecord(c, ch, v[0], v[1], q, epoch)
                for (c, ch, q), v in sorted(merged.items()) if v != [0, 0]]

    def query(self, customer: str | None = None, channel: str | None = None,
              epoch_from: int = 0, epoch_to: int | None = None) -> list[VolumeRecord]:
        """Records matching the filters, ordered by epoch then key."""
        out = []
        for e in self.epochs():
            if e < epoch_from or (epoch_to is not None and e > epoch_to):
                continue
            out += [r for r in self.records(e)
                    if (customer is None or r.customer == customer)
                    and (channel is None or r.channel == channel)]
        return out

    def page(self, customer: str | None, channel: str | None, epoch_from: int,
             epoch_to: int | None, after: VolumeKey | None, limit: int,
             max_bytes: int) -> tuple[list[VolumeRecord], VolumeKey | None]:
        """One page of :meth:`query`: the records after key ``after`` (in (epoch,
        customer, channel, qos) order), at most ``limit`` of them and about ``max_bytes``
        encoded; returns them and the key to continue after (None: nothing is left).

        Each page costs one pass over the epochs it touches (``heapq.nsmallest``), not a
        sort of everything the query matches: a governance pull of 1M records is ~100
        such passes instead of one message no gRPC client accepts (4 MiB by default)."""
        out: list[VolumeRecord] = []
        size = 0
        for e in self.epochs():
            if e < epoch_from or (epoch_to is not None and e > epoch_to) \
                    or (after is not None and e < after[0]):
                continue
            cut = after[1:] if after is not None and e == after[0] else None
            for r in self._page_of(e, customer, channel, cut, limit - len(out) + 1):
                if len(out) == limit or (out and size >= max_bytes):
                    last = out[-1]
                    return out, (last.epoch, last.customer, last.channel, last.qos)
                out.append(r)
                size += len(r.customer) + len(r.channel) + 40  # protobuf framing, generous
        return out, None

    def _page_of(self, epoch: int, customer: str | None, channel: str | None,
                 cut: Key | None, n: int) -> list[VolumeRecord]:
        """The first ``n`` matching records of ``epoch`` after key ``cut``."""
        def match(c: str, ch: str) -> bool:
            return (customer is None or c == customer) and (channel is None or ch == channel)

        if epoch in self._sealed:  # sorted already: skip to the cut, then filter
            recs = self.records(epoch)
            start = 0 if cut is None else bisect.bisect_right(
                recs, cut, key=lambda r: (r.customer, r.channel, r.qos))
            out = []
            for r in itertools.islice(recs, start, None):
                if match(r.customer, r.channel):
                    out.append(r)
                    if len(out) == n:
                        break
            return out
        ep = self._epochs.get(epoch, {})
        keys = [k for k in ep if match(k[0], k[1]) and (cut is None or k > cut)]
        return [VolumeRecord(k[0], k[1], ep[k][0], ep[k][1], k[2], epoch)
                for k in heapq.nsmallest(n, keys)]

    def forget_before(self, epoch: int) -> None:
        """Drop epochs older than ``epoch`` (after they were proven)."""
        held = self.epochs()
        drop = [e for e in held if e < epoch]
        drop += [e for e in held if e >= epoch][: max(0, len(held) - len(drop) - self.max_epochs)]
        for e in drop:
            self._epochs.pop(e, None)
            self._sealed.pop(e, None)
        self._drop_series()
