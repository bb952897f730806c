"""QS-DAG sync over the control plane: the part of the agent that converges ledgers.

Every ``dag_sync_interval_ms`` a node publishes its tips; a node that sees tips it
does not know pulls (sending its own tips, sealed to the holder's inbox); the holder
answers with the vertices the puller lacks, parents first, in ``dag_chunk``-sized
DAG_VERTICES messages sealed to the puller's inbox (keeping each under the Waku
message size limit). Imports go through the :class:`~pqcnet.mesh.ledger.LedgerPort`, which
verifies every vertex; a bad one is skipped and counted, never fatal.

Mixed into :class:`~pqcnet.mesh.agent.ControlPlaneAgent`, which provides the attributes
declared below.
"""

from __future__ import annotations

from abc import abstractmethod
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from pqcnet.mesh.envelope import EnvelopeSigner, MessageType
from pqcnet.mesh.errors import WakuError
from pqcnet.mesh.ledger import LedgerPort
from pqcnet.mesh.messages import DagPull, DagTips, DagVertices
from pqcnet.mesh.peers import PeerTable
from pqcnet.mesh.transport import Transport

if TYPE_CHECKING:
    from pqcnet.mesh.agent import AgentConfig


class DagSyncMixin:
    """Tips, pulls and vertex chunks."""

    config: AgentConfig
    transport: Transport
    ledger: LedgerPort | None
    clock: Callable[[], int]
    signer: EnvelopeSigner
    peers: PeerTable
    events: Counter[str]
    topics: dict[str, str]
    _last_tips: int

    @property
    @abstractmethod
    def node_id(self) -> str:
        """This node's id (provided by the agent)."""

    @abstractmethod
    def _inbox(self, node_id: str) -> str:
        """The content topic of ``node_id``'s sealed inbox (provided by the agent)."""

    @abstractmethod
    async def _publish(self, topic: str, type_: MessageType, body: bytes) -> None:
        """Sign and publish one control message (provided by the agent)."""

    async def publish_tips(self) -> None:
        """Tell the mesh what our ledger's tips are."""
        if self.ledger is None:
            return
        self._last_tips = self.clock()
        tips = DagTips(tuple(self.ledger.tips()), self.ledger.vertex_count())
        try:
            await self._publish(self.topics["dagsync"], MessageType.DAG_TIPS, tips.encode())
        except WakuError:
            self.events["publish_failed"] += 1

    async def _to_inbox(self, dest: str, type_: MessageType, body: bytes) -> None:
        peer = self.peers.get(dest)
        if peer is None or peer.announcement.seal_key is None:
            self.events["no_route_to_peer"] += 1
            return
        wire = self.signer.wire(type_, body, now_ms=self.clock(), to=peer.announcement.seal_key)
        await self.transport.publish(self._inbox(dest), wire)

    async def _on_tips(self, tips: DagTips, sender: str) -> None:
        assert self.ledger is not None
        if all(self.ledger.knows(t) for t in tips.tips):
            return
        pull = DagPull(self.node_id, (), tuple(self.ledger.tips()))
        await self._to_inbox(sender, MessageType.DAG_PULL, pull.encode())

    async def _on_pull(self, pull: DagPull, sender: str) -> None:
        assert self.ledger is not None
        blobs = self.ledger.export_for(pull.have_tips, self.config.dag_chunk * 64)
        chunk = self.config.dag_chunk
        for i in range(0, len(blobs), chunk):
            part = DagVertices(sender, tuple(blobs[i:i + chunk]), more=i + chunk < len(blobs))
            await self._to_inbox(sender, MessageType.DAG_VERTICES, part.encode())

    async def _on_vertices(self, vs: DagVertices, sender: str) -> None:
        assert self.ledger is not None
        blobs = [b for b in vs.vertices]
        new = self.ledger.import_vertices(blobs)
        self.events["dag_vertices_imported"] += new
        if not vs.more:
            self.events["dag_sync_rounds"] += 1
            # pick up anything added meanwhile: the sender's next tips will trigger a pull
