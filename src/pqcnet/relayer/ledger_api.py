"""The ``Ledger`` query gRPC service (read-only) and its client, reachable post-quantum.

Governance indexers and auditors ask a node's QS-DAG four things: one vertex by id;
vertices by author, kind and author-time range; who is slashed (and why); and which
Layer-0 envelope anchored a vertex, with its inclusion proof. The service reads the
node's own :class:`~pqcnet.qsdag.Ledger` (and its Layer-0 sink when it anchors).

Transport, honestly: grpcio bundles BoringSSL, which cannot present ML-DSA
certificates or negotiate ML-KEM. The service therefore listens in plaintext on
loopback only, and other hosts reach it through a QSTP listener that forwards each
stream to it (:func:`pqcnet.qstp.aio.forward.serve_forward`); the client side
(:func:`pqcnet.relayer.governance.open_channel`) dials QSTP and points grpcio at a
local forward. Classical TLS (``ca_cert``) stays an explicit opt-in for tooling that
cannot dial QSTP. The relayer's ``VolumeMetrics`` travels the same way.

Why it lives in ``relayer``: the relayer is the role that owns a QS-DAG *and* a gRPC
endpoint (grpcio is a role extra, not a core dependency); it reads both ``qsdag`` and
``layer0`` (the anchor sink), peers in the layering contract that may not import each
other. ``pqcnet node run`` hosts it through the relayer it runs.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from pqcnet.errors import PqcnetError
from pqcnet.layer0.anchor import EpochRecord, JsonlSink
from pqcnet.proto import qsdag_pb2 as pb
from pqcnet.proto import qsdag_pb2_grpc as pb_grpc
from pqcnet.qsdag import Ledger
from pqcnet.qsdag.vertex import decode, to_proto

#: vertices one QueryVertices call returns at most (bounds server work per call)
MAX_QUERY_RESULTS = 10_000
#: Layer-0 epochs scanned per GetAnchor (the sink is append-only JSONL)
MAX_ANCHOR_SCAN = 100_000


class LedgerQueryError(PqcnetError):
    """A ledger query failed (transport, not found, or an answer that does not verify)."""


@dataclass(frozen=True, slots=True)
class VertexFilter:
    """QueryVertices as a dataclass (``kind`` is a ``VertexKind`` name or ``None``)."""

    author: str | None = None
    kind: str | None = None
    since_ms: int = 0
    until_ms: int | None = None
    limit: int = 0

    def to_pb(self) -> pb.VertexQuery:
        q = pb.VertexQuery(author=self.author or "", since_ms=self.since_ms, limit=self.limit)
        if self.kind:
            q.kind = pb.VertexKind.Value(self.kind)  # type: ignore[assignment]
        if self.until_ms is not None:
            q.until_ms = self.until_ms
        return q


class LedgerService(pb_grpc.LedgerServicer):
    """Serves a ledger (and optionally its Layer-0 sink) read-only."""

    def __init__(self, ledger: Ledger, anchors: Path | None = None) -> None:
        self.ledger = ledger
        self.anchors = anchors

    def _entry(self, vid: bytes) -> pb.VertexEntry:
        v, r = self.ledger.get(vid), self.ledger.receipt(vid)
        return pb.VertexEntry(id=vid, vertex=to_proto(v), depth=r.depth, position=r.position)

    async def GetVertex(self, request: pb.VertexRef,
                        context: grpc.aio.ServicerContext[Any, Any]) -> pb.VertexEntry:
        if not self.ledger.has(request.id):
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"vertex {request.id.hex()[:16]} not in this ledger")
        return self._entry(request.id)

    def _matching(self, q: pb.VertexQuery) -> Iterator[bytes]:
        until = q.until_ms if q.HasField("until_ms") else None
        for vid in self.ledger.ids():
            v = self.ledger.get(vid)
            if q.author and v.author != q.author:
                continue
            if q.kind and int(v.kind) != q.kind:
                continue
            if v.timestamp_ms < q.since_ms or (until is not None and v.timestamp_ms >= until):
                continue
            yield vid

    async def QueryVertices(self, request: pb.VertexQuery,
                            context: grpc.aio.ServicerContext[Any, Any],
                            ) -> AsyncIterator[pb.VertexEntry]:
        limit = min(request.limit or MAX_QUERY_RESULTS, MAX_QUERY_RESULTS)
        for n, vid in enumerate(self._matching(request)):
            if n >= limit:
                return
            yield self._entry(vid)

    async def GetSlashes(self, request: pb.SlashesQuery,
                         context: grpc.aio.ServicerContext[Any, Any]) -> pb.SlashesReply:
        slashes = self.ledger.views.slashes
        reply = pb.SlashesReply(slashed=sorted(slashes.slashed_nodes()))
        if request.node:
            try:
                reply.history_json = json.dumps(slashes.get(request.node), sort_keys=True)
            except PqcnetError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return reply

    def _epoch_of(self, vid: bytes) -> EpochRecord | None:
        if self.anchors is None:
            return None
        for n, record in enumerate(JsonlSink(self.anchors).records()):
            if n >= MAX_ANCHOR_SCAN:
                break
            if vid in record.ids:
                return record
        return None

    async def GetAnchor(self, request: pb.VertexRef,
                        context: grpc.aio.ServicerContext[Any, Any]) -> pb.AnchorEntry:
        record = self._epoch_of(request.id)
        if record is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"vertex {request.id.hex()[:16]} is not anchored (yet)")
        assert record is not None  # abort raises
        proof = record.proof(request.id)
        return pb.AnchorEntry(vertex_id=request.id, envelope_json=json.dumps(record.to_json()),
                              index=proof.index, path=list(proof.path), size=proof.size)


async def serve_ledger(service: LedgerService, port: int = 0) -> tuple[grpc.aio.Server, int]:
    """Start the service on ``127.0.0.1:port`` (loopback plaintext only)."""
    server = grpc.aio.server()
    pb_grpc.add_LedgerServicer_to_server(service, server)  # type: ignore[no-untyped-call]
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    if not bound:
        raise LedgerQueryError(f"cannot bind the Ledger service on 127.0.0.1:{port}")
    await server.start()
    return server, bound


# ------------------------------------------------------------------ client


def _checked(entry: pb.VertexEntry) -> dict[str, Any]:
    """The entry as JSON-ready dict, after recomputing the id from the vertex bytes."""
    v = decode(entry.vertex.SerializeToString())
    if v.id != entry.id:
        raise LedgerQueryError(f"vertex {entry.id.hex()[:16]}: id does not match its content")
    return {"id": v.id.hex(), "kind": v.kind.name, "author": v.author, "counter": v.counter,
            "timestamp_ms": v.timestamp_ms, "key_version": v.key_version,
            "parents": [p.hex() for p in v.parents], "depth": entry.depth,
            "position": entry.position, "signature_bytes": len(v.signature)}


def _failed(what: str, exc: grpc.aio.AioRpcError) -> LedgerQueryError:
    return LedgerQueryError(f"{what}: {exc.code().name}: {exc.details()}")


async def get_vertex(channel: grpc.aio.Channel, vid: bytes,
                     deadline: float = 10.0) -> dict[str, Any]:
    stub = pb_grpc.LedgerStub(channel)  # type: ignore[no-untyped-call]
    try:
        entry = await stub.GetVertex(pb.VertexRef(id=vid), timeout=deadline)
    except grpc.aio.AioRpcError as exc:
        raise _failed("GetVertex", exc) from None
    return _checked(entry)


async def query_vertices(channel: grpc.aio.Channel, flt: VertexFilter,
                         deadline: float = 30.0) -> list[dict[str, Any]]:
    stub = pb_grpc.LedgerStub(channel)  # type: ignore[no-untyped-call]
    out: list[dict[str, Any]] = []
    try:
        async for entry in stub.QueryVertices(flt.to_pb(), timeout=deadline):
            out.append(_checked(entry))
    except grpc.aio.AioRpcError as exc:
        raise _failed("QueryVertices", exc) from None
    return out


async def get_slashes(channel: grpc.aio.Channel, node: str | None = None,
                      deadline: float = 10.0) -> dict[str, Any]:
    stub = pb_grpc.LedgerStub(channel)  # type: ignore[no-untyped-call]
    try:
        reply = await stub.GetSlashes(pb.SlashesQuery(node=node or ""), timeout=deadline)
    except grpc.aio.AioRpcError as exc:
        raise _failed("GetSlashes", exc) from None
    out: dict[str, Any] = {"slashed": list(reply.slashed)}
    if node:
        out["history"] = json.loads(reply.history_json)
    return out


async def get_anchor(channel: grpc.aio.Channel, vid: bytes,
                     deadline: float = 10.0) -> dict[str, Any]:
    stub = pb_grpc.LedgerStub(channel)  # type: ignore[no-untyped-call]
    try:
        a = await stub.GetAnchor(pb.VertexRef(id=vid), timeout=deadline)
    except grpc.aio.AioRpcError as exc:
        raise _failed("GetAnchor", exc) from None
    return {"vertex_id": a.vertex_id.hex(), "envelope": json.loads(a.envelope_json),
            "proof": {"index": a.index, "size": a.size, "path": [p.hex() for p in a.path]}}


__all__ = ["MAX_QUERY_RESULTS", "LedgerQueryError", "LedgerService", "VertexFilter",
           "get_anchor", "get_slashes", "get_vertex", "query_vertices",
           "serve_ledger"]
