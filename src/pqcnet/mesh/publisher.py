"""The agent's one way out: sign control messages as this node and publish them.

The agent and its parts (gossip, DAG sync) all send through one :class:`Publisher`,
so the envelope signer (and its counter), the transport and the topic naming are
shared by construction instead of being reached for on the agent.

With a :class:`~pqcnet.mesh.offload.CryptoPool` the signing and sealing of
:meth:`Publisher.publish`, :meth:`~Publisher.send_sealed` and :meth:`~Publisher.forward`
run on its threads, off the event loop; the counter is still taken on the loop at the
call (:meth:`~pqcnet.mesh.envelope.EnvelopeSigner.reserve`), so counters follow the
order of the calls. Without one (the default; the simulations need a deterministic
loop) everything runs inline.

A publish with no other publish in progress signs inline even with a pool
(``inline_when_alone``): overlapping pays only when there is something to overlap
with, and a thread hop is not free — the worker waits for the GIL (up to the 5 ms
switch interval while the loop runs Python) and the loop is woken again afterwards.
Measured with ``pqcnet bench mesh`` under load: paced (one message at a time) p50
+2 to +3 ms through the threads, +0 inline.
"""

from __future__ import annotations

from collections.abc import Callable

from pqcnet.crypto.pqc import RecipientPublicKey
from pqcnet.mesh import metrics
from pqcnet.mesh.envelope import EnvelopeSigner, MessageType, now_ms, wrap
from pqcnet.mesh.offload import CryptoPool
from pqcnet.mesh.transport import Transport, inbox_topic, topic_map

_ON_LOOP = metrics.ENVELOPE_JOBS.labels("loop")
_ON_POOL = metrics.ENVELOPE_JOBS.labels("pool")


class Publisher:
    """Signs with ``signer``, stamps with ``clock``, publishes on ``transport``."""

    def __init__(self, transport: Transport, signer: EnvelopeSigner, *, namespace: str = "",
                 clock: Callable[[], int] = now_ms, crypto: CryptoPool | None = None,
                 inline_when_alone: bool = True) -> None:
        self.transport = transport
        self.signer = signer
        self.namespace = namespace
        self.clock = clock
        #: where signing and sealing run (None: inline, on the loop)
        self.crypto = crypto
        self.inline_when_alone = inline_when_alone
        #: publishes between their call and the transport's answer
        self.in_progress = 0
        #: envelopes signed (or sealed) inline although a pool was given
        self.inline_alone = 0
        #: the standard content topics of this mesh (namespace applied)
        self.topics = topic_map(namespace)

    @property
    def node_id(self) -> str:
        return self.signer.keys.node_id

    def inbox(self, node_id: str) -> str:
        """The content topic of ``node_id``'s sealed inbox."""
        return inbox_topic(node_id, self.namespace)

    async def sign(self, type_: MessageType, body: bytes) -> bytes:
        """A signed envelope, not yet on the wire (gossip wraps it once per peer); signed
        where publishes are (the counter taken now, as for them)."""
        unsigned = self.signer.reserve(type_, body, now_ms=self.clock())
        self.in_progress += 1
        try:
            return await self._run(unsigned.sign)
        finally:
            self.in_progress -= 1

    async def _run(self, job: Callable[[], bytes]) -> bytes:
        """``job`` inline or on the pool (see module); call with ``in_progress`` counted."""
        if self.crypto is None:
            _ON_LOOP.inc()
            return job()
        if self.inline_when_alone and self.in_progress == 1:
            self.inline_alone += 1
            _ON_LOOP.inc()
            return job()
        out = await self.crypto.run(job)
        _ON_POOL.inc()
        return out

    async def _send(self, topic: str, job: Callable[[], bytes]) -> None:
        self.in_progress += 1
        try:
            wire = await self._run(job)
            await self.transport.publish(topic, wire)
        finally:
            self.in_progress -= 1

    async def publish(self, topic: str, type_: MessageType, body: bytes) -> None:
        """Sign ``body`` and publish it, in the clear, on ``topic``."""
        unsigned = self.signer.reserve(type_, body, now_ms=self.clock())
        await self._send(topic, unsigned.wire)

    async def send_sealed(self, dest: str, seal_key: RecipientPublicKey, type_: MessageType,
                          body: bytes) -> None:
        """Sign ``body`` for ``dest`` and publish it sealed to its inbox."""
        unsigned = self.signer.reserve(type_, body, now_ms=self.clock(), to=seal_key)
        await self._send(self.inbox(dest), lambda: unsigned.wire(seal_key))

    async def forward(self, dest: str, seal_key: RecipientPublicKey, signed: bytes, *,
                      hops: int) -> None:
        """Publish an already signed envelope sealed to ``dest``'s inbox."""
        await self._send(self.inbox(dest), lambda: wrap(signed, to=seal_key, hops=hops))
