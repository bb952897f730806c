"""Publisher → relayer → subscriber traffic with DTN replay, metering and client acks.

Publishers send frames (:class:`pqcnet.relayer.frame.Frame`) over their tunnel (a direct
link) to the relayer owning the topic's shard (``shard_for``, the relayer's own
sharding). The relayer keeps every frame for a subscriber in a real RocksDB
:class:`~pqcnet.mesh.dtn.BundleStore` until the subscriber acknowledges it, sends it at
once while the subscriber is connected, and replays what is held, oldest first, when the
subscriber reconnects after a crash or a leave — the seed's "replay success once nodes
recover". A subscriber keeps, on its disk, the highest sequence it delivered per topic:
it hands each frame to the application once, in order, and acknowledges cumulatively.

Metering is the relayer's real :class:`~pqcnet.relayer.metering.VolumeMeter`, fed with
each frame the first time it leaves for the subscriber; at each epoch the relayer signs
a real :class:`~pqcnet.relayer.proof.VolumeProof` and publishes it on the relay-reports
topic. **Client-signed counters** are modelled here until issue 11 adds them to the
relayer: at each epoch a subscriber signs (relayer, customer, epoch, bytes, frames) with
its node key under ``pqcnet/sim/client-ack/v1`` and sends it to governance, whose auditor
(:mod:`pqcnet.sim.audit`) compares them with the proofs. An over-reporting relayer
inflates the bytes in the records it proves.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from pqcnet.crypto.pqc import length_prefixed
from pqcnet.mesh.dtn import BundleStore
from pqcnet.mesh.messages import RelayReport
from pqcnet.relayer.frame import Frame, decode, encode, shard_for
from pqcnet.relayer.metering import VolumeMeter
from pqcnet.relayer.proof import build_volume_proof, proof_to_pb
from pqcnet.sim.gossipsub import DIAL_RTTS
from pqcnet.sim.transport import drive
from pqcnet.sim.world import World

CLIENT_ACK_CONTEXT = b"pqcnet/sim/client-ack/v1"
#: Frames a subscriber buffers out of order at most (beyond that it waits for replay).
MAX_REORDER = 4096
#: Cumulative acknowledgements are sent this often, seconds.
ACK_INTERVAL_S = 1.0
#: Held frames expire after this long (a subscriber away longer loses them).
BUNDLE_TTL_MS = 6 * 3_600_000
#: Bytes of an acknowledgement / a reconnect hello on the wire.
ACK_BYTES = 96
#: Bytes of a signed client counter (ML-DSA-65 signature + fields).
CLIENT_ACK_BYTES = 3_400
PROOF_KIND = "pqcnet.sim.VolumeProof"


@dataclass(slots=True)
class ClientAck:
    """A subscriber's signed statement of what it received from a relayer in an epoch."""

    subscriber: str
    relayer: str
    customer: str
    epoch: int
    nbytes: int
    frames: int
    signature: bytes = b""

    def signed_bytes(self) -> bytes:
        return length_prefixed(self.subscriber.encode(), self.relayer.encode(),
                               self.customer.encode(), self.epoch.to_bytes(8, "big"),
                               self.nbytes.to_bytes(8, "big"), self.frames.to_bytes(8, "big"))


@dataclass
class RelayerState:
    idx: int
    meter: VolumeMeter
    bundles: BundleStore
    #: subscriber index -> connected (as the relayer sees it)
    connected: dict[int, bool] = field(default_factory=dict)
    #: (subscriber, topic) -> highest seq already metered (first transmission only)
    metered: dict[tuple[int, tuple[str, str]], int] = field(default_factory=dict)
    over_reports: bool = False


@dataclass
class SubscriberState:
    idx: int
    customer: str
    #: topic -> out-of-order frames waiting for the gap to fill
    buffer: dict[tuple[str, str], dict[int, Frame]] = field(default_factory=dict)
    #: (relayer idx, epoch) -> [bytes, frames] received (for the signed counters)
    counted: dict[tuple[int, int], list[int]] = field(default_factory=dict)


class DataPlane:
    """The relayer traffic of one run."""

    def __init__(self, world: World, *, over_reporters: set[int] | None = None) -> None:
        self.world = world
        self.relayers = world.by_role.get("relayer", [])
        self.publishers = world.by_role.get("publisher", [])
        self.subscribers = world.by_role.get("subscriber", [])
        w = world.sc.workload
        self.epoch_s = w.epoch_s
        self._dir = Path(tempfile.mkdtemp(prefix="pqcnet-sim-dtn-"))
        self.rs: dict[int, RelayerState] = {}
        for r in self.relayers:
            meter = VolumeMeter(self.epoch_s, clock=lambda: world.engine.now)
            store = BundleStore(self._dir / f"r{r}", sync=False)
            self.rs[r] = RelayerState(r, meter, store,
                                      over_reports=r in (over_reporters or set()))
        self.ss = {s: SubscriberState(s, f"cust-{k}") for k, s in enumerate(self.subscribers)}
        # publisher -> (customer, channel, subscriber, relayer)
        self.routes: dict[int, tuple[str, str, int, int]] = {}
        for k, p in enumerate(self.publishers):
            if not self.subscribers or not self.relayers:
                break
            sub = self.subscribers[k % len(self.subscribers)]
            customer, channel = self.ss[sub].customer, f"ch-{k}"
            relayer = self.relayers[shard_for(customer, channel, len(self.relayers))]
            self.routes[p] = (customer, channel, sub, relayer)
        self.sub_relayers: dict[int, set[int]] = defaultdict(set)
        for _, _, sub, rel in self.routes.values():
            self.sub_relayers[sub].add(rel)
        self._seq: dict[int, int] = defaultdict(int)
        self.published = 0
        self.published_bytes: dict[str, int] = defaultdict(int)
        self.delivered: dict[tuple[str, str], set[int]] = defaultdict(set)
        self.delivered_bytes: dict[str, int] = defaultdict(int)
        self.app_dups = 0
        self.dup_suppressed = 0
        self.replayed = 0
        self.held_peak = 0
        #: governance's auditor registers here to receive the signed client counters
        self.ack_listeners: list[Callable[[ClientAck], None]] = []

    def close(self) -> None:
        for st in self.rs.values():
            st.bundles.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    # ------------------------------------------------------------------ schedule

    def start(self, at_s: float, stop_s: float) -> None:
        w = self.world.sc.workload
        eng = self.world.engine
        rng = self.world.streams["frames"]
        if w.frame_rate > 0:
            for p in self.routes:
                eng.at(at_s + rng.random() / w.frame_rate, self._publish, p, stop_s)
        for s in self.subscribers:
            eng.at(at_s + rng.random() * ACK_INTERVAL_S, self._ack_loop, s)
        eng.at(at_s + self.epoch_s, self._epoch_end, int((at_s + 1e-9) // self.epoch_s))
        for r in self.relayers:
            for s in self.subscribers:
                self.rs[r].connected[s] = True

    def on_join(self, i: int) -> None:
        """A subscriber (re)joined: it reconnects to its relayers and says where it is."""
        if i not in self.ss:
            return
        for r in self.sub_relayers.get(i, ()):
            delay = DIAL_RTTS * self.world.net.link_latency(i, r)
            self.world.engine.after(delay, self._hello, i, r)

    def on_leave(self, i: int, crash: bool) -> None:
        if i not in self.ss:
            return
        self.ss[i].buffer.clear()  # memory, not disk
        self.ss[i].counted.clear()
        delay = self.world.sc.network.conn_timeout_s if crash else 0.0
        for r in self.sub_relayers.get(i, ()):
            self.world.engine.after(delay, self._disconnect, r, i)

    # ------------------------------------------------------------------ publisher

    def _publish(self, p: int, stop_s: float) -> None:
        world = self.world
        if world.engine.now >= stop_s:
            return
        w = world.sc.workload
        world.engine.after(world.streams["frames"].expovariate(w.frame_rate), self._publish,
                           p, stop_s)
        if not world.net.online[p]:
            return
        customer, channel, _, relayer = self.routes[p]
        self._seq[p] += 1
        frame = Frame(customer, channel, self._seq[p], bytes(w.frame_bytes), 1)
        self.published += 1
        self.published_bytes[customer] += w.frame_bytes
        world.net.send(p, relayer, w.frame_bytes + 64, self._ingress, relayer, p, frame)

    # ------------------------------------------------------------------ relayer

    def _ingress(self, r: int, p: int, frame: Frame) -> None:
        st = self.rs[r]
        sub = self.routes[p][2]
        now_ms = self.world.engine.now_ms()
        st.bundles.put(self.world.nodes[sub].name, encode(frame), created_ms=now_ms,
                       expires_ms=now_ms + BUNDLE_TTL_MS)
        self.held_peak = max(self.held_peak, len(st.bundles))
        if st.connected.get(sub, False):
            self._transmit(st, sub, frame)

    def _transmit(self, st: RelayerState, sub: int, frame: Frame) -> None:
        key = (sub, frame.topic)
        if frame.seq > st.metered.get(key, 0):
            st.metered[key] = frame.seq
            st.meter.record(0, [frame])
        self.world.net.send(st.idx, sub, len(frame.payload) + 64, self._receive, sub, st.idx,
                            frame)

    def _disconnect(self, r: int, sub: int) -> None:
        self.rs[r].connected[sub] = False

    def _hello(self, sub: int, r: int) -> None:
        if not self.world.net.online[sub]:
            return
        marks = dict(self.world.nodes[sub].persistent.get("marks", {}))
        self.world.net.send(sub, r, ACK_BYTES, self._on_hello, r, sub, marks)

    def _on_hello(self, r: int, sub: int, marks: dict[tuple[str, str], int]) -> None:
        st = self.rs[r]
        st.connected[sub] = True
        for frame in self._acked(st, sub, marks):
            self.replayed += 1
            self._transmit(st, sub, frame)

    def _acked(self, st: RelayerState, sub: int,
               marks: dict[tuple[str, str], int]) -> list[Frame]:
        """Drop acknowledged bundles for ``sub``; return the rest, oldest first."""
        name = self.world.nodes[sub].name
        rest = []
        for b in st.bundles.pending(name, self.world.engine.now_ms()):
            frame = decode(b.payload)
            if frame.seq <= marks.get(frame.topic, 0):
                st.bundles.remove(b)
            else:
                rest.append(frame)
        return rest

    def _on_ack(self, r: int, sub: int, marks: dict[tuple[str, str], int]) -> None:
        self._acked(self.rs[r], sub, marks)

    # ------------------------------------------------------------------ subscriber

    def _receive(self, sub: int, r: int, frame: Frame) -> None:
        st = self.ss[sub]
        marks: dict[tuple[str, str], int] = self.world.nodes[sub].persistent.setdefault(
            "marks", {})
        topic = frame.topic
        have = marks.get(topic, 0)
        epoch = int(self.world.engine.now // self.epoch_s)
        counted = st.counted.setdefault((r, epoch), [0, 0])
        counted[0] += len(frame.payload)
        counted[1] += 1
        if frame.seq <= have:
            self.dup_suppressed += 1
            return
        buf = st.buffer.setdefault(topic, {})
        if frame.seq > have + 1:
            if len(buf) < MAX_REORDER:
                buf[frame.seq] = frame
            return
        self._deliver(st, frame)
        have = frame.seq
        while have + 1 in buf:
            have += 1
            self._deliver(st, buf.pop(have))
        marks[topic] = have

    def _deliver(self, st: SubscriberState, frame: Frame) -> None:
        got = self.delivered[frame.topic]
        if frame.seq in got:
            self.app_dups += 1
            return
        got.add(frame.seq)
        self.delivered_bytes[frame.customer] += len(frame.payload)

    def _ack_loop(self, sub: int) -> None:
        world = self.world
        world.engine.after(ACK_INTERVAL_S, self._ack_loop, sub)
        if not world.net.online[sub]:
            return
        marks = dict(world.nodes[sub].persistent.get("marks", {}))
        for r in self.sub_relayers.get(sub, ()):
            world.net.send(sub, r, ACK_BYTES, self._on_ack, r, sub, marks)

    # ------------------------------------------------------------------ epochs

    def _epoch_end(self, epoch: int) -> None:
        world = self.world
        world.engine.after(self.epoch_s, self._epoch_end, epoch + 1)
        for st in self.rs.values():
            records = st.meter.records(epoch)
            if not records:
                continue
            if st.over_reports:
                factor = world.sc.adversaries.over_report_factor
                records = [replace(rec, bytes=int(rec.bytes * factor)) for rec in records]
            node = world.nodes[st.idx]
            proof = build_volume_proof(node.name, epoch, records, node.keys.signing_key)
            if node.agent is not None:
                report = RelayReport(PROOF_KIND, proof_to_pb(proof).SerializeToString())
                drive(node.agent.publish_report(report))
        for sub in self.ss.values():
            node = world.nodes[sub.idx]
            if not world.net.online[sub.idx]:
                continue
            for (r, e), (nbytes, nframes) in sorted(sub.counted.items()):
                if e != epoch:
                    continue
                ack = ClientAck(node.name, world.nodes[r].name, sub.customer, e, nbytes,
                                nframes)
                ack.signature = node.keys.signing_key.sign(ack.signed_bytes(),
                                                           context=CLIENT_ACK_CONTEXT)
                world.net.send(sub.idx, world.gov, CLIENT_ACK_BYTES, self._to_auditor, ack)
            for key in [k for k in sub.counted if k[1] <= epoch]:
                del sub.counted[key]

    def _to_auditor(self, ack: ClientAck) -> None:
        for fn in self.ack_listeners:
            fn(ack)

    # ------------------------------------------------------------------ results

    def summary(self) -> dict[str, object]:
        delivered = sum(len(s) for s in self.delivered.values())
        metered: dict[str, int] = defaultdict(int)
        for st in self.rs.values():
            for e in st.meter.epochs():
                for rec in st.meter.records(e):
                    metered[rec.customer] += rec.bytes
        # what the relayers' meters counted (before any inflation of the proofs) against
        # what the customers' applications received; customers of an over-reporting
        # relayer are included too: its meter is honest, its proofs are not
        accuracy = {c: round(metered[c] / b, 6) for c, b in sorted(self.delivered_bytes.items())
                    if b}
        return {
            "frames_published": self.published,
            "frames_delivered": delivered,
            "delivery_ratio": round(delivered / self.published, 6) if self.published else None,
            "loss_ratio": round(1 - delivered / self.published, 6) if self.published else None,
            "duplicates_to_app": self.app_dups,
            "duplicates_suppressed": self.dup_suppressed,
            "frames_replayed": self.replayed,
            "bundles_held_peak": self.held_peak,
            "metering_accuracy": {
                "metered_over_delivered_min": min(accuracy.values()) if accuracy else None,
                "metered_over_delivered_max": max(accuracy.values()) if accuracy else None,
                "customers": len(accuracy),
            },
        }
