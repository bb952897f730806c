"""High/low-water backpressure per shard, as a tiny sans-IO state machine.

The node samples each shard's backlog (bus lag + overflow depth) every
``interval`` seconds and feeds it here. Crossing ``high`` yields a PAUSE for that
shard (the ingress sends FLOW PAUSE with ``retry_after`` on the tunnels publishing
to it); falling below ``low`` yields RESUME. The gap between the marks is the
hysteresis that stops PAUSE/RESUME flapping around one threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: backlog (records) at which a shard pauses its publishers
HIGH_WATER = 50_000
#: backlog below which a paused shard resumes
LOW_WATER = 10_000


@dataclass(frozen=True, slots=True)
class FlowChange:
    """A shard crossed a mark."""

    shard: int
    action: Literal["pause", "resume"]
    backlog: int


class FlowController:
    """Tracks which shards are paused."""

    def __init__(self, high: int = HIGH_WATER, low: int = LOW_WATER) -> None:
        if not 0 <= low < high:
            raise ValueError("need 0 <= low_water < high_water")
        self.high, self.low = high, low
        self.paused: set[int] = set()

    def update(self, shard: int, backlog: int) -> FlowChange | None:
        """Feed one sample; returns a change when a mark is crossed."""
        if shard not in self.paused and backlog >= self.high:
            self.paused.add(shard)
            return FlowChange(shard, "pause", backlog)
        if shard in self.paused and backlog < self.low:
            self.paused.discard(shard)
            return FlowChange(shard, "resume", backlog)
        return None
