"""QS-DAG sync over the control plane: the part of the agent that converges ledgers.

Every ``dag_sync_interval_ms`` a node publishes its tips; a node that sees tips it
does not know (from a sender in ``dag_pull_from``, when that is set, and whose ledger
has the same genesis — tips carry it) pulls (sending its own tips, sealed to the
holder's inbox); the holder answers with the vertices the
puller lacks, parents first, in ``dag_chunk``-sized DAG_VERTICES messages sealed to the
puller's inbox (keeping each under the Waku message size limit). Imports go through
the :class:`~pqcnet.mesh.ledger.LedgerPort`, which verifies every vertex; a bad one is
skipped and counted, never fatal.

:class:`DagSync` is owned by :class:`~pqcnet.mesh.agent.ControlPlaneAgent` (one per
attached ledger) and gets everything it uses in its constructor; it is driven by
:meth:`DagSync.handle` for the three DAG message types and by :meth:`DagSync.due` /
:meth:`DagSync.publish_tips` from the agent's housekeeping. It can run without an
agent: anything that verifies envelopes and calls ``handle`` drives it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from pqcnet.mesh.config import AgentConfig
from pqcnet.mesh.envelope import ControlMessage, MessageType
from pqcnet.mesh.errors import WakuError
from pqcnet.mesh.ledger import LedgerPort
from pqcnet.mesh.messages import DagPull, DagTips, DagVertices
from pqcnet.mesh.metrics import DAG_SYNC
from pqcnet.mesh.peers import PeerTable
from pqcnet.mesh.publisher import Publisher

#: The control messages :meth:`DagSync.handle` takes.
DAG_MESSAGES = frozenset({MessageType.DAG_TIPS, MessageType.DAG_PULL, MessageType.DAG_VERTICES})


class DagSync:
    """Tips, pulls and vertex chunks for one ledger."""

    def __init__(self, ledger: LedgerPort, publisher: Publisher, peers: PeerTable,
                 config: AgentConfig, clock: Callable[[], int], events: Counter[str]) -> None:
        self.ledger = ledger
        self.publisher = publisher
        self.peers = peers
        self.config = config
        self.clock = clock
        self.events = events
        #: when our tips were last published (ms, ``clock``)
        self.last_tips_ms = 0

    def _count(self, event: str, n: int = 1) -> None:
        """The agent's event counter and ``pqcnet_mesh_dag_sync_events_total``."""
        if n:
            self.events[event] += n
            DAG_SYNC.labels(event).inc(n)

    def due(self, now_ms: int) -> bool:
        """Is it time to publish our tips again?"""
        interval = self.config.dag_sync_interval_ms
        return bool(interval) and now_ms - self.last_tips_ms >= interval

    async def publish_tips(self) -> None:
        """Tell the mesh what our ledger's tips are."""
        self.last_tips_ms = self.clock()
        tips = DagTips(tuple(self.ledger.tips()), self.ledger.vertex_count(),
                       self.ledger.genesis_id() or b"")
        try:
            await self.publisher.publish(self.publisher.topics["dagsync"], MessageType.DAG_TIPS,
                                         tips.encode())
        except WakuError:
            self._count("publish_failed")

    async def handle(self, msg: ControlMessage) -> None:
        """Act on one verified DAG_TIPS, DAG_PULL or DAG_VERTICES message."""
        if msg.type is MessageType.DAG_TIPS:
            await self._on_tips(DagTips.decode(msg.body), msg.sender)
        elif msg.type is MessageType.DAG_PULL:
            await self._on_pull(DagPull.decode(msg.body), msg.sender)
        elif msg.type is MessageType.DAG_VERTICES:
            await self._on_vertices(DagVertices.decode(msg.body))

    async def _to_inbox(self, dest: str, type_: MessageType, body: bytes) -> None:
        peer = self.peers.get(dest)
        if peer is None or peer.announcement.seal_key is None:
            self._count("no_route_to_peer")
            return
        await self.publisher.send_sealed(dest, peer.announcement.seal_key, type_, body)

    async def _on_tips(self, tips: DagTips, sender: str) -> None:
        allowed = self.config.dag_pull_from
        if allowed is not None and sender not in allowed:
            self._count("dag_tips_not_pulled")
            return
        if all(self.ledger.knows(t) for t in tips.tips):
            return
        ours = self.ledger.genesis_id()
        if tips.genesis and ours and tips.genesis != ours:
            # another network's ledger (or a node with its own dev genesis): every vertex
            # of it would be refused as an unknown author — do not pull it at all
            self._count("dag_tips_foreign_genesis")
            return
        pull = DagPull(self.publisher.node_id, (), tuple(self.ledger.tips()))
        await self._to_inbox(sender, MessageType.DAG_PULL, pull.encode())

    async def _on_pull(self, pull: DagPull, sender: str) -> None:
        blobs = self.ledger.export_for(pull.have_tips, self.config.dag_chunk * 64)
        chunk = self.config.dag_chunk
        for i in range(0, len(blobs), chunk):
            part = DagVertices(sender, tuple(blobs[i:i + chunk]), more=i + chunk < len(blobs))
            await self._to_inbox(sender, MessageType.DAG_VERTICES, part.encode())

    async def _on_vertices(self, vs: DagVertices) -> None:
        new = self.ledger.import_vertices(list(vs.vertices))
        self._count("dag_vertices_imported", new)
        if not vs.more:
            # the sender's next tips will trigger a pull for anything added meanwhile
            self._count("dag_sync_rounds")
