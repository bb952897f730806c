"""Shared pieces of the relayer cluster tests (Kafka and Redis): the three relayers with
their recording failover publisher and cluster subscriber (:class:`ClusterRun`), every
relayer's metered volume, and the proof audit (each relayer's signed proofs cover what
it metered, the union is the total, nothing proved twice)."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from pqcnet.chaos.checker import check
from pqcnet.chaos.history import HistoryWriter, payload_for
from pqcnet.crypto.pqc import VerifyKey
from pqcnet.relayer.bus.leases import journal
from pqcnet.relayer.client import ClusterSubscriber, FailoverPublisher
from pqcnet.relayer.cursor import JournalCursor
from pqcnet.relayer.frame import Frame, Topic, shard_for
from pqcnet.relayer.proof import VolumeProof, verify_volume_proof
from pqcnet.relayer.proofstore import ProofStore
from pqcnet.relayer.seqstore import RedisSeqStore
from tests.ports import free_port
from tests.relayer.e2e import identities
from tests.relayer.helpers import redis_cli
from tests.relayer.proc import RelayerProcess, write_config

#: (node, epoch, topic) -> (frames, bytes)
Volume = dict[tuple[str, int, Topic], tuple[int, int]]


async def metered(redis_url: str, prefix: str, names: list[str]) -> Volume:
    """What every relayer metered (the killed one's too), from the shared Redis store."""
    client = aioredis.from_url(redis_url)
    out: Volume = {}
    try:
        for name in names:
            vol = await RedisSeqStore(client, prefix, name).load_volume()
            for (epoch, customer, channel, _qos), (nbytes, nframes) in vol.items():
                key = (name, epoch, (customer, channel))
                f, b = out.get(key, (0, 0))
                out[key] = (f + nframes, b + nbytes)
    finally:
        await client.aclose()
    return out


def by_topic(volume: Volume) -> dict[Topic, tuple[int, int]]:
    """(frames, bytes) per topic over relayers and epochs (the checker's metering)."""
    frames: Counter[Topic] = Counter()
    nbytes: Counter[Topic] = Counter()
    for (_n, _e, topic), (f, b) in volume.items():
        frames[topic] += f
        nbytes[topic] += b
    return {t: (frames[t], nbytes[t]) for t in frames}


def frames_of(volume: Volume) -> int:
    """Frames over all keys."""
    return sum(f for f, _b in volume.values())


def proofs(data_dir: Path) -> list[VolumeProof]:
    """The proofs a relayer wrote (with records)."""
    return [p for p, _vid in ProofStore(data_dir / "proofs").load()]


def audit_proofs(relayer_dirs: dict[str, Path], volume: Volume, key: VerifyKey) -> Volume:
    """Check every relayer's proofs against its own metered volume; returns what the
    proofs cover, (node, epoch, topic) -> frames.

    * each proof verifies (signature, root, totals) and is signed as its relayer;
    * a relayer proves exactly what it metered, epoch by epoch — no more (a frame of a
      shard it did not own would have to be metered by it first), no less;
    * no (relayer, epoch) is proved twice.
    """
    covered: Volume = {}
    seen: set[tuple[str, int, int]] = set()
    for name, d in relayer_dirs.items():
        for p in proofs(d):
            verify_volume_proof(p, key)
            assert p.relayer_id == name, (p.relayer_id, name)
            assert (name, p.epoch, p.part) not in seen, f"{name} proved epoch {p.epoch} twice"
            seen.add((name, p.epoch, p.part))
            for r in p.records:
                k = (name, r.epoch, (r.customer, r.channel))
                assert k not in covered, f"{k} in two proofs"
                covered[k] = (r.frames, r.bytes)
    assert covered == volume, _diff(covered, volume)
    return covered


def _diff(a: Volume, b: Volume) -> str:
    keys = sorted(set(a) | set(b))
    return "; ".join(f"{k}: proved {a.get(k)} metered {b.get(k)}" for k in keys
                     if a.get(k) != b.get(k))[:2000]


def ownership_intervals(events: list[tuple[int, str, int, str]]
                        ) -> dict[tuple[str, int], list[tuple[int, int]]]:
    """(node, shard) -> [(from_ms, to_ms)] from ``(ms, node, shard, event)`` journal
    entries: an ownership starts at ``claimed`` and ends at the owner's ``released`` /
    ``lost``, or at the next claim of the shard by another node (a killed owner writes
    nothing). Entries of one millisecond keep the journal's order (a release and the
    claim after it often share one: sorting on the event name put the claim first)."""
    out: dict[tuple[str, int], list[tuple[int, int]]] = defaultdict(list)
    open_: dict[int, tuple[str, int]] = {}
    end = 2**62
    for ms, node, shard, event in sorted(events, key=lambda e: e[0]):
        cur = open_.get(shard)
        if event == "claimed":
            if cur is not None and cur[0] != node:
                out[(cur[0], shard)].append((cur[1], ms))
            if cur is None or cur[0] != node:
                open_[shard] = (node, ms)
        elif cur is not None and cur[0] == node:
            out[(node, shard)].append((cur[1], ms))
            del open_[shard]
    for shard, (node, since) in open_.items():
        out[(node, shard)].append((since, end))
    return dict(out)


async def read_journal(redis_url: str, prefix: str) -> list[tuple[int, str, int, str]]:
    """``(ms, node, shard, event)`` of the ownership journal ``{prefix}:owners``."""
    client = aioredis.from_url(redis_url)
    try:
        raw: list[Any] = await client.xrange(f"{prefix}:owners") or []
    finally:
        await client.aclose()
    return [(int(_s(eid).split("-")[0]), node, shard, event)
            for (eid, _f), (node, shard, event) in zip(raw, journal(raw), strict=True)]


def assert_owned_when_proved(cover: Volume, events: list[tuple[int, str, int, str]],
                             shards: int, epoch_seconds: float) -> None:
    """Every (relayer, epoch, topic) a relayer proved: the topic's shard was owned by
    that relayer (per the journal) at some time during that epoch."""
    owned = ownership_intervals(events)
    for node, epoch, topic in cover:
        shard = shard_for(*topic, shards)
        lo, hi = int(epoch * epoch_seconds * 1000), int((epoch + 1) * epoch_seconds * 1000)
        spans = owned.get((node, shard), [])
        assert any(a < hi and b > lo for a, b in spans), (node, epoch, topic, shard, spans)


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


class ClusterRun:
    """Three relayers (``r0``..``r2``, not started) sharing ``common`` config, a
    failover publisher on the first two, a cluster subscriber on all three, both
    recording histories under ``tmp/history``; ``by_relayer`` counts the frames each
    relayer delivered (who owned shards when)."""

    names = ["r0", "r1", "r2"]

    def __init__(self, tmp: Path, topics: list[Topic], count: int, batch: int,
                 **common: Any) -> None:
        self.topics, self.count, self.batch = topics, count, batch
        self.redis_url, self.redis_prefix = common["redis_url"], common["redis_prefix"]
        ports = [free_port() for _ in self.names]
        self.dirs = {n: tmp / n for n in self.names}
        self.procs: list[RelayerProcess] = []
        for name, port in zip(self.names, ports):
            self.dirs[name].mkdir()
            self.procs.append(RelayerProcess(write_config(
                self.dirs[name], node_id=name, listen_port=port, **common)))
        self.targets = [("127.0.0.1", p) for p in ports]
        self.hist = tmp / "history"
        self.hist.mkdir()
        self.cursor = JournalCursor(self.hist / "subscriber.jsonl")
        self.pub_log = HistoryWriter(self.hist / "publisher.jsonl")
        self.pub = FailoverPublisher(self.targets[:2], identities()[1], attempt_timeout=15.0,
                                     retry_delay=0.1, give_up=120.0)
        self.sub = ClusterSubscriber(self.targets, identities()[2], "acme",
                                     cursor=self.cursor, retry_delay=0.2)
        self.acked = dict.fromkeys(topics, 0)
        self.taken = 0
        #: set once every frame was taken (:meth:`consume` goes on reading)
        self.all_taken = asyncio.Event()
        self.by_relayer = [0, 0, 0]

    @property
    def total(self) -> int:
        return self.count * len(self.topics)

    async def consume(self) -> None:
        """Take batches until cancelled (:meth:`close`); ``all_taken`` is set once every
        frame was. It goes on reading after that: a relayer that delivered frames and
        died (or was fenced) before it billed them has them delivered again by their
        next owner, which bills them when this subscriber acks the repeats — which it
        only does while it reads."""
        async for batch in self.sub.batches():
            self.taken += len(batch)
            assert self.sub._source is not None
            self.by_relayer[self.sub.subs.index(self.sub._source)] += len(batch)
            if self.taken >= self.total:
                self.all_taken.set()

    async def has_metered(self, name: str) -> bool:
        """``name`` wrote volume to the shared store: a relayer killed after it delivered
        but before its volume write bills nothing (the next owner redelivers and bills
        those frames), so a test that wants the dead relayer in the proofs waits for it."""
        return frames_of(await metered(self.redis_url, self.redis_prefix, [name])) > 0

    def done(self) -> bool:
        return all(v >= self.count for v in self.acked.values())

    async def publish_step(self) -> None:
        """The next ``batch`` seqs of every topic past its acked prefix, recorded; a
        retriable refusal (backpressure) pauses, and the same seqs go again."""
        frames = [Frame(c, ch, s, payload_for(1, c, ch, s, 48))
                  for (c, ch) in self.topics
                  for s in range(self.acked[(c, ch)] + 1,
                                 min(self.acked[(c, ch)] + self.batch, self.count) + 1)]
        self.pub_log.record("publish", frames)
        results = await self.pub.publish(frames)
        ok = [f for f, r in zip(frames, results) if r.accepted]
        self.pub_log.record("ack", ok)
        for f in ok:
            self.acked[f.topic] = max(self.acked[f.topic], f.seq)
        if len(ok) < len(frames):
            await asyncio.sleep(0.2)

    async def start(self, *which: int) -> None:
        """Start relayers ``which`` together. If one fails, every relayer process of the
        run is stopped before the error goes up: a failed start (a port taken, in one
        CI) left the others running, holding the shared Redis and Kafka for later tests."""
        try:
            await asyncio.gather(*(self.procs[i].start() for i in which))
        except BaseException:
            for p in self.procs:
                await p.stop()
            raise

    async def close(self, consumer: asyncio.Task[None]) -> None:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
        await self.pub.close()
        await self.sub.close()
        self.pub_log.close()
        self.cursor.close()
        for p in self.procs:
            if p.proc is not None:
                await p.stop()

    def agreement_left(self, shards: int) -> dict[int, tuple[int, int]]:
        """Shards with gap-agreement markers or pending ranges still in Redis, counted
        with redis-cli (decision 0020): every marker is of a frame its shard's owner has
        yet to read and save a mark past, so none is left once the stream was delivered."""
        out: dict[int, tuple[int, int]] = {}
        for s in range(shards):
            counts = tuple(int(redis_cli(self.redis_url, cmd, f"{self.redis_prefix}:{key}:{s}")
                               .split()[-1]) for cmd, key in (("ZCARD", "acked"),
                                                              ("HLEN", "pending")))
            if any(counts):
                out[s] = (counts[0], counts[1])
        return out

    def proved(self, volume: Volume) -> bool:
        """Every metered frame is in some relayer's proofs."""
        return sum(p.total_frames for n in self.names
                   for p in proofs(self.dirs[n] / "data")) >= frames_of(volume)

    async def check_histories_and_proofs(self, volume: Volume, redis_url: str, prefix: str,
                                         shards: int, epoch: float) -> None:
        """The history checker against what the relayers bill; then each relayer proved
        exactly what it metered (union = total, nothing twice), only for topics of shards
        it owned in that epoch (the ownership journal next to the shared marks)."""
        report = check(sorted(self.hist.glob("*.jsonl")), by_topic(volume))
        assert report.ok, report.table()
        assert report.total("taken") == report.total("acked") == self.total
        assert all(self.by_relayer), self.by_relayer  # every relayer delivered
        cover = audit_proofs({n: self.dirs[n] / "data" for n in self.names}, volume,
                             identities()[0].key.public_key)
        assert frames_of(cover) == self.total
        assert {n for n, _e, _t in cover} == set(self.names)
        events = await read_journal(redis_url, prefix)
        assert {e[1] for e in events} == set(self.names)
        assert_owned_when_proved(cover, events, shards, epoch)
