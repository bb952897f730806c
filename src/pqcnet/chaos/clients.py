"""The chaos clients: a publisher and a subscriber that record their histories and
survive being SIGKILLed (each run resumes from its own files).

The publisher sends ``count`` frames per topic in requests of ``batch`` frames per
topic; after a restart it reads its history, resumes after the highest acked seq and
marks the first request a retry (those frames may already be on the bus). Given
several relayers (a cluster) it fails over to the next one whenever a request fails,
with the same seqs. The subscriber is the SDK's
:class:`~pqcnet.relayer.client.ResumingSubscriber` — one per relayer of a cluster,
merged by :class:`~pqcnet.relayer.client.ClusterSubscriber` — with a
:class:`~pqcnet.relayer.cursor.JournalCursor` as both history and cursor.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path

from pqcnet.chaos.history import HistoryWriter, payload_for, read_history
from pqcnet.errors import PqcnetError
from pqcnet.identity import NodeIdentity
from pqcnet.relayer.client import ClusterSubscriber, PublisherClient, ResumingSubscriber
from pqcnet.relayer.cursor import JournalCursor
from pqcnet.relayer.frame import Frame, Topic

#: seconds one publish may take before the publisher reconnects (a SIGSTOPped relayer)
PUBLISH_TIMEOUT = 10.0


def _acked_before(history: Path) -> dict[Topic, int]:
    """Highest acked seq per topic in an earlier run's history."""
    out: dict[Topic, int] = {}
    if history.exists():
        for row in read_history(history):
            t = (str(row["customer"]), str(row["channel"]))
            if row["op"] == "ack":
                out[t] = max(out.get(t, 0), int(row["seq"]))
    return out


async def run_publisher(targets: Sequence[tuple[str, int]], identity: NodeIdentity,
                        history: Path, topics: Sequence[Topic], count: int, *, seed: int = 1,
                        size: int = 64, batch: int = 10, pace: float = 0.0,
                        retry_delay: float = 0.2) -> int:
    """Publish until every topic has ``count`` acked frames, failing over along
    ``targets`` (host, port) when a request fails; returns frames acked now."""
    acked: dict[Topic, int] = dict.fromkeys(topics, 0)
    for t, seq in _acked_before(history).items():
        if t in acked:
            acked[t] = seq
    log = HistoryWriter(history)
    retry, done = True, 0  # first request after a (re)start may repeat frames on the bus
    client: PublisherClient | None = None
    at = 0  # the target in use; the next one after a failure
    try:
        while any(v < count for v in acked.values()):
            if client is None:
                host, port = targets[at % len(targets)]
                try:
                    client = await PublisherClient.connect(host, port, identity)
                except (PqcnetError, OSError):
                    at += 1
                    await asyncio.sleep(retry_delay)
                    continue
            frames = [Frame(c, ch, s, payload_for(seed, c, ch, s, size))
                      for (c, ch) in topics
                      for s in range(acked[(c, ch)] + 1, min(acked[(c, ch)] + batch, count) + 1)]
            log.record("publish", frames)
            try:
                async with asyncio.timeout(PUBLISH_TIMEOUT):
                    results = await client.publish(frames, retry=retry)
            except (PqcnetError, TimeoutError, OSError):
                with contextlib.suppress(PqcnetError, OSError):
                    await client.close()
                client, retry = None, True
                at += 1
                await asyncio.sleep(retry_delay)
                continue
            retry = False
            ok = [f for f, r in zip(frames, results) if r.accepted]
            log.record("ack", ok)
            for f in ok:
                acked[f.topic] = max(acked[f.topic], f.seq)
            done += len(ok)
            refused = [(f, r) for f, r in zip(frames, results) if not r.accepted]
            if refused:
                final = [f for f, r in refused if not r.retriable]
                if final:  # nothing here should be refused for good: record and stop
                    log.record("refused", final)
                    raise PqcnetError(f"relayer refused seq {final[0].seq}: "
                                      f"{refused[0][1].reason}")
                retry = True
                await asyncio.sleep(retry_delay)
            elif pace:
                await asyncio.sleep(pace)
    finally:
        log.close()
        if client is not None:
            with contextlib.suppress(PqcnetError, OSError):
                await client.close()
    return done


async def run_subscriber(targets: Sequence[tuple[str, int]], identity: NodeIdentity,
                         journal: Path, customer: str, *, until: int = 0) -> int:
    """Take frames into ``journal`` (history and cursor) until ``until`` frames are in
    it (0: forever); returns frames taken by this run. Several ``targets`` are a
    cluster: each relayer delivers the shards it owns, so all are listened to."""
    cursor = JournalCursor(journal)
    total = sum(cursor.load().values())  # seqs start at 1 and are taken in order
    taken = 0
    sub: ResumingSubscriber | ClusterSubscriber = (
        ResumingSubscriber(list(targets), identity, customer, cursor=cursor)
        if len(targets) == 1 else ClusterSubscriber(targets, identity, customer, cursor=cursor))
    try:
        async for batch in sub.batches():
            taken += len(batch)  # committed to the journal when the next batch is asked
            if until and total + taken >= until:
                await sub.ack()
                break
    finally:
        await sub.close()
        cursor.close()
    return taken
