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
"""

from __future__ import annotations

import builtins
import heapq
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
        self._epochs: dict[int, dict[Key, list[int]]] = {}
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
            self._bytes.labels(*labels).inc(nbytes)
            self._frames.labels(*labels).inc(nframes)
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
        """``pair`` has traffic in an in-memory epoch."""
        c, ch = pair
        return any((c, ch, q) in ep for ep in self._epochs.values() for q in self._qos_seen)

    def _drop_series(self) -> None:
        """Remove the series of pairs with no traffic left in any in-memory epoch."""
        for pair in [p for p in self._named if not self._live(p)]:
            for q in self._named.pop(pair):
                self._bytes.remove(*pair, str(q))
                self._frames.remove(*pair, str(q))
        other_qos = {q for ep in self._epochs.values() for (c, ch, q) in ep
                     if (c, ch) not in self._named}
        for q in self._other_qos - other_qos:
            self._bytes.remove(OTHER_LABEL, OTHER_LABEL, str(q))
            self._frames.remove(OTHER_LABEL, OTHER_LABEL, str(q))
        self._other_qos = other_qos

    def record(self, shard: int, frames: Sequence[Frame]) -> None:
        """Count a delivered batch now (no persistence; the worker uses aggregate/apply)."""
        self.apply(self.aggregate(frames))

    def epochs(self) -> list[int]:
        """Epochs with traffic, ascending."""
        return sorted(self._epochs)

    def records(self, epoch: int) -> list[VolumeRecord]:
        """The epoch's records in canonical (Merkle leaf) order."""
        ep = self._epochs.get(epoch, {})
        return [VolumeRecord(c, ch, v[0], v[1], q, epoch) for (c, ch, q), v in sorted(ep.items())]

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
            ep = self._epochs.get(e, {})
            cut = after[1:] if after is not None and e == after[0] else None
            keys = [k for k in ep if (customer is None or k[0] == customer)
                    and (channel is None or k[1] == channel) and (cut is None or k > cut)]
            for k in heapq.nsmallest(limit - len(out) + 1, keys):
                if len(out) == limit or (out and size >= max_bytes):
                    last = out[-1]
                    return out, (last.epoch, last.customer, last.channel, last.qos)
                v = ep[k]
                out.append(VolumeRecord(k[0], k[1], v[0], v[1], k[2], e))
                size += len(k[0]) + len(k[1]) + 40  # protobuf framing and varints, generous
        return out, None

    def forget_before(self, epoch: int) -> None:
        """Drop epochs older than ``epoch`` (after they were proven)."""
        for e in [e for e in self._epochs if e < epoch]:
            del self._epochs[e]
        while len(self._epochs) > self.max_epochs:
            del self._epochs[min(self._epochs)]
        self._drop_series()
