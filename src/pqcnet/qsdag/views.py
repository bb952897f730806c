"""Materialized views over the ledger, updated in the same batch as each vertex.

Views answer the questions other areas ask without scanning the DAG:

* ``key_versions`` — every key a node has had (the registry used for verification);
* ``attestations`` — attestation events per node, and the last counter;
* ``relay`` — per node: stake (RELAY_RECORD), attestation hashes, performance history;
* ``routing`` — meta-routing table: topic → shard owner and QoS hints (last wins);
* ``policy_anchors`` — policy hash → tenant, time, vertex;
* ``slashes`` — slash notices per node and the ancestry tags that enforce them
  (:mod:`pqcnet.qsdag.slashing`).

All of them are derived: :meth:`Views.rebuild` wipes them and replays every vertex
in anchoring order, so a lost or damaged view is never a lost fact. Histories kept
per node are bounded by :data:`HISTORY_LIMIT` (oldest dropped; the DAG keeps all).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pqcnet.crypto.pqc import VerifyKey
from pqcnet.proto import qsdag_pb2
from pqcnet.qsdag.attestation import AttestationEvent
from pqcnet.qsdag.payloads import Genesis, KeyRecord, OpaqueRecord, PolicyAnchor, RelayRecord, Route
from pqcnet.qsdag.slashing import Slashes
from pqcnet.qsdag.store import Batch, Store
from pqcnet.qsdag.vertex import Vertex, VertexKind, check_node_id

#: Most attestation hashes / performance entries remembered per node in the relay view.
HISTORY_LIMIT = 1024


def _read(store: Store, batch: Batch | None, cf: str, key: bytes) -> bytes | None:
    if batch is not None and (cf, key) in batch.pending:
        return batch.pending[(cf, key)]
    return store.get(cf, key)


def _json(data: bytes | None) -> Any:
    return None if data is None else json.loads(data)


def _dump(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """One registered key version and the vertex that registered it."""

    record: KeyRecord
    vertex_id: bytes


class KeyVersions:
    """Key-version history per node (the ledger's key registry)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._cache: dict[tuple[str, int], VerifyKey] = {}
        #: write-through cache of each node's version in force (read per vertex)
        self._current: dict[str, int] = {}

    def current(self, node: str, batch: Batch | None = None) -> int | None:
        check_node_id(node)
        key = node.encode() + b"\x01"
        if batch is not None and ("keys", key) in batch.pending:
            raw = batch.pending[("keys", key)]
            return None if raw is None else int(struct.unpack(">I", raw)[0])
        version = self._current.get(node)
        if version is None:
            raw = self._store.get("keys", key)
            if raw is None:
                return None
            version = self._current[node] = int(struct.unpack(">I", raw)[0])
        return version

    def entry(self, node: str, version: int, batch: Batch | None = None) -> KeyEntry | None:
        check_node_id(node)
        key = node.encode() + b"\x00" + struct.pack(">I", version)
        raw = _read(self._store, batch, "keys", key)
        if raw is None:
            return None
        msg = qsdag_pb2.KeyRecord()
        msg.ParseFromString(raw[32:])
        return KeyEntry(KeyRecord.from_proto(msg), raw[:32])

    def key(self, node: str, version: int, batch: Batch | None = None) -> VerifyKey | None:
        """The verify key of ``node`` at ``version`` (cached), or None."""
        cached = self._cache.get((node, version))
        if cached is not None:
            return cached
        entry = self.entry(node, version, batch)
        if entry is None:
            return None
        key = VerifyKey.from_raw(entry.record.algorithm, entry.record.public_key)
        if batch is None:
            self._cache[(node, version)] = key
        return key

    def history(self, node: str) -> list[KeyEntry]:
        check_node_id(node)
        out = []
        for key, raw in self._store.items("keys", node.encode() + b"\x00"):
            if len(key) != len(node.encode()) + 5:
                continue
            msg = qsdag_pb2.KeyRecord()
            msg.ParseFromString(raw[32:])
            out.append(KeyEntry(KeyRecord.from_proto(msg), raw[:32]))
        return out

    def put(self, batch: Batch, rec: KeyRecord, vid: bytes) -> None:
        node = rec.node_id.encode()
        batch.put("keys", node + b"\x00" + struct.pack(">I", rec.key_version),
                  vid + rec.to_proto().SerializeToString(deterministic=True))
        batch.put("keys", node + b"\x01", struct.pack(">I", rec.key_version))
        batch.after_commit(lambda: self._current.__setitem__(rec.node_id, rec.key_version))

    def forget_cache(self) -> None:
        self._cache.clear()
        self._current.clear()


class Attestations:
    """Attestation store: events per node ordered by their counter."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def last_counter(self, node: str, batch: Batch | None = None) -> int | None:
        check_node_id(node)
        raw = _read(self._store, batch, "v_att", node.encode() + b"\x01")
        return None if raw is None else int(struct.unpack(">Q", raw)[0])

    def history(self, node: str) -> list[dict[str, Any]]:
        check_node_id(node)
        prefix = node.encode() + b"\x00"
        return [json.loads(v) for _, v in self._store.items("v_att", prefix)]

    def latest(self, node: str) -> dict[str, Any] | None:
        hist = self.history(node)
        return hist[-1] if hist else None

    def put(self, batch: Batch, ev: AttestationEvent, vid: bytes) -> None:
        node = ev.node_id.encode()
        m = ev.measurements
        batch.put("v_att", node + b"\x00" + struct.pack(">Q", ev.counter), _dump({
            "vertex": vid.hex(), "digest": ev.digest.hex(), "role": ev.role,
            "counter": ev.counter, "timestamp_ms": ev.timestamp_ms,
            "package_hash": m.package_hash.hex(), "image_digest": m.image_digest,
            "config_hash": m.config_hash.hex(), "has_quote": bool(ev.quote),
        }))
        batch.put("v_att", node + b"\x01", struct.pack(">Q", ev.counter))


class Relay:
    """Relay ledger: node → stake, attestation hashes, performance history."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def get(self, node: str, batch: Batch | None = None) -> dict[str, Any]:
        check_node_id(node)
        got = _json(_read(self._store, batch, "v_relay", node.encode()))
        return got or {"node_id": node, "stake": 0, "endpoint": "", "shards": [],
                       "attestations": [], "performance": []}

    def nodes(self) -> list[str]:
        return [k.decode() for k in self._store.keys("v_relay")]

    def _update(self, batch: Batch, node: str, fn: Callable[[dict[str, Any]], None]) -> None:
        row = self.get(node, batch)
        fn(row)
        for field in ("attestations", "performance"):
            del row[field][:-HISTORY_LIMIT]
        batch.put("v_relay", node.encode(), _dump(row))


class Routing:
    """Meta-routing table: topic → shard owner and QoS hints (latest vertex wins)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def get(self, topic: str) -> dict[str, Any] | None:
        got: dict[str, Any] | None = _json(self._store.get("v_route", topic.encode()))
        return got

    def table(self) -> dict[str, dict[str, Any]]:
        return {k.decode(): json.loads(v) for k, v in self._store.items("v_route")}


class PolicyAnchors:
    """Policy hash → tenant, time and anchoring vertex."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def get(self, policy_hash: bytes) -> dict[str, Any] | None:
        got: dict[str, Any] | None = _json(self._store.get("v_policy", policy_hash))
        return got

    def all(self) -> dict[str, dict[str, Any]]:
        return {k.hex(): json.loads(v) for k, v in self._store.items("v_policy")}


class Views:
    """All views of one ledger; :meth:`apply` runs inside the anchoring batch."""

    def __init__(self, store: Store) -> None:
        self.key_versions = KeyVersions(store)
        self.attestations = Attestations(store)
        self.relay = Relay(store)
        self.routing = Routing(store)
        self.policy_anchors = PolicyAnchors(store)
        self.slashes = Slashes(store)

    def forget_caches(self) -> None:
        self.key_versions.forget_cache()
        self.slashes.forget_cache()

    def apply(self, batch: Batch, v: Vertex, vid: bytes, payload: object) -> None:
        """Record the effects of one anchored vertex (payload already decoded)."""
        ts = v.timestamp_ms
        self.slashes.apply(batch, v, vid, payload)
        if isinstance(payload, Genesis):
            for rec in payload.authorities:
                self.key_versions.put(batch, rec, vid)
        elif isinstance(payload, KeyRecord):
            self.key_versions.put(batch, payload, vid)
        elif isinstance(payload, AttestationEvent):
            ev = payload
            self.attestations.put(batch, ev, vid)
            self.relay._update(batch, ev.node_id,
                               lambda r: r["attestations"].append(ev.digest.hex()))
        elif isinstance(payload, RelayRecord):
            rr = payload

            def _set(r: dict[str, Any]) -> None:
                r.update(stake=rr.stake, endpoint=rr.endpoint, shards=list(rr.shards),
                         record=vid.hex(), updated_ms=ts)
            self.relay._update(batch, rr.node_id, _set)
        elif isinstance(payload, OpaqueRecord) and v.kind == VertexKind.PERFORMANCE_REPORT:
            op = payload
            self.relay._update(batch, op.subject, lambda r: r["performance"].append({
                "vertex": vid.hex(), "timestamp_ms": ts, "content_type": op.content_type,
                "by": v.author}))
        elif isinstance(payload, Route):
            batch.put("v_route", payload.topic.encode(), _dump({
                "shard_owner": payload.shard_owner, "priority": payload.priority,
                "max_latency_ms": payload.max_latency_ms, "replicas": payload.replicas,
                "vertex": vid.hex(), "timestamp_ms": ts}))
        elif isinstance(payload, PolicyAnchor):
            batch.put("v_policy", payload.policy_hash, _dump({
                "tenant": payload.tenant, "time_ms": payload.time_ms,
                "description": payload.description, "vertex": vid.hex()}))
