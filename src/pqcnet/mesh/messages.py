"""Control-message bodies as frozen dataclasses, converted to/from protobuf here only.

Cores (peer table, routing cache, gossip, DAG sync) never see ``_pb2`` objects: the
``encode`` / ``decode`` pair of each class is the boundary. ``decode`` raises
:class:`~pqcnet.mesh.errors.MalformedMessage` on bytes that do not parse or hold values out
of range, so a bad body is a counted drop like any other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

from google.protobuf.message import Message as _PbMessage

from pqcnet.crypto.errors import CryptoError
from pqcnet.crypto.pqc import RecipientPublicKey, VerifyKey
from pqcnet.mesh._pb import parse
from pqcnet.mesh.errors import MalformedMessage
from pqcnet.proto import mesh_pb2

#: Bounds on repeated fields so one message cannot make us allocate without limit.
MAX_CAPABILITIES = 64
MAX_ENDPOINTS = 16
MAX_ROUTES = 1024
MAX_IDS = 4096


_M = TypeVar("_M", bound=_PbMessage)


def _parse(cls: type[_M], data: bytes) -> _M:
    return parse(cls, data, MalformedMessage, f"body is not a {cls.__name__}")


def _bounded(n: int, limit: int, what: str) -> None:
    if n > limit:
        raise MalformedMessage(f"{n} {what} over the limit of {limit}")


@dataclass(frozen=True, slots=True)
class Endpoint:
    kind: str
    address: str


@dataclass(frozen=True, slots=True)
class Announcement:
    """A node saying who it is, how to reach it and which key it signs with."""

    node_id: str
    role: str
    capabilities: tuple[str, ...] = ()
    software_hash: bytes = b""
    staking_address: str = ""
    endpoints: tuple[Endpoint, ...] = ()
    key_version: int = 1
    seal_key: RecipientPublicKey | None = None
    interval_ms: int = 10_000
    #: key rollover: the next key, introduced under the current one
    next_key: VerifyKey | None = None
    next_key_version: int = 0

    def encode(self) -> bytes:
        return mesh_pb2.NodeAnnouncement(
            node_id=self.node_id, role=self.role, capabilities=list(self.capabilities),
            software_hash=self.software_hash, staking_address=self.staking_address,
            endpoints=[mesh_pb2.Endpoint(kind=e.kind, address=e.address)
                       for e in self.endpoints],
            key_version=self.key_version,
            seal_key=self.seal_key.to_bytes() if self.seal_key else b"",
            interval_ms=self.interval_ms,
            next_key_version=self.next_key_version if self.next_key else 0,
            next_key_algorithm=self.next_key.algorithm if self.next_key else "",
            next_public_key=self.next_key.raw if self.next_key else b"",
        ).SerializeToString()

    @classmethod
    def decode(cls, data: bytes) -> Announcement:
        pb = _parse(mesh_pb2.NodeAnnouncement, data)
        _bounded(len(pb.capabilities), MAX_CAPABILITIES, "capabilities")
        _bounded(len(pb.endpoints), MAX_ENDPOINTS, "endpoints")
        seal_key = None
        if pb.seal_key:
            try:
                seal_key = RecipientPublicKey.from_bytes(pb.seal_key)
            except CryptoError as exc:
                raise MalformedMessage(f"announcement seal key: {exc}") from None
        next_key = None
        if pb.next_public_key:
            if pb.next_key_version <= pb.key_version:
                raise MalformedMessage("next key version must exceed the current one")
            try:
                next_key = VerifyKey.from_raw(pb.next_key_algorithm, pb.next_public_key)
            except CryptoError as exc:
                raise MalformedMessage(f"announcement next key: {exc}") from None
        return cls(
            node_id=pb.node_id, role=pb.role, capabilities=tuple(pb.capabilities),
            software_hash=pb.software_hash, staking_address=pb.staking_address,
            endpoints=tuple(Endpoint(e.kind, e.address) for e in pb.endpoints),
            key_version=pb.key_version, seal_key=seal_key, interval_ms=pb.interval_ms,
            next_key=next_key, next_key_version=pb.next_key_version if next_key else 0,
        )


@dataclass(frozen=True, slots=True)
class RouteEntry:
    """Topic -> shard owner, as advertised (``withdrawn`` removes it)."""

    topic: str
    shard: int
    owner: str
    withdrawn: bool = False


@dataclass(frozen=True, slots=True)
class RouteAdvertisement:
    node_id: str
    version: int
    routes: tuple[RouteEntry, ...]

    def encode(self) -> bytes:
        return mesh_pb2.RouteAdvertisement(
            node_id=self.node_id, version=self.version,
            routes=[mesh_pb2.RouteEntry(topic=r.topic, shard=r.shard, owner=r.owner,
                                        withdrawn=r.withdrawn) for r in self.routes],
        ).SerializeToString()

    @classmethod
    def decode(cls, data: bytes) -> RouteAdvertisement:
        pb = _parse(mesh_pb2.RouteAdvertisement, data)
        _bounded(len(pb.routes), MAX_ROUTES, "routes")
        return cls(pb.node_id, pb.version, tuple(
            RouteEntry(r.topic, r.shard, r.owner, r.withdrawn) for r in pb.routes))


@dataclass(frozen=True, slots=True)
class GossipItem:
    """Anomaly / revocation / CRL gossip; expires at ``expires_ms`` wherever it is."""

    kind: str
    payload: bytes
    expires_ms: int
    destination: str = ""

    def encode(self) -> bytes:
        return mesh_pb2.GossipItem(kind=self.kind, payload=self.payload,
                                   expires_ms=self.expires_ms,
                                   destination=self.destination).SerializeToString()

    @classmethod
    def decode(cls, data: bytes) -> GossipItem:
        pb = _parse(mesh_pb2.GossipItem, data)
        return cls(pb.kind, pb.payload, pb.expires_ms, pb.destination)


@dataclass(frozen=True, slots=True)
class DagTips:
    tips: tuple[bytes, ...]
    vertex_count: int
    #: the sender's genesis vertex id (empty: its ledger has none yet, or it is older)
    genesis: bytes = b""

    def encode(self) -> bytes:
        return mesh_pb2.DagTips(tips=list(self.tips), vertex_count=self.vertex_count,
                                genesis=self.genesis).SerializeToString()

    @classmethod
    def decode(cls, data: bytes) -> DagTips:
        pb = _parse(mesh_pb2.DagTips, data)
        _bounded(len(pb.tips), MAX_IDS, "tips")
        return cls(tuple(pb.tips), pb.vertex_count, pb.genesis)


@dataclass(frozen=True, slots=True)
class DagPull:
    requester: str
    ids: tuple[bytes, ...] = ()
    have_tips: tuple[bytes, ...] = ()

    def encode(self) -> bytes:
        return mesh_pb2.DagPull(ids=list(self.ids), have_tips=list(self.have_tips),
                                requester=self.requester).SerializeToString()

    @classmethod
    def decode(cls, data: bytes) -> DagPull:
        pb = _parse(mesh_pb2.DagPull, data)
        _bounded(len(pb.ids) + len(pb.have_tips), MAX_IDS, "ids")
        return cls(pb.requester, tuple(pb.ids), tuple(pb.have_tips))


@dataclass(frozen=True, slots=True)
class DagVertices:
    destination: str
    vertices: tuple[bytes, ...]
    more: bool = False

    def encode(self) -> bytes:
        return mesh_pb2.DagVertices(vertices=list(self.vertices), destination=self.destination,
                                    more=self.more).SerializeToString()

    @classmethod
    def decode(cls, data: bytes) -> DagVertices:
        pb = _parse(mesh_pb2.DagVertices, data)
        _bounded(len(pb.vertices), MAX_IDS, "vertices")
        return cls(pb.destination, tuple(pb.vertices), pb.more)


@dataclass(frozen=True, slots=True)
class RelayReport:
    """A relayer's volume proof or performance report (opaque payload, optional anchor)."""

    kind: str
    payload: bytes
    anchor_id: bytes = b""

    def encode(self) -> bytes:
        return mesh_pb2.RelayReport(kind=self.kind, payload=self.payload,
                                    anchor_id=self.anchor_id).SerializeToString()

    @classmethod
    def decode(cls, data: bytes) -> RelayReport:
        pb = _parse(mesh_pb2.RelayReport, data)
        return cls(pb.kind, pb.payload, pb.anchor_id)


@dataclass(frozen=True, slots=True)
class SlashingProposal:
    """An indexer's finding against ``target``, for governance to turn into a directive."""

    target: str
    kind: str
    detail: str
    evidence: tuple[bytes, ...] = field(default=())
    proposal_id: bytes = b""

    def encode(self) -> bytes:
        return mesh_pb2.SlashingProposal(
            target=self.target, kind=self.kind, detail=self.detail,
            evidence=list(self.evidence), proposal_id=self.proposal_id,
        ).SerializeToString()

    @classmethod
    def decode(cls, data: bytes) -> SlashingProposal:
        pb = _parse(mesh_pb2.SlashingProposal, data)
        _bounded(len(pb.evidence), MAX_IDS, "evidence items")
        return cls(pb.target, pb.kind, pb.detail, tuple(pb.evidence), pb.proposal_id)
