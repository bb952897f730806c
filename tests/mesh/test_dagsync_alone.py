"""DagSync without an agent: two real ledgers, the in-process transport, real envelopes.

The test plays the agent's receive loop (verify the envelope, hand DAG messages to
``DagSync.handle``), so what is checked is the sync part alone: one tips → pull →
chunked vertices round, the chunking, the counters, the refusals.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from pqcnet.mesh.config import AgentConfig
from pqcnet.mesh.dagsync import DagSync
from pqcnet.mesh.envelope import (
    ControlMessage,
    EnvelopeSigner,
    EnvelopeVerifier,
    Keyring,
    MessageType,
    NodeKeys,
    now_ms,
)
from pqcnet.mesh.messages import Announcement, DagTips, DagVertices
from pqcnet.mesh.peers import PeerTable
from pqcnet.mesh.publisher import Publisher
from pqcnet.mesh.qsdag_port import QsdagPort
from pqcnet.mesh.transport import InProcessHub, InProcessTransport, Subscription
from pqcnet.qsdag import Ledger, Route, VertexKind

from .harness import node_key

pytestmark = pytest.mark.timeout(60)

CHUNK = 2


@dataclass
class Side:
    """One node's DagSync and the few things an agent would hold around it."""

    keys: NodeKeys
    ledger: Ledger
    port: QsdagPort
    transport: InProcessTransport
    verifier: EnvelopeVerifier
    peers: PeerTable
    events: Counter[str]
    sync: DagSync
    sub: Subscription | None = None

    async def pump(self) -> list[ControlMessage]:
        """Handle every message waiting for us (the in-process hub delivers at publish
        time, so what is queued is all there is); returns them."""
        assert self.sub is not None
        handled = []
        while self.sub.pending:
            msg = self.verifier.accept((await self.sub.get()).payload, now_ms())
            if msg is None or msg.sender == self.keys.node_id:
                continue
            await self.sync.handle(msg)
            handled.append(msg)
        return handled


def side(name: str, ledger: Ledger, hub: InProcessHub, names: list[str]) -> Side:
    keys = NodeKeys(name, node_key(name))
    ring = Keyring()
    for n in names:
        ring.add(n, node_key(n).public_key, 1)
    transport = InProcessTransport(hub)
    port = QsdagPort(ledger, keys)
    peers, events = PeerTable(), Counter[str]()
    sync = DagSync(port, Publisher(transport, EnvelopeSigner(keys)), peers,
                   AgentConfig(dag_chunk=CHUNK, dag_sync_interval_ms=200), now_ms, events)
    return Side(keys, ledger, port, transport, EnvelopeVerifier(ring, [keys.recipient_key]),
                peers, events, sync)


def meet(a: Side, b: Side) -> None:
    """Each learns the other's seal key, as from an announcement."""
    for x, y in ((a, b), (b, a)):
        x.peers.observe(Announcement(y.keys.node_id, "node",
                                     seal_key=y.keys.recipient_key.public), now_ms())


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Side, Side]]:
    names = ["gov", "n1"]
    held = Ledger.open(tmp_path / "gov")
    held.init_genesis("pqcnet-test", "gov", node_key("gov"))
    held.register_author("n1", node_key("n1").public_key, registrar="gov",
                         signer=node_key("gov"))
    for i in range(4):
        held.append(VertexKind.ROUTE, Route(f"t{i}", "gov"), "gov", node_key("gov"))
    empty = Ledger.open(tmp_path / "n1")
    hub = InProcessHub()
    yield side("gov", held, hub, names), side("n1", empty, hub, names)
    held.close()
    empty.close()


async def subscribe(*sides: Side) -> None:
    for s in sides:
        pub = s.sync.publisher
        s.sub = await s.transport.subscribe([pub.topics["dagsync"], pub.inbox(s.keys.node_id)])


async def test_one_round_tips_pull_chunks(pair: tuple[Side, Side]) -> None:
    holder, puller = pair
    meet(holder, puller)
    await subscribe(holder, puller)
    n = len(holder.ledger)
    await holder.sync.publish_tips()
    assert [m.type for m in await puller.pump()] == [MessageType.DAG_TIPS]
    pulls = await holder.pump()
    assert [(m.type, m.sealed) for m in pulls] == [(MessageType.DAG_PULL, True)]
    chunks = await puller.pump()
    parts = [DagVertices.decode(m.body) for m in chunks]
    assert [len(p.vertices) for p in parts] == [CHUNK] * (n // CHUNK) + (
        [n % CHUNK] if n % CHUNK else [])
    assert [p.more for p in parts] == [True] * (len(parts) - 1) + [False]
    assert set(puller.ledger.ids()) == set(holder.ledger.ids())
    assert puller.events == Counter({"dag_vertices_imported": n, "dag_sync_rounds": 1})
    # in sync now: the holder's tips start no new pull
    await holder.sync.publish_tips()
    await puller.pump()
    assert await holder.pump() == []


async def test_bad_vertices_are_skipped_and_counted(pair: tuple[Side, Side]) -> None:
    holder, puller = pair
    meet(holder, puller)
    await subscribe(puller)
    good = [v.encode() for v in holder.ledger.export(holder.ledger.tips())]
    scraped = _refused_samples()
    await holder.sync.publisher.send_sealed(
        "n1", puller.keys.recipient_key.public, MessageType.DAG_VERTICES,
        DagVertices("n1", (b"\x00garbage", *good)).encode())
    await puller.pump()
    assert puller.events["dag_vertices_imported"] == len(good)
    assert puller.port.refused["malformed"] == 1
    # and exported for the ledger-verify alert (pqcnet_mesh_dag_refused_vertices_total)
    assert _refused_samples() - scraped == 1


def _sync_samples(event: str) -> float:
    return REGISTRY.get_sample_value("pqcnet_mesh_dag_sync_events_total",
                                     {"event": event}) or 0.0


def _refused_samples() -> float:
    return REGISTRY.get_sample_value("pqcnet_mesh_dag_refused_vertices_total",
                                     {"reason": "malformed"}) or 0.0


async def test_no_route_to_an_unannounced_peer(pair: tuple[Side, Side]) -> None:
    holder, puller = pair  # they never met: no seal key to answer with
    await subscribe(holder, puller)
    await holder.sync.publish_tips()
    await puller.pump()
    assert puller.events["no_route_to_peer"] == 1
    assert await holder.pump() == []


async def test_tips_schedule_and_publish_failure(pair: tuple[Side, Side]) -> None:
    holder, _ = pair
    sync = holder.sync
    assert sync.due(200) and not sync.due(199)
    holder.transport.online = False  # publishing fails with a WakuError
    await sync.publish_tips()
    assert holder.events["publish_failed"] == 1
    assert not sync.due(sync.last_tips_ms + 199) and sync.due(sync.last_tips_ms + 200)
    never = DagSync(holder.port, sync.publisher, holder.peers,
                    AgentConfig(dag_sync_interval_ms=0), now_ms, Counter())
    assert not never.due(10**12)


async def test_pull_only_from_listed_senders(pair: tuple[Side, Side]) -> None:
    """``dag_pull_from``: tips of a sender not listed start no pull (counted); listed
    ones do; ``()`` is anchor-only (nobody)."""
    holder, puller = pair
    meet(holder, puller)
    await subscribe(holder, puller)
    for allowed in ((), ("validator-1",)):
        puller.sync.config = AgentConfig(dag_chunk=CHUNK, dag_pull_from=allowed)
        before = puller.events["dag_tips_not_pulled"]
        await holder.sync.publish_tips()
        await puller.pump()
        assert puller.events["dag_tips_not_pulled"] == before + 1
        assert await holder.pump() == []  # no pull reached the holder
        assert len(puller.ledger) == 0
    puller.sync.config = AgentConfig(dag_chunk=CHUNK, dag_pull_from=("gov",))
    await holder.sync.publish_tips()
    await puller.pump()
    assert [m.type for m in await holder.pump()] == [MessageType.DAG_PULL]
    await puller.pump()
    assert set(puller.ledger.ids()) == set(holder.ledger.ids())


async def test_tips_of_a_ledger_with_another_genesis_are_not_pulled(
        pair: tuple[Side, Side], tmp_path: Path) -> None:
    """Each compose/dev node has its own genesis: pulling another's DAG refuses every
    vertex (unknown author) and fires the ledger-verify alert. Tips carry the genesis,
    so a node with a genesis does not pull a foreign one (counted); an empty ledger still
    pulls (it learns its genesis that way, as in the first test)."""
    holder, puller = pair
    foreign = Ledger.open(tmp_path / "foreign")
    foreign.init_genesis("pqcnet-test", "n1", node_key("n1"))  # its own dev genesis
    foreign.append(VertexKind.ROUTE, Route("own", "n1"), "n1", node_key("n1"))
    other = side("n1", foreign, InProcessHub(), ["gov", "n1"])
    try:
        other.transport = puller.transport  # same hub as the holder
        other.sync = DagSync(other.port, Publisher(puller.transport,
                                                   EnvelopeSigner(other.keys)),
                             other.peers, AgentConfig(dag_chunk=CHUNK), now_ms, other.events)
        other.sub = None
        meet(holder, other)
        await subscribe(holder, other)
        refused = _refused_samples()
        foreign_seen = _sync_samples("dag_tips_foreign_genesis")
        await holder.sync.publish_tips()
        await other.pump()
        assert other.events["dag_tips_foreign_genesis"] == 1
        assert _sync_samples("dag_tips_foreign_genesis") - foreign_seen == 1  # exported
        assert await holder.pump() == []  # no pull was sent
        assert set(foreign.ids()).isdisjoint(holder.ledger.ids())
        assert _refused_samples() == refused
        # the same tips without a genesis (an older sender): pulled, as before
        await holder.sync.publisher.publish(
            holder.sync.publisher.topics["dagsync"], MessageType.DAG_TIPS,
            DagTips(tuple(holder.ledger.tips()), len(holder.ledger)).encode())
        await other.pump()
        assert [m.type for m in await holder.pump()] == [MessageType.DAG_PULL]
    finally:
        foreign.close()
