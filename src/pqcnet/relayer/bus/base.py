"""The one seam between the relayer and its message bus.

Every backend (embedded RocksDB log, Redis Streams, Kafka) implements :class:`Bus`;
everything above it (ingress, overflow, shard workers, backpressure) is written
against this interface only, and is tested against the embedded backend — a real
implementation, not a mock.

Semantics every backend keeps:

* ``publish(shard, records)`` (``publish_many`` for several shards) returns only
  once the records are durable in the backend's own terms (RocksDB WAL, Redis
  AOF, Kafka acks=all); ``publish`` returns one offset per record, in order.
* ``consume(shard, group)`` returns records not yet acknowledged by ``group``; a
  record is redelivered after a restart until it is acked (at-least-once; the shard
  worker turns this into exactly-once with its sequence window).
* ``ack(shard, group, deliveries)`` acknowledges a *prefix* of what was consumed:
  the worker never acks a record while an earlier one is still held, so cursor
  backends (RocksDB, Kafka) may commit ``max(offset)+1``.
* ``lag(shard, group)`` counts records published but not yet acked by ``group``.
* ``caught_up(shard, group)`` is False from a ``rewind`` (a worker's reset: a start, a
  restart, a shard taken over) until ``consume`` has handed out every record that was in
  the shard at that moment. Until then a missing seq may be a frame acknowledged before
  the reset and still ahead in the log, so the worker skips no gap (decision 0023).

Two hooks let the relayer node treat every backend alike (no ``isinstance``):
``seq_store()`` offers a home for the shard workers' dedup marks next to the log
(Redis keeps them on the same server; the others return None and the node uses
local RocksDB), and ``compact(shard, groups)`` drops what every group acked
(the embedded log; Redis trims on ack and Kafka by retention, so they do nothing).
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pqcnet.relayer.errors import RelayerError

if TYPE_CHECKING:  # the store module builds on the embedded bus; types only here
    from pqcnet.relayer.seqstore import SeqStore, StreamAck

Offset = int | str
"""Integer log offset (embedded, Kafka) or Redis stream entry id."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One record handed to a consumer."""

    #: shard (partition / stream) it came from
    shard: int
    #: its durable position in that shard
    offset: Offset
    #: the encoded record (see :mod:`pqcnet.relayer.frame`)
    data: bytes


class Bus(abc.ABC):
    """Partitioned durable log with consumer groups."""

    #: backend name as used in config (``embedded``, ``redis``, ``kafka``)
    name: str = "bus"
    #: True when :meth:`publish_many` writes every shard's records in one go, with one
    #: outcome for all of them (the embedded log: one atomic RocksDB write; Redis: one
    #: pipeline; Kafka: one produce request per broker): the overflow publisher then
    #: group-commits whole ingress requests across shards instead of one write per shard
    batched_shards: bool = False
    #: called with (gained, lost) shards at each step of a cluster's assignment change
    #: as its protocol makes it (Kafka's eager rebalance: every partition revoked, then
    #: the new set assigned; the node journals these; Kafka also at close, every
    #: partition still held as lost); backends whose assignment never changes never
    #: call it
    on_assignment: Callable[[set[int], set[int]], None] | None = None
    #: called with (came, went) shards once a change is settled: shards this member
    #: reads now and did not before, and shards another member (or none) reads from now
    #: on. A Redis lease change is settled at once, a Kafka rebalance at its assign step
    #: (a partition revoked and handed straight back neither came nor went). The node's
    #: gap fence follows it: what this process registered in flight for a shard that
    #: went is dropped, a shard that came gets its queued frames registered
    on_moved: Callable[[set[int], set[int]], None] | None = None
    #: entries taken from a former owner's pending list that it read after its lease
    #: ran out (the Redis cluster sweep); 0 on backends without such a sweep
    stale_claimed: int = 0
    #: entries taken over from other members' pending lists when this one began
    #: reading a shard (Redis: XAUTOCLAIM after a claim or restart — the work a dead or
    #: departed owner read and never acknowledged); 0 where the bus moves partitions
    #: with their committed offsets instead (Kafka)
    taken_over: int = 0
    #: reads and claims refused because this member no longer held the shard (Redis:
    #: its lease was gone, decision 0024; Kafka with shared marks: a newer group
    #: generation held the partition, decision 0025); 0 on the embedded backend
    fenced_out: int = 0

    @abc.abstractmethod
    def partitions(self) -> int:
        """Number of shards."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect / create topics; idempotent."""

    @abc.abstractmethod
    async def publish(self, shard: int, records: Sequence[bytes]) -> list[Offset]:
        """Durably append ``records`` to ``shard``; one offset per record."""

    async def publish_many(self, batches: Mapping[int, Sequence[bytes]]) -> None:
        """:meth:`publish` of each shard's records (all or nothing only where
        :attr:`batched_shards`; here one publish per shard, concurrently)."""
        await asyncio.gather(*(self.publish(s, r) for s, r in batches.items() if r))

    @abc.abstractmethod
    async def consume(
        self, shard: int, group: str, *, max_records: int = 512, block: float = 0.5
    ) -> list[Delivery]:
        """Up to ``max_records`` unacked records, waiting up to ``block`` s for the first."""

    def interrupt(self, shard: int) -> None:  # noqa: B027 - optional hook
        """End a :meth:`consume` of ``shard`` that is waiting now: it returns at once
        (with what it has, maybe nothing) instead of at ``block``. For a worker that has
        something else to do — a subscriber came for a topic it parked. Best effort:
        a wait that cannot be ended safely keeps its timeout (never cancel a read that
        may be delivering: Redis ends ``XREADGROUP BLOCK`` with ``CLIENT UNBLOCK``,
        which Redis applies atomically, never by cancelling the call)."""

    @abc.abstractmethod
    async def ack(self, shard: int, group: str, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge a consumed prefix; acked records are never redelivered."""

    def ack_in_store(self, shard: int, group: str, deliveries: Sequence[Delivery],
                     store: SeqStore) -> StreamAck | None:
        """The acknowledgement of ``deliveries`` as a write ``store`` makes together with
        the batch's marks (:meth:`SeqStore.save`'s ``ack``), or None: then :meth:`ack`
        after the save. Only a store on the bus's own server can (the Redis bus's)."""
        return None

    async def acked(self, shard: int, ack: StreamAck) -> None:  # noqa: B027 - optional
        """After a save that carried ``ack`` (:meth:`ack_in_store`): what :meth:`ack`
        does once the bus has the acknowledgement (bookkeeping, trimming)."""

    @abc.abstractmethod
    async def lag(self, shard: int, group: str) -> int:
        """Records in ``shard`` not yet acked by ``group``."""

    async def lags(self, shards: Iterable[int], group: str) -> dict[int, int]:
        """:meth:`lag` of each of ``shards`` (the backpressure sample, every
        ``backpressure_interval``); a shard whose lag could not be had is left out.
        A networked bus asks for them all in one round trip (and may define its
        :meth:`lag` through this, as Redis and Kafka do)."""
        order = list(shards)
        got = await asyncio.gather(*(self.lag(s, group) for s in order),
                                   return_exceptions=True)
        for g in got:
            if isinstance(g, BaseException) and not isinstance(g, RelayerError):
                raise g  # a bug, not a bus that did not answer
        return {s: g for s, g in zip(order, got, strict=True) if isinstance(g, int)}

    @abc.abstractmethod
    async def rewind(self, shard: int, group: str) -> None:
        """Forget in-flight reads: the next consume restarts at the first unacked record;
        the end of the shard's log now becomes what :meth:`caught_up` waits for."""

    def caught_up(self, shard: int, group: str) -> bool:
        """Whether ``consume`` has handed out (since the last :meth:`rewind`) the records
        up to the end the log had at that rewind, or found nothing left to read. Cheap:
        the worker asks every step. True on a backend that keeps no such end."""
        return True

    def assignment(self) -> list[int]:
        """Shards this relayer works on right now (a cluster's bus: those its group
        protocol or its leases gave it; otherwise all)."""
        return list(range(self.partitions()))

    def owns(self, shard: int) -> bool:
        """Whether :meth:`consume` of ``shard`` hands out records here now (cheap: the
        gap fence asks per request)."""
        return True

    def in_assignment(self, shard: int) -> bool:
        """Whether ``shard`` is this member's until an ownership change says otherwise.
        Unlike :meth:`owns` it is not bounded by time: a Redis lease whose validity ran
        out before the next renewal round (a stalled loop, a slow Redis) is not owned
        for a moment, but still assigned — the round either renews it (it never lapsed)
        or reports the loss. The gap fence's in-flight registry follows this, because
        every end of an assignment is reported to it."""
        return self.owns(shard)

    def seq_store(self) -> SeqStore | None:
        """A dedup-mark / volume store living with this backend, or None (the node keeps
        them in local RocksDB)."""
        return None

    async def compact(self, shard: int, groups: Sequence[str]) -> None:  # noqa: B027
        """Drop records of ``shard`` that every one of ``groups`` has acked (a no-op for
        backends that trim by themselves)."""

    async def healthy(self) -> bool:
        """Cheap liveness probe used by the overflow replayer."""
        return True

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections; pending operations fail with :class:`BusError`."""

    def check_shard(self, shard: int) -> None:
        """Raise ``ValueError`` for a shard outside ``0..partitions()-1`` (a caller bug)."""
        if not 0 <= shard < self.partitions():
            raise ValueError(f"shard {shard} outside 0..{self.partitions() - 1}")


class Wakeups:
    """Consumers blocked per shard, woken by the next arrival, :meth:`wake_all` or their
    timeout: a bare future and a timer per wait (``asyncio.wait_for`` wraps each wait in
    a task, several loop rounds per idle shard worker's wake-up)."""

    def __init__(self) -> None:
        self._waiters: dict[int, list[asyncio.Future[None]]] = {}

    def wake(self, shard: int) -> None:
        waiters = self._waiters.get(shard)
        if waiters:
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
            waiters.clear()

    def wake_all(self) -> None:
        for shard in list(self._waiters):
            self.wake(shard)

    async def wait(self, shard: int, block: float) -> None:
        """Until the next :meth:`wake` of ``shard`` (or all), or ``block`` seconds."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        waiters = self._waiters.setdefault(shard, [])
        waiters.append(fut)
        timer = loop.call_later(block, _resolve, fut)
        try:
            await fut
        finally:
            timer.cancel()
            if not fut.done():  # cancelled by our caller: forget it
                fut.cancel()
            if fut in waiters:
                waiters.remove(fut)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
