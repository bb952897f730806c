"""The real QS-DAG behind :class:`~pqcnet.mesh.ledger.LedgerPort`.

Anchoring goes through ``pqcnet.qsdag.Ledger``: directives become GOVERNANCE_DIRECTIVE
vertices (an ``OpaqueRecord`` carrying the signed directive verbatim, so anyone can
re-verify the governance signatures later), route advertisements become one ROUTE
vertex per topic, key rotations are ``Ledger.rotate_key`` (a KEY_VERSION vertex
signed by the old key). The port signs as this node with the agent's *current* key
(it shares the agent's :class:`~pqcnet.mesh.envelope.NodeKeys`, so a rotation is seen at once).

Slashing is enforced twice. The ledger's own rule (``Ledger.slash`` /
``is_slashed`` / :class:`~pqcnet.qsdag.errors.AuthorSlashed`): when this node is a registrar
authority, :meth:`disable_author` anchors a qsdag slash notice, which reaches the
other ledgers by DAG sync; from then on every vertex of the target that *descends
from* the notice is refused by ``verify_and_anchor`` everywhere. That rule follows
DAG ancestry, so a slashed node can still write vertices that do not descend from
the notice (it simply never syncs it); the mesh therefore also refuses, at the only
door remote vertices come through (:meth:`import_vertices`), every vertex authored by
a node slashed by a verified directive or by a synced ledger notice, whatever its
ancestry. Refusals are counted by reason in :attr:`QsdagPort.refused`
(``slashed_author`` = mesh door, ``AuthorSlashed`` = ledger rule).

Directives in the ledger serve two more purposes. A restarted agent reloads the ids
of the directives *it* anchored during the last directive lifetime
(:meth:`QsdagPort.anchored_directives`): that is its replay window, anchored instead of
kept in memory. And directives anchored by *other* nodes that arrive by DAG sync are
queued (:meth:`QsdagPort.take_synced_directives`) so a node that was offline when a
directive was published still gets it — verified, anchored by itself, then applied.

A refused vertex is not forgotten: it is held in a bounded quarantine and released
as soon as a vertex of an honest author names it as a parent. An honest node built on
it before it learnt of the slash (the registrar's own slash notice may descend from
it), and refusing it for good would orphan every honest vertex after it on this node
— DAG sync would never converge. A slashed author's vertex that no honest vertex
builds on stays out.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict, deque
from collections.abc import Sequence

from pqcnet.crypto.pqc import SigningKey, VerifyKey
from pqcnet.mesh import metrics
from pqcnet.mesh.envelope import NodeKeys
from pqcnet.mesh.errors import LedgerRejected
from pqcnet.mesh.messages import RouteAdvertisement
from pqcnet.qsdag import Ledger, OpaqueRecord, Route, Vertex, VertexKind
from pqcnet.qsdag.errors import LedgerError, MalformedVertex
from pqcnet.qsdag.payloads import decode_payload
from pqcnet.qsdag.vertex import decode

log = logging.getLogger("pqcnet.mesh.qsdag")

DIRECTIVE_CONTENT_TYPE = "pqcnet.mesh.SignedDirective"
#: Vertices of disabled authors held back on import (oldest dropped first). Bounds the
#: memory a slashed node can make us spend by flooding vertices nobody builds on.
MAX_QUARANTINE = 1024
#: Own vertices read back at most when reloading the directive replay window (bounds
#: start-up work on a node that writes many vertices per directive lifetime).
MAX_REPLAY_SCAN = 200_000
#: Directives from synced vertices waiting for the agent (oldest dropped first; a
#: dropped one is still in the ledger and may be re-published by governance).
MAX_SYNCED_DIRECTIVES = 1024


def directive_body(v: Vertex) -> bytes | None:
    """The signed directive a vertex anchors, or None if it anchors none."""
    if v.kind != VertexKind.GOVERNANCE_DIRECTIVE:
        return None
    try:
        rec = decode_payload(v.kind, v.payload)
    except LedgerError:
        return None
    if isinstance(rec, OpaqueRecord) and rec.content_type == DIRECTIVE_CONTENT_TYPE:
        return rec.body
    return None


class QsdagPort:
    """Adapter from :class:`pqcnet.qsdag.Ledger` to :class:`~pqcnet.mesh.ledger.LedgerPort`."""

    def __init__(self, ledger: Ledger, keys: NodeKeys) -> None:
        self.ledger = ledger
        self.keys = keys
        self.disabled: dict[str, str] = {}
        #: vertices refused on import, by reason
        self.refused: Counter[str] = Counter()
        #: id -> (parents, blob) of vertices refused for their author, oldest first
        self._quarantine: OrderedDict[bytes, tuple[tuple[bytes, ...], bytes]] = OrderedDict()
        #: quarantined vertices released because an honest vertex built on them
        self.released_vertices = 0
        self._synced: deque[bytes] = deque(maxlen=MAX_SYNCED_DIRECTIVES)

    def _append(self, kind: VertexKind, payload: object) -> bytes:
        try:
            return self.ledger.append(kind, payload, self.keys.node_id, self.keys.signing_key).id
        except LedgerError as exc:
            raise LedgerRejected(f"ledger refused {kind.name}: {exc}") from None

    def anchor_directive(self, signed_directive: bytes, subject: str) -> bytes:
        return self._append(VertexKind.GOVERNANCE_DIRECTIVE,
                            OpaqueRecord(DIRECTIVE_CONTENT_TYPE, subject or "*", signed_directive))

    def anchored_directives(self, since_ms: int) -> list[bytes]:
        """Signed directives this node anchored in vertices stamped at or after
        ``since_ms``, newest first (its own vertices, read back by counter)."""
        me = self.keys.node_id
        out: list[bytes] = []
        counter = self.ledger.next_counter(me) - 1
        for _ in range(MAX_REPLAY_SCAN):
            vid = self.ledger.by_author(me, counter) if counter >= 0 else None
            if vid is None:
                break
            v = self.ledger.get(vid)
            if v.timestamp_ms < since_ms:
                break
            body = directive_body(v)
            if body is not None:
                out.append(body)
            counter -= 1
        return out

    def take_synced_directives(self) -> list[bytes]:
        """Signed directives found in vertices of other nodes imported since the last call."""
        out = list(self._synced)
        self._synced.clear()
        return out

    def anchor_routes(self, advertisement: bytes) -> bytes:
        ad = RouteAdvertisement.decode(advertisement)
        last = b""
        for entry in ad.routes:
            if not entry.withdrawn:
                last = self._append(VertexKind.ROUTE, Route(entry.topic, entry.owner))
        return last

    def record_key_version(self, new_key: VerifyKey, signer: SigningKey) -> int:
        try:
            self.ledger.rotate_key(self.keys.node_id, signer, new_key)
        except LedgerError as exc:
            raise LedgerRejected(f"ledger refused key rotation: {exc}") from None
        version = self.ledger.views.key_versions.current(self.keys.node_id)
        if version is None:
            raise LedgerRejected("key rotation left no key version in force")
        return version

    def disable_author(self, node_id: str, reason: str) -> None:
        self.disabled[node_id] = reason
        if self.ledger.is_slashed(node_id):
            return
        try:
            self.ledger.slash(node_id, reason, self.keys.node_id, self.keys.signing_key)
        except LedgerError as exc:
            # not a registrar authority (or the target has no key): the registrar's
            # notice arrives by sync; the mesh door below applies meanwhile
            log.debug("slash not anchored by this node", extra={
                "target": node_id, "error": str(exc)})

    def is_disabled(self, node_id: str) -> bool:
        return node_id in self.disabled or self.ledger.is_slashed(node_id)

    def key_for(self, node_id: str, key_version: int) -> VerifyKey | None:
        try:
            return self.ledger.key_for(node_id, key_version)
        except LedgerError:
            return None

    def anchor_check(self, author: str) -> None:
        """Raise :class:`LedgerRejected` if ``author`` is slashed."""
        if self.is_disabled(author):
            reason = self.disabled.get(author, "slash notice in the ledger")
            raise LedgerRejected(f"author {author} is slashed ({reason})")

    def tips(self) -> list[bytes]:
        return self.ledger.tips()

    def vertex_count(self) -> int:
        return len(self.ledger)

    def genesis_id(self) -> bytes | None:
        return self.ledger.genesis_id

    def knows(self, vertex_id: bytes) -> bool:
        return self.ledger.has(vertex_id)

    def export_for(self, their_tips: Sequence[bytes], limit: int) -> list[bytes]:
        vs = self.ledger.export(self.ledger.tips(), known_tips=their_tips)
        return [v.encode() for v in vs[:limit]]

    def _refuse(self, reason: str) -> None:
        """Count a refused vertex here (tests, status) and for Prometheus (the ledger
        verify alert); ``reason`` comes from a fixed set, so the label set is bounded."""
        self.refused[reason] += 1
        metrics.DAG_REFUSED.labels(reason).inc()

    def import_vertices(self, blobs: Sequence[bytes]) -> int:
        accepted: list[bytes] = []
        wanted: list[bytes] = []  # parents named by honest vertices of this batch
        for blob in blobs:
            try:
                vertex = decode(blob)
            except MalformedVertex:
                self._refuse("malformed")
                continue
            if self.is_disabled(vertex.author):
                self._refuse("slashed_author")
                self._hold(vertex.id, vertex.parents, blob)
                continue
            accepted.append(blob)
            wanted.extend(vertex.parents)
        report = self.ledger.import_([*self._release(wanted), *accepted])
        for _, exc in report.rejected:
            self._refuse(type(exc).__name__)
        for vid in report.anchored:
            v = self.ledger.get(vid)
            body = directive_body(v) if v.author != self.keys.node_id else None
            if body is not None:
                self._synced.append(body)
        return len(report.anchored)

    def _hold(self, vertex_id: bytes, parents: tuple[bytes, ...], blob: bytes) -> None:
        self._quarantine[vertex_id] = (parents, blob)
        self._quarantine.move_to_end(vertex_id)
        while len(self._quarantine) > MAX_QUARANTINE:
            self._quarantine.popitem(last=False)

    def _release(self, wanted: list[bytes]) -> list[bytes]:
        """Quarantined vertices an honest vertex builds on, with their held ancestors."""
        out: list[bytes] = []
        while wanted:
            held = self._quarantine.pop(wanted.pop(), None)
            if held is not None:
                parents, blob = held
                out.append(blob)
                wanted.extend(parents)
        self.released_vertices += len(out)
        return out[::-1]  # ancestors first (the ledger parks out-of-order ones anyway)
