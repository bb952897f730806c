"""One fetch loop per Kafka consumer, feeding per-shard buffers that wake only their worker.

Why: each of the 32 shard workers used to call ``consumer.getmany(tp)`` for its own
partition. aiokafka wakes *every* waiting ``getmany`` when any partition's records
arrive (one shared future), so each fetch response woke all 32 workers, each scanned the
fetcher's results, found nothing of its own and waited again: ≈ 10 ``getmany`` rounds and
≈ 1.1 ms of relayer CPU per one-frame publish (``pqcnet bench relayer --backend kafka``,
paced). Now one task calls ``getmany()`` for every assigned partition and appends each
partition's records to its shard's buffer, resolving only that shard's waiters.

What it keeps from the direct calls:

* **Position.** aiokafka advances a partition's position when it hands records out, and
  drops fetched-but-undelivered results when the position moves (``seek``) or the
  partition is paused. The buffer is the only new place records sit: :meth:`drop`
  (called with no ``await`` before a ``seek``, and on revoke) clears it, so nothing fetched
  before a rewind is handed out after it.
* **Bounds.** A shard's buffer holds at most :data:`MAX_BUFFERED` records /
  :data:`MAX_BUFFERED_BYTES`; past either the partition is paused (aiokafka stops
  fetching it) until its worker has taken half.
* **Errors.** A failed ``getmany`` is handed, once, to the next ``take`` of every shard
  that was assigned then (each worker resets to its durable state, as when its own call
  failed); the loop backs off and fetches again.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition

from pqcnet._util.tasks import cancel_and_wait
from pqcnet.relayer.bus.base import Delivery, Wakeups

log = logging.getLogger(__name__)

#: records one ``getmany`` of the loop takes at most (all partitions together)
FETCH_RECORDS = 4096
#: records buffered per shard before its partition is paused
MAX_BUFFERED = 4096
#: bytes of record values buffered per shard before its partition is paused
MAX_BUFFERED_BYTES = 8 << 20
#: seconds the loop waits after a failed fetch
ERROR_BACKOFF = 0.2


class PartitionPump:
    """The fetch loop of one consumer and its per-shard buffers."""

    def __init__(self, consumer: AIOKafkaConsumer, topic: str,
                 shards: Callable[[], set[int]]) -> None:
        self.consumer, self.topic = consumer, topic
        #: the shards whose records may be buffered now (assigned, not being revoked)
        self._shards = shards
        self._buf: dict[int, deque[Delivery]] = {}
        self._bytes: dict[int, int] = {}
        self._wakeups = Wakeups()
        self._paused: set[int] = set()
        self._failed: dict[int, BaseException] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                name="kafka-pump")

    async def close(self) -> None:
        try:
            await cancel_and_wait(self._task)
        finally:  # workers waiting on a shard are woken even when this is cancelled
            self._task = None
            self._wakeups.wake_all()

    # ------------------------------------------------------------------ worker side
    def take(self, shard: int, max_records: int) -> list[Delivery]:
        """Up to ``max_records`` buffered records of ``shard``, in offset order; raises
        the loop's error once if a fetch failed while ``shard`` was assigned."""
        err = self._failed.pop(shard, None)
        if err is not None:  # one error for every shard: each raise starts a new traceback
            raise err.with_traceback(None)
        buf = self._buf.get(shard)
        if not buf:
            return []
        n = min(max_records, len(buf))
        out = [buf.popleft() for _ in range(n)]
        self._bytes[shard] -= sum(len(d.data) for d in out)
        if shard in self._paused and (len(buf) <= MAX_BUFFERED // 2
                                      and self._bytes[shard] <= MAX_BUFFERED_BYTES // 2):
            self._resume(shard)
        return out

    def ready(self, shard: int) -> bool:
        """Something to :meth:`take` (records or an error)."""
        return bool(self._buf.get(shard)) or shard in self._failed

    async def wait(self, shard: int, block: float) -> None:
        """Until records (or an error) for ``shard`` arrive, or ``block`` seconds."""
        if not self.ready(shard):
            await self._wakeups.wait(shard, block)

    def interrupt(self, shard: int) -> None:
        """End a :meth:`wait` of ``shard`` now (the worker has something else to do)."""
        self._wakeups.wake(shard)

    def drop(self, shard: int) -> None:
        """Forget what is buffered for ``shard`` (before a seek, on revoke) and fetch it
        again if it was paused. Call with no ``await`` between this and the seek."""
        self._buf.pop(shard, None)
        self._bytes.pop(shard, None)
        self._failed.pop(shard, None)
        if shard in self._paused:
            self._resume(shard)
        self._wakeups.wake(shard)

    def buffered(self, shard: int | None = None) -> int:
        """Records buffered for ``shard`` (None: over all shards)."""
        if shard is not None:
            return len(self._buf.get(shard, ()))
        return sum(len(b) for b in self._buf.values())

    # ------------------------------------------------------------------ the loop
    async def _run(self) -> None:
        while True:
            try:
                got = await self.consumer.getmany(timeout_ms=500, max_records=FETCH_RECORDS)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the loop must outlive any one failure
                # (a dead loop would leave every shard worker waiting on an empty buffer)
                log.warning("kafka fetch failed", extra={"error": repr(exc)})
                error = exc.with_traceback(None)  # its frame would hold this task's
                for shard in self._shards():
                    self._failed[shard] = error
                    self._wakeups.wake(shard)
                await asyncio.sleep(ERROR_BACKOFF)
                continue
            mine = self._shards()
            for tp, records in got.items():
                shard = tp.partition
                if tp.topic != self.topic or shard not in mine or not records:
                    continue  # revoked meanwhile: the next owner reads from the commit
                buf = self._buf.get(shard)
                if buf is None:
                    buf = self._buf[shard] = deque()
                    self._bytes[shard] = 0
                buf.extend(Delivery(shard, int(r.offset), r.value or b"") for r in records)
                self._bytes[shard] += sum(len(r.value or b"") for r in records)
                if len(buf) >= MAX_BUFFERED or self._bytes[shard] >= MAX_BUFFERED_BYTES:
                    self.consumer.pause(TopicPartition(self.topic, shard))
                    self._paused.add(shard)
                self._wakeups.wake(shard)

    def _resume(self, shard: int) -> None:
        self._paused.discard(shard)
        tp = TopicPartition(self.topic, shard)
        if tp in self.consumer.assignment():
            self.consumer.resume(tp)
