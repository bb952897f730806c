"""The history checker: what the clients saw, against what the relayer promised.

Inputs are only the clients' histories and the relayer's metering (what it bills),
never the relayer's own delivery counters. Per (customer, channel):

* **lost-acknowledged** — acked to a publisher, never taken by the application;
* **duplicated** — taken by the application more than once;
* **out-of-order** — taken after a higher seq of the same topic;
* **phantom** — taken but never published, or with a payload digest no publish had;
* **mis-billed** — metered frames/bytes differ from the distinct frames taken.

The guarantee holds when all five are zero.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pqcnet.chaos.history import read_history
from pqcnet.relayer.frame import Topic

#: metering per topic: (frames, bytes)
Metering = Mapping[Topic, tuple[int, int]]


@dataclass
class TopicReport:
    """Checker counts for one topic."""

    published: int = 0
    acked: int = 0
    taken: int = 0
    lost_acked: int = 0
    duplicated: int = 0
    out_of_order: int = 0
    phantom: int = 0
    misbilled: int = 0
    #: example seqs of each anomaly (at most a few), for the message
    examples: dict[str, list[int]] = field(default_factory=dict)

    def note(self, kind: str, seq: int) -> None:
        ex = self.examples.setdefault(kind, [])
        if len(ex) < 5:
            ex.append(seq)


@dataclass
class Report:
    """The checker's verdict over all topics."""

    topics: dict[Topic, TopicReport]

    ANOMALIES = ("lost_acked", "duplicated", "out_of_order", "phantom", "misbilled")

    def total(self, name: str) -> int:
        """Sum of one column over topics."""
        return sum(getattr(t, name) for t in self.topics.values())

    @property
    def ok(self) -> bool:
        """True when no anomaly was found."""
        return all(self.total(a) == 0 for a in self.ANOMALIES)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready summary."""
        cols = ("published", "acked", "taken", *self.ANOMALIES)
        return {"ok": self.ok, "totals": {c: self.total(c) for c in cols},
                "topics": {f"{c}/{ch}": {k: getattr(r, k) for k in cols} |
                           ({"examples": r.examples} if r.examples else {})
                           for (c, ch), r in sorted(self.topics.items())}}

    def table(self) -> str:
        """A fixed-width table, one row per topic plus totals."""
        cols = ("published", "acked", "taken", "lost_acked", "duplicated", "out_of_order",
                "phantom", "misbilled")
        heads = ("topic", "publ", "acked", "taken", "lost-ack", "dup", "order", "phantom",
                 "billing")
        rows = [[f"{c}/{ch}", *(str(getattr(r, k)) for k in cols)]
                for (c, ch), r in sorted(self.topics.items())]
        rows.append(["TOTAL", *(str(self.total(k)) for k in cols)])
        widths = [max(len(x) for x in col) for col in zip(heads, *rows)]
        line = "  ".join(h.ljust(w) for h, w in zip(heads, widths))
        body = ["  ".join(x.ljust(w) for x, w in zip(r, widths)) for r in rows]
        verdict = "OK: no anomaly" if self.ok else "ANOMALIES FOUND"
        return "\n".join([line, *body, verdict])


def check(histories: Iterable[Path], metering: Metering | None = None) -> Report:
    """Check the histories (publisher files and subscriber journals) and metering."""
    published: dict[Topic, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
    acked: dict[Topic, set[int]] = defaultdict(set)
    taken: dict[Topic, list[tuple[int, str, int]]] = defaultdict(list)
    for path in histories:
        for row in read_history(path):
            topic = (str(row["customer"]), str(row["channel"]))
            seq, op = int(row["seq"]), row["op"]
            if op == "publish":
                published[topic][seq].add(str(row.get("digest", "")))
            elif op == "ack":
                acked[topic].add(seq)
                published[topic][seq].add(str(row.get("digest", "")))
            elif op == "app_ack":
                taken[topic].append((seq, str(row.get("digest", "")), int(row.get("bytes", 0))))
    topics = set(published) | set(acked) | set(taken) | set(metering or {})
    out: dict[Topic, TopicReport] = {}
    for topic in topics:
        r = out[topic] = TopicReport()
        r.published = len(published.get(topic, {}))
        r.acked = len(acked.get(topic, set()))
        seen: set[int] = set()
        high = 0
        distinct_bytes = 0
        for seq, digest, nbytes in taken.get(topic, []):
            if seq in seen:
                r.duplicated += 1
                r.note("duplicated", seq)
                continue
            seen.add(seq)
            distinct_bytes += nbytes
            if seq < high:
                r.out_of_order += 1
                r.note("out_of_order", seq)
            high = max(high, seq)
            if digest not in published.get(topic, {}).get(seq, set()):
                r.phantom += 1
                r.note("phantom", seq)
        r.taken = len(seen)
        for seq in sorted(acked.get(topic, set()) - seen):
            r.lost_acked += 1
            r.note("lost_acked", seq)
        if metering is not None:
            frames, nbytes = metering.get(topic, (0, 0))
            r.misbilled = abs(frames - r.taken)
            if r.misbilled == 0 and nbytes != distinct_bytes:
                r.misbilled = 1
            if r.misbilled:
                r.examples["metered"] = [frames, nbytes]
    return Report(out)
