"""Slashing in the ledger: a registrar authority disables a node's key.

Why it is a ledger rule and not a local filter: every replica must accept exactly
the same vertices, so "is this author slashed?" must be decided from the DAG
itself, never from when a notice happened to arrive.

**The notice.** A slash is a ``GOVERNANCE_DIRECTIVE`` vertex whose payload is an
:class:`~pqcnet.qsdag.payloads.OpaqueRecord` with content type :data:`SLASH_CONTENT_TYPE`,
``subject`` = the target node, and a ``pqcnet.qsdag.SlashNotice`` body naming the
target, a reason and the target key version it disables. Only a genesis authority
may author one (anything else is :class:`~pqcnet.qsdag.errors.InvalidPayload`).

**The ordering rule (by DAG ancestry).** A slash ``S`` of node ``A`` refuses a
vertex ``V`` authored by ``A`` iff ``S`` is an ancestor of ``V`` and ``S`` is not
lifted by a vertex of ``A`` with a lower counter than ``V``. Consequences:

* vertices of ``A`` anchored before ``S`` (or any vertex of ``A`` that does not
  descend from ``S``) stay valid — on every replica, whatever the arrival order;
  a vertex concurrent with the slash (its author had not seen it) is accepted
  everywhere. Honest nodes build on their tips, so everything written after they
  anchor ``S`` descends from it;
* the refusal is :class:`~pqcnet.qsdag.errors.AuthorSlashed` (nothing is stored).

**Lifting.** ``A`` must re-register *and* re-attest: a registrar authority anchors
a new key version for ``A`` (a KEY_VERSION vertex authored by a genesis authority;
a self-rotation does not count), then ``A`` anchors an ``ATTESTATION`` vertex
descending from ``S`` and signed with a key version above the one ``S`` disabled.
That attestation is the one vertex of ``A`` a slash lets through, and it lifts
every slash in its ancestry whose disabled version is below its key version.
Because ``A``'s vertices are anchored in counter order on every replica, "lifted
before ``V``" is the same everywhere.

**How ancestry is checked cheaply.** Each anchored vertex stores the set of
*active* (not lifted) slash ids in its ancestry (``slash_tags``, written only when
non-empty) = the union of its parents' sets, restricted to active slashes, plus
itself if it is a slash, minus what it lifts. Descendants are always anchored after
their ancestors, so this is exact and costs one read per parent — and nothing at
all while no slash is active. Both column families are views: :meth:`Ledger.rebuild_views`
replays them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from pqcnet.proto import qsdag_pb2
from pqcnet.qsdag.errors import AuthorSlashed, InvalidPayload
from pqcnet.qsdag.payloads import MAX_TEXT, OpaqueRecord
from pqcnet.qsdag.store import Batch, Store
from pqcnet.qsdag.vertex import ID_SIZE, Vertex, VertexKind, check_node_id

#: Content type of a slash notice inside a GOVERNANCE_DIRECTIVE OpaqueRecord.
SLASH_CONTENT_TYPE = "pqcnet.qsdag.Slash"
#: Most lifted slashes remembered per node in the view (active ones are always kept).
LIFTED_HISTORY_LIMIT = 64
_U32 = 2**32 - 1


@dataclass(frozen=True, slots=True)
class SlashNotice:
    """Governance disables ``target``'s key ``key_version`` (and, until it
    re-registers and re-attests, every vertex of ``target`` descending from it)."""

    target: str
    reason: str
    key_version: int

    def to_record(self) -> OpaqueRecord:
        body = qsdag_pb2.SlashNotice(target=self.target, reason=self.reason,
                                     key_version=self.key_version)
        return OpaqueRecord(SLASH_CONTENT_TYPE, self.target,
                            body.SerializeToString(deterministic=True))

    @classmethod
    def from_record(cls, rec: OpaqueRecord) -> SlashNotice:
        """Strictly decode the body of a slash record; :class:`InvalidPayload` if bad."""
        msg = qsdag_pb2.SlashNotice()
        try:
            msg.ParseFromString(rec.body)
        except (DecodeError, ValueError) as exc:
            raise InvalidPayload(f"slash notice does not decode: {exc}") from None
        msg.DiscardUnknownFields()
        if msg.SerializeToString(deterministic=True) != rec.body:
            raise InvalidPayload("slash notice is not canonically encoded")
        check_node_id(msg.target, "slash target", error=InvalidPayload)
        if msg.target != rec.subject:
            raise InvalidPayload("slash record subject must equal the notice target")
        if not 1 <= msg.key_version <= _U32:
            raise InvalidPayload("slash key_version must be >= 1")
        if not msg.reason or len(msg.reason.encode()) > MAX_TEXT:
            raise InvalidPayload(f"slash reason must be 1..{MAX_TEXT} bytes")
        return cls(msg.target, msg.reason, msg.key_version)


def slash_notice(v: Vertex, payload: object) -> SlashNotice | None:
    """The slash notice carried by ``v``, None if it is not one (InvalidPayload if bad)."""
    if (v.kind == VertexKind.GOVERNANCE_DIRECTIVE and isinstance(payload, OpaqueRecord)
            and payload.content_type == SLASH_CONTENT_TYPE):
        return SlashNotice.from_record(payload)
    return None


@dataclass(frozen=True, slots=True)
class ActiveSlash:
    """An anchored, not yet lifted slash."""

    vertex_id: bytes
    target: str
    key_version: int


def refusing(v: Vertex, inherited: Iterable[ActiveSlash], *,
             may_lift: bool) -> list[ActiveSlash]:
    """The rule itself: of the active slashes in ``v``'s ancestry, those that refuse it.

    ``may_lift``: ``v`` is an ATTESTATION signed with a key a registrar authority
    registered; it passes (and lifts) slashes whose disabled version is below its own.
    """
    return [s for s in inherited if s.target == v.author
            and not (may_lift and v.kind == VertexKind.ATTESTATION
                     and v.key_version > s.key_version)]


def lifts(v: Vertex, inherited: Iterable[ActiveSlash]) -> list[ActiveSlash]:
    """Slashes an *anchored* vertex lifts (it passed :func:`refusing`)."""
    if v.kind != VertexKind.ATTESTATION:
        return []
    return [s for s in inherited if s.target == v.author and v.key_version > s.key_version]


class SlashAudit:
    """Replays the slash rule over vertices in anchoring order without the views
    (``Ledger.verify``), so a damaged view cannot hide a vertex that should have
    been refused."""

    def __init__(self, authorities: Iterable[str]) -> None:
        self.authorities = set(authorities)
        self.active: dict[bytes, ActiveSlash] = {}
        self._tags: dict[bytes, frozenset[bytes]] = {}
        #: (node, key version) -> author of the vertex that registered it
        self.registered_by: dict[tuple[str, int], str] = {}

    def check(self, v: Vertex, vid: bytes, payload: object) -> None:
        """Raise AuthorSlashed / InvalidPayload like anchoring would; else record ``v``."""
        inherited: set[bytes] = set()
        for p in v.parents:
            inherited |= self._tags.get(p, frozenset())
        inherited &= self.active.keys()
        slashes = [self.active[i] for i in sorted(inherited)]
        registrar = self.registered_by.get((v.author, v.key_version))
        may_lift = registrar is not None and registrar != v.author and (
            registrar in self.authorities)
        blocking = refusing(v, slashes, may_lift=may_lift)
        if blocking:
            raise AuthorSlashed(f"{v.author} was slashed by {blocking[0].vertex_id.hex()[:16]}",
                                vertex_id=vid, author=v.author,
                                slash_ids=tuple(s.vertex_id for s in blocking))
        notice = slash_notice(v, payload)
        if notice is not None and v.author not in self.authorities:
            raise InvalidPayload(f"slash by non-authority {v.author}", vertex_id=vid)
        for s in lifts(v, slashes):
            del self.active[s.vertex_id]
            inherited.discard(s.vertex_id)
        if notice is not None:
            self.active[vid] = ActiveSlash(vid, notice.target, notice.key_version)
            inherited.add(vid)
        if inherited:
            self._tags[vid] = frozenset(inherited)


def _dump(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


class Slashes:
    """The slash view: per-target notices (``v_slash``) and ancestry tags (``slash_tags``)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._active: dict[bytes, ActiveSlash] | None = None

    # -------------------------------------------------------------- reading

    def active(self) -> dict[bytes, ActiveSlash]:
        """Every active slash by vertex id (cached; reloaded after a slash/lift)."""
        if self._active is None:
            out: dict[bytes, ActiveSlash] = {}
            for key, raw in self._store.items("v_slash"):
                for s in json.loads(raw)["slashes"]:
                    if s["lifted_by"] is None:
                        sid = bytes.fromhex(s["vertex"])
                        out[sid] = ActiveSlash(sid, key.decode(), int(s["key_version"]))
            self._active = out
        return self._active

    def get(self, node: str) -> dict[str, Any]:
        """View entry: ``{"node_id", "slashed", "slashes": [{vertex, authority, reason,
        key_version, timestamp_ms, lifted_by}]}``."""
        check_node_id(node)
        raw = self._store.get("v_slash", node.encode())
        row: dict[str, Any] = (json.loads(raw) if raw is not None
                               else {"node_id": node, "slashes": []})
        row["slashed"] = any(s["lifted_by"] is None for s in row["slashes"])
        return row

    def is_slashed(self, node: str) -> bool:
        check_node_id(node)
        return any(s.target == node for s in self.active().values())

    def slashed_nodes(self) -> list[str]:
        return sorted({s.target for s in self.active().values()})

    def tags(self, vid: bytes, batch: Batch | None = None) -> set[bytes]:
        """Active slash ids in the ancestry of ``vid`` (inclusive)."""
        if batch is not None and ("slash_tags", vid) in batch.pending:
            raw = batch.pending[("slash_tags", vid)]
        else:
            raw = self._store.get("slash_tags", vid)
        if not raw:
            return set()
        return {raw[i:i + ID_SIZE] for i in range(0, len(raw), ID_SIZE)}

    def inherited(self, parents: tuple[bytes, ...]) -> set[bytes]:
        """Active slash ids in the ancestry of a vertex with these parents."""
        active = self.active()
        if not active:
            return set()
        out: set[bytes] = set()
        for p in parents:
            out |= self.tags(p)
        return out & active.keys()

    def blocking(self, v: Vertex, *, may_lift: bool) -> list[ActiveSlash]:
        """Active slashes of ``v.author`` in ``v``'s ancestry that refuse it.

        ``may_lift``: ``v`` is an ATTESTATION signed with a key a registrar
        authority registered; such a vertex passes slashes whose disabled version
        is below its key version (and lifts them when anchored).
        """
        active = self.active()
        if not any(s.target == v.author for s in active.values()):
            return []
        return refusing(v, [active[i] for i in sorted(self.inherited(v.parents))],
                        may_lift=may_lift)

    # -------------------------------------------------------------- writing

    def apply(self, batch: Batch, v: Vertex, vid: bytes, payload: object) -> None:
        """Record ``v``'s slash effects in the anchoring batch (``v`` passed the rules)."""
        notice = slash_notice(v, payload)
        if notice is None and not self.active():
            return
        tags = self.inherited(v.parents)
        changed = False
        active = self.active()
        for s in lifts(v, [active[i] for i in sorted(tags)]):
            self._mark_lifted(batch, v.author, s.vertex_id, vid)
            tags.discard(s.vertex_id)
            changed = True
        if notice is not None:
            self._record(batch, notice, v, vid)
            tags.add(vid)
            changed = True
        if tags:
            batch.put("slash_tags", vid, b"".join(sorted(tags)))
        if changed:
            self._active = None  # reload from the store once the batch is committed

    def _row(self, batch: Batch, node: str) -> dict[str, Any]:
        key = node.encode()
        raw = (batch.pending[("v_slash", key)] if ("v_slash", key) in batch.pending
               else self._store.get("v_slash", key))
        row: dict[str, Any] = (json.loads(raw) if raw is not None
                               else {"node_id": node, "slashes": []})
        return row

    def _put_row(self, batch: Batch, node: str, row: dict[str, Any]) -> None:
        lifted = [s for s in row["slashes"] if s["lifted_by"] is not None]
        drop = {id(s) for s in lifted[:-LIFTED_HISTORY_LIMIT]} if len(
            lifted) > LIFTED_HISTORY_LIMIT else set()
        row["slashes"] = [s for s in row["slashes"] if id(s) not in drop]
        batch.put("v_slash", node.encode(), _dump(row))

    def _record(self, batch: Batch, notice: SlashNotice, v: Vertex, vid: bytes) -> None:
        row = self._row(batch, notice.target)
        row["slashes"].append({
            "vertex": vid.hex(), "authority": v.author, "reason": notice.reason,
            "key_version": notice.key_version, "timestamp_ms": v.timestamp_ms,
            "lifted_by": None})
        self._put_row(batch, notice.target, row)

    def _mark_lifted(self, batch: Batch, node: str, sid: bytes, by: bytes) -> None:
        row = self._row(batch, node)
        for s in row["slashes"]:
            if s["vertex"] == sid.hex():
                s["lifted_by"] = by.hex()
        self._put_row(batch, node, row)

    def forget_cache(self) -> None:
        self._active = None
