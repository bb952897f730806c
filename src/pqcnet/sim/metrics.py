"""What a run observed: deliveries, latencies, hops, bytes, application times.

The recorder is the Jepsen-style history: it is fed by the simulator (who published
what when, who received it when, who was up when) and never by the nodes' own
counters, so delivery and duplicate figures are checked independently of the code
under test. Delivery ratio of a relay message = receivers / *eligible* receivers, a node
being eligible when it was up from publication until ``window_s`` after it and (during
a partition) on the publisher's side — the Waku definition (a relay delivers to nodes
online at publish time).
"""

from __future__ import annotations

import math
from array import array
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any


def summary(values: list[float] | array[float]) -> dict[str, float]:
    """count, mean, p50/p95/p99 (nearest rank), max of ``values``; NaN-free."""
    n = len(values)
    if n == 0:
        return {"count": 0, "mean": 0.0, "p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0}
    s = sorted(values)

    def rank(q: float) -> float:
        return s[min(n - 1, max(0, math.ceil(q * n) - 1))]

    return {"count": n, "mean": sum(s) / n, "p50": rank(0.50), "p95": rank(0.95),
            "p99": rank(0.99), "max": s[-1]}


@dataclass(slots=True)
class MessageRecord:
    mid: int
    kind: str
    origin: int
    t0: float
    size: int
    receivers: int = 0
    last_s: float = 0.0
    hops_max: int = 0
    #: receptions (first copy) by time, for delivery-over-time plots
    eligible: int = -1


@dataclass
class Recorder:
    n: int
    window_s: float = 30.0
    max_records: int = 200_000
    latency: dict[str, array[float]] = field(default_factory=lambda: defaultdict(
        lambda: array("d")))
    hops: dict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    records: dict[int, MessageRecord] = field(default_factory=dict)
    records_dropped: int = 0
    app_dups: int = 0
    #: node -> list of [down_at, up_at] (up_at = inf while down)
    downtime: dict[int, list[list[float]]] = field(default_factory=dict)
    #: (start, end) of partitions; end = inf while split
    partitions: list[list[float]] = field(default_factory=list)
    #: mid -> bitmap of nodes whose application got it (duplicate detection while the
    #: message is young; N/8 bytes per message)
    _got: dict[int, tuple[float, bytearray]] = field(default_factory=dict)
    #: label -> node -> time it applied (directives, slashes, route coverage ...)
    applied: dict[str, dict[int, float]] = field(default_factory=lambda: defaultdict(dict))
    issued: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)

    # ------------------------------------------------------------------ relay

    def published(self, mid: int, kind: str, origin: int, t0: float, size: int) -> None:
        if len(self.records) >= self.max_records:
            self.records_dropped += 1
            return
        self.records[mid] = MessageRecord(mid, kind, origin, t0, size)

    def received(self, node: int, mid: int, kind: str, t0: float, now: float,
                 hops: int) -> None:
        entry = self._got.get(mid)
        if entry is None:
            entry = self._got[mid] = (t0, bytearray((self.n + 7) >> 3))
        bitmap = entry[1]
        byte, bit = node >> 3, 1 << (node & 7)
        if bitmap[byte] & bit:
            self.app_dups += 1
            return
        bitmap[byte] |= bit
        self.latency[kind].append(now - t0)
        self.hops[kind][hops] += 1
        rec = self.records.get(mid)
        if rec is not None:
            rec.receivers += 1
            rec.last_s = max(rec.last_s, now - t0)
            rec.hops_max = max(rec.hops_max, hops)

    def forget_before(self, t: float) -> None:
        """Drop duplicate-detection state of messages older than ``t`` (bounded memory;
        the relay's seen cache expires them at the same age)."""
        for mid in [m for m, (t0, _) in self._got.items() if t0 < t]:
            del self._got[mid]

    # ------------------------------------------------------------------ availability

    def node_down(self, node: int, now: float) -> None:
        self.downtime.setdefault(node, []).append([now, math.inf])

    def node_up(self, node: int, now: float) -> None:
        spans = self.downtime.get(node)
        if spans and spans[-1][1] == math.inf:
            spans[-1][1] = now

    def up_throughout(self, node: int, t0: float, t1: float) -> bool:
        return all(end <= t0 or start >= t1 for start, end in self.downtime.get(node, ()))

    def split_during(self, t0: float, t1: float) -> bool:
        return any(not (end <= t0 or start >= t1) for start, end in self.partitions)

    def eligible(self, rec: MessageRecord, joined: list[float]) -> int:
        """Receivers that should have got ``rec`` (up for the whole window)."""
        t1 = rec.t0 + self.window_s
        return sum(1 for i in range(self.n) if i != rec.origin and joined[i] <= rec.t0
                   and self.up_throughout(i, rec.t0, t1))

    # ------------------------------------------------------------------ application

    def issue(self, label: str, now: float) -> None:
        self.issued[label] = now

    def apply(self, label: str, node: int, now: float) -> None:
        self.applied[label].setdefault(node, now)

    def application_times(self, label: str, population: list[int]) -> dict[str, Any]:
        """Seconds until 50 / 99 / 100 % of ``population`` applied ``label``."""
        t0 = self.issued.get(label)
        got = self.applied.get(label, {})
        times = sorted(got[i] - t0 for i in population if i in got) if t0 is not None else []
        n = len(population)
        out: dict[str, Any] = {"population": n, "applied": len(times)}
        for q, name in ((0.5, "p50_s"), (0.99, "p99_s"), (1.0, "p100_s")):
            need = max(1, math.ceil(q * n))
            out[name] = round(times[need - 1], 4) if len(times) >= need else None
        return out
