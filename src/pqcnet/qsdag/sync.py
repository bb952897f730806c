"""DAG sync with no I/O: what a peer lacks, exporting it, importing a peer's vertices.

The transport (mesh over Waku) carries the three messages — the remote's tips, the
ids we ask for, the exported vertices. A round: ``need = local.missing(remote.tips())``;
the remote answers ``remote.export(need, known_tips=local.tips())`` — everything
``need`` depends on that is not already below our tips — and we ``import_`` it.
Import tolerates any order (orphans wait for their ancestry), so repeated rounds
between any peers converge to the same vertex set and tips. :func:`pull` is one
round between two ledgers in one process.

The functions take the ledger as a :class:`Dag` (what they read) so they stay apart
from the ledger's write path; :class:`~pqcnet.qsdag.ledger.Ledger` exposes them as
methods.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import Protocol

from pqcnet.qsdag.errors import MalformedVertex, NotFound, Rejection, VertexParked
from pqcnet.qsdag.receipts import AnchorReceipt, ImportReport
from pqcnet.qsdag.vertex import Vertex, decode


class Dag(Protocol):
    """The anchored DAG as sync reads it (a :class:`Ledger` is one)."""

    def has(self, vid: bytes) -> bool: ...

    def get(self, vid: bytes) -> Vertex: ...

    def receipt(self, vid: bytes) -> AnchorReceipt: ...

    def tips(self) -> list[bytes]: ...


class WritableDag(Dag, Protocol):
    """A DAG that also anchors vertices (a :class:`Ledger` is one)."""

    def verify_and_anchor(self, v: Vertex) -> AnchorReceipt: ...

    def is_parked(self, vid: bytes) -> bool: ...


def missing(dag: Dag, have_ids: Iterable[bytes]) -> list[bytes]:
    """Of ``have_ids`` (e.g. a peer's tips), those ``dag`` has not anchored."""
    return [i for i in dict.fromkeys(have_ids) if not dag.has(i)]


def ancestors(dag: Dag, ids: Iterable[bytes], *, stop: set[bytes] | None = None) -> set[bytes]:
    """``ids`` and all their anchored ancestors, not descending below ``stop``."""
    seen: set[bytes] = set()
    stack = [i for i in ids if dag.has(i)]
    stop = stop or set()
    while stack:
        vid = stack.pop()
        if vid in seen or vid in stop:
            continue
        seen.add(vid)
        stack.extend(p for p in dag.get(vid).parents if p not in seen)
    return seen


def export(dag: Dag, ids: Iterable[bytes], *, ancestors: bool = True,
           known_tips: Iterable[bytes] = ()) -> list[Vertex]:
    """Vertices for ``ids`` (and, by default, their ancestors that a peer whose tips
    are ``known_tips`` lacks), in ``dag``'s anchoring order.

    Cost is proportional to the vertices between ``ids`` and ``known_tips``, not to
    the ledger (see :func:`lacking`); ``known_tips`` we do not have are ignored, so a
    peer that is ahead of us on other branches gets more than it needs, never less.
    """
    wanted = (lacking(dag, ids, known_tips) if ancestors
              else {i for i in ids if dag.has(i)})
    order = sorted(wanted, key=lambda i: dag.receipt(i).position)
    return [dag.get(i) for i in order]


def lacking(dag: Dag, ids: Iterable[bytes], known: Iterable[bytes]) -> set[bytes]:
    """``ancestors(ids) - ancestors(known)`` without walking either to genesis.

    Both sets are painted down the DAG together in decreasing depth order (a parent
    is strictly shallower than its child), so when a vertex is popped every path from
    above has already reached it and its colour is final; the walk stops as soon as
    nothing "wanted" is left in the frontier.
    """
    want, have = 1, 2
    colour: dict[bytes, int] = {}
    heap: list[tuple[int, bytes]] = []
    pending = 0  # frontier entries currently coloured "want"

    def push(vid: bytes, c: int) -> None:
        nonlocal pending
        prev = colour.get(vid)
        if prev is None:
            try:
                depth = dag.receipt(vid).depth
            except NotFound:
                return
            colour[vid] = c
            heapq.heappush(heap, (-depth, vid))
            pending += c == want
        elif prev == want and c == have:
            colour[vid] = have
            pending -= 1

    for vid in known:
        push(vid, have)
    for vid in ids:
        push(vid, want)
    out: set[bytes] = set()
    while heap and pending:
        _, vid = heapq.heappop(heap)
        c = colour[vid]
        if c == want:
            out.add(vid)
            pending -= 1
        for p in dag.get(vid).parents:
            push(p, c)
    return out


def import_(dag: WritableDag, vertices: Iterable[Vertex | bytes]) -> ImportReport:
    """Verify and anchor vertices from a peer; nothing is lost to ordering.

    Vertices may arrive in any order: those waiting for ancestry are parked and
    released as the rest arrives. Bytes are decoded first (bad bytes are reported).
    """
    report = ImportReport()
    for item in vertices:
        try:
            v = decode(item) if isinstance(item, bytes) else item
            vid = v.id
        except MalformedVertex as exc:
            report.rejected.append((None, exc))
            continue
        if dag.has(vid):
            report.duplicates.append(vid)
            continue
        try:
            receipt = dag.verify_and_anchor(v)
        except VertexParked:
            report.parked.append(vid)
            continue
        except Rejection as exc:
            report.rejected.append((vid, exc))
            continue
        report.anchored.append(vid)
        report.anchored.extend(r.id for r in receipt.released)
    report.parked = [p for p in report.parked if dag.is_parked(p)]
    return report


def pull(local: WritableDag, remote: Dag) -> ImportReport:
    """Bring everything ``remote`` has into ``local`` (in-process convenience)."""
    need = missing(local, remote.tips())
    if not need:
        return ImportReport()
    return import_(local, export(remote, need, known_tips=local.tips()))
