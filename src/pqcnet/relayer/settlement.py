"""Where each metered frame stands on its way to being paid for: "did anyone lose money".

A relayer meters what it delivered (:mod:`pqcnet.relayer.metering`), signs a volume proof
per closed epoch and anchors it in its QS-DAG (:mod:`pqcnet.relayer.proof`). Over the
epochs it still holds (``keep_epochs`` proven ones plus the open one), per customer:

* ``metered``  — delivered frames/bytes, from the meter;
* ``proved``   — the records of the signed proofs held (summed from the proofs when they
  were signed or loaded, not from the meter);
* ``anchored`` — the part of ``proved`` whose every proof part is a vertex of the ledger
  (looked up in the ledger, not in the node's bookkeeping);
* ``pending``  — metered in an epoch that has no proof yet (the open epoch, or a closed one
  whose proof is still being made).

``metered == proved + pending`` and ``anchored == proved`` once anchoring caught up; a
difference is money lost (metered, never proved: the operator is not paid) or claimed
without delivery (proved, never metered: the customer overpays). Exported as the gauges
``pqcnet_relayer_settlement_frames`` / ``_bytes`` {customer, state}; the money dashboard
and the compose test read them. Customers beyond ``max_customers`` (by metered frames)
share the label ``other`` so the label set stays bounded; totals stay exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

from prometheus_client.core import GaugeMetricFamily

from pqcnet.relayer.metering import OTHER_LABEL, VolumeMeter
from pqcnet.relayer.proof import VolumeProof

STATES = ("metered", "proved", "anchored", "pending")
#: (customer, state) -> [bytes, frames]
Settlement = dict[tuple[str, str], list[int]]


def settlement(meter: VolumeMeter, parts: Mapping[int, Sequence[VolumeProof]],
               proved: Mapping[int, Mapping[str, Sequence[int]]],
               is_anchored: Callable[[int, int], bool]) -> Settlement:
    """Volume per (customer, state) over the epochs the meter and the proofs hold.

    ``parts`` are the proven epochs' proof headers, ``proved`` the per-customer
    ``[bytes, frames]`` summed from their signed records when they were proven (or
    loaded from the proof files), and ``is_anchored(epoch, part)`` says whether that
    proof part is in the ledger."""
    out: Settlement = {}

    def add(customer: str, state: str, nbytes: int, frames: int) -> None:
        v = out.setdefault((customer, state), [0, 0])
        v[0] += nbytes
        v[1] += frames

    for epoch in meter.epochs():  # per-customer totals: no proof file is read
        proven = epoch in parts
        for customer, (nbytes, frames) in meter.customer_totals(epoch).items():
            add(customer, "metered", nbytes, frames)
            if not proven:
                add(customer, "pending", nbytes, frames)
    for epoch, proofs in parts.items():
        anchored = all(is_anchored(epoch, p.part) for p in proofs)
        for customer, (nbytes, frames) in proved.get(epoch, {}).items():
            add(customer, "proved", nbytes, frames)
            if anchored:
                add(customer, "anchored", nbytes, frames)
    return out


def bounded(s: Settlement, max_customers: int) -> Settlement:
    """The same totals with at most ``max_customers`` named customers (the ones with the
    most metered frames); the rest are summed under :data:`OTHER_LABEL`."""
    metered = sorted({c for c, _ in s}, key=lambda c: (-s.get((c, "metered"), [0, 0])[1], c))
    named = set(metered[:max_customers])
    out: Settlement = {}
    for (customer, state), (nbytes, frames) in s.items():
        v = out.setdefault((customer if customer in named else OTHER_LABEL, state), [0, 0])
        v[0] += nbytes
        v[1] += frames
    return out


def families(s: Settlement) -> Iterator[GaugeMetricFamily]:
    """The two gauge families; every state has a series for every customer seen."""
    frames = GaugeMetricFamily("pqcnet_relayer_settlement_frames",
                               "Frames over the held epochs by customer and state "
                               "(metered = proved + pending)", labels=["customer", "state"])
    nbytes = GaugeMetricFamily("pqcnet_relayer_settlement_bytes",
                               "Payload bytes over the held epochs by customer and state",
                               labels=["customer", "state"])
    for customer in sorted({c for c, _ in s}):
        for state in STATES:
            b, f = s.get((customer, state), (0, 0))
            frames.add_metric([customer, state], f)
            nbytes.add_metric([customer, state], b)
    yield frames
    yield nbytes


__all__ = ["STATES", "Settlement", "bounded", "families", "settlement"]
