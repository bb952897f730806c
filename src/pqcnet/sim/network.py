"""The simulated network: latency, bandwidth, loss, partitions, nodes up and down.

A transmission of ``size`` bytes from ``a`` to ``b`` is serialized on ``a``'s uplink
(queued behind what ``a`` is already sending), travels the link's latency, and is
serialized again on ``b``'s downlink; both links run at ``bandwidth_mbps``. The
downlink queue is booked when the message is sent (one event per transmission instead
of two) — it can reorder two arrivals a few microseconds apart, never by a latency.

Latency per link is drawn once (deterministically from the seed and the pair, so the
first-use order does not matter) plus optional per-message jitter. A lost transmission
over TCP (the default: libp2p streams) arrives ``rto_ms`` later instead of never.

A node that is down sends nothing and receives nothing; a message in flight to it is
lost on arrival. Partitions assign each node a side; a transmission across sides is
dropped when it arrives. Connections (which peers a node holds) are the relay layer's
business: the network only tells it, ``conn_timeout_s`` after a crash or a cut, that a
peer is gone (:attr:`Network.on_link_down`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

from pqcnet.sim.config import Latency, NetworkSpec
from pqcnet.sim.engine import Engine, Streams


class Network:
    """Transmissions between node indices ``0..n-1``."""

    def __init__(self, engine: Engine, spec: NetworkSpec, n: int, streams: Streams) -> None:
        self.engine = engine
        self.spec = spec
        self.n = n
        self._seed = streams.derive("links")
        self._jitter = streams["jitter"]
        self._loss = streams["loss"]
        self._byte_s = 8.0 / (spec.bandwidth_mbps * 1_000_000)
        self.online = [False] * n
        self.side = [0] * n
        self.up_free = [0.0] * n
        self.down_free = [0.0] * n
        self.bytes_out = [0] * n
        self.bytes_in = [0] * n
        self.msgs_out = [0] * n
        self.msgs_in = [0] * n
        self.dropped = {"offline": 0, "partition": 0, "loss": 0}
        self._links: dict[tuple[int, int], float] = {}
        self.region: list[str] = self._place(streams["regions"], spec.latency)

    # ------------------------------------------------------------------ latency

    def _place(self, rng: random.Random, lat: Latency) -> list[str]:
        if lat.kind != "regions":
            return [""] * self.n
        names = sorted(lat.weights)
        weights = [lat.weights[r] for r in names]
        return rng.choices(names, weights, k=self.n)

    def link_latency(self, a: int, b: int) -> float:
        """One-way base latency of the a-b link, seconds (symmetric, fixed per link)."""
        key = (a, b) if a < b else (b, a)
        cached = self._links.get(key)
        if cached is not None:
            return cached
        lat = self.spec.latency
        rng = random.Random(self._seed ^ (key[0] * 1_000_003 + key[1]))
        if lat.kind == "constant":
            ms = lat.ms
        elif lat.kind == "uniform":
            ms = rng.uniform(lat.low_ms, lat.high_ms)
        elif lat.kind == "normal":
            ms = max(0.0, rng.gauss(lat.mean_ms, lat.sd_ms))
        elif lat.kind == "lognormal":
            ms = lat.median_ms * math.exp(rng.gauss(0.0, lat.sigma))
        else:
            ms = lat.matrix_ms[self.region[a]][self.region[b]]
        value = ms / 1000.0
        self._links[key] = value
        return value

    # ------------------------------------------------------------------ sending

    def send(self, a: int, b: int, size: int, fn: Callable[..., None], *args: Any) -> bool:
        """Transmit ``size`` bytes a->b and call ``fn(*args)`` on arrival at ``b``.
        Returns False when nothing left ``a`` (it is down)."""
        if not self.online[a]:
            return False
        arrive = self._occupy(a, b, size, lossy=True)
        if arrive >= 0:
            self.engine.push(arrive, self._arrive, (a, b, size, fn, args))
        return True

    def book(self, a: int, b: int, size: int) -> None:
        """Account a transmission whose arrival changes nothing (link occupancy and byte
        counters only, no event): see the IHAVE short-cut in :mod:`pqcnet.sim.gossipsub`."""
        if not self.online[a]:
            return
        reachable = self.online[b] and self.side[a] == self.side[b]
        self._occupy(a, b, size, lossy=False, downlink=reachable)
        if reachable:
            self.bytes_in[b] += size
            self.msgs_in[b] += 1

    def _occupy(self, a: int, b: int, size: int, *, lossy: bool,
                downlink: bool = True) -> float:
        """Book the uplink of ``a`` and (if ``downlink``) the downlink of ``b``; the
        arrival time, or -1 when the transmission is lost (datagram mode)."""
        now = self.engine.now
        tx = size * self._byte_s
        free = self.up_free[a]
        depart = (free if free > now else now) + tx
        self.up_free[a] = depart
        self.bytes_out[a] += size
        self.msgs_out[a] += 1
        flight = self._links.get((a, b) if a < b else (b, a))
        if flight is None:
            flight = self.link_latency(a, b)
        spec = self.spec
        if lossy:
            if spec.latency.jitter_ms:
                flight = max(0.0, flight + self._jitter.gauss(0.0,
                                                              spec.latency.jitter_ms / 1000))
            if spec.loss and self._loss.random() < spec.loss:
                if not spec.tcp:
                    self.dropped["loss"] += 1
                    return -1.0
                flight += spec.rto_ms / 1000
        arrive = depart + flight
        if not downlink:
            return arrive
        free = self.down_free[b]
        arrive = (free if free > arrive else arrive) + tx
        self.down_free[b] = arrive
        return arrive

    def _arrive(self, a: int, b: int, size: int, fn: Callable[..., None],
                args: tuple[Any, ...]) -> None:
        if not self.online[b]:
            self.dropped["offline"] += 1
            return
        if self.side[a] != self.side[b]:
            self.dropped["partition"] += 1
            return
        self.bytes_in[b] += size
        self.msgs_in[b] += 1
        fn(*args)

    def reachable(self, a: int, b: int) -> bool:
        """Both up and on the same side of any partition."""
        return self.online[a] and self.online[b] and self.side[a] == self.side[b]

    # ------------------------------------------------------------------ faults

    def split(self, minority: list[int]) -> None:
        """Cut ``minority`` off from everyone else."""
        for i in minority:
            self.side[i] = 1

    def heal(self) -> None:
        self.side = [0] * self.n
