"""Audit views of the DAG through ``networkx``.

An auditor (or governance) exports the stored graph and asks graph questions
without trusting the ledger's own indexes: is it acyclic, in what order can it be
replayed, what does a vertex depend on, and how *confirmed* is a vertex — the
number of distinct authors whose vertices reference it transitively (a vertex seen
by many independent authors is hard to deny later).

Edges point from parent to child (the direction history flows).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import networkx as nx

from pqcnet.qsdag.ledger import Ledger


def to_graph(ledger: Ledger) -> Any:
    """A ``networkx.DiGraph`` of every anchored vertex (node = id hex, edge parent→child).

    Node attributes: ``kind``, ``author``, ``counter``, ``timestamp_ms``, ``depth``,
    ``position``.
    """
    g = nx.DiGraph()
    for vid in ledger.ids():
        v = ledger.get(vid)
        r = ledger.receipt(vid)
        g.add_node(vid.hex(), kind=v.kind.name, author=v.author, counter=v.counter,
                   timestamp_ms=v.timestamp_ms, depth=r.depth, position=r.position)
        for p in v.parents:
            g.add_edge(p.hex(), vid.hex())
    return g


def is_acyclic(graph: Any) -> bool:
    return bool(nx.is_directed_acyclic_graph(graph))


def topological_order(graph: Any) -> list[str]:
    """A replay order (parents before children), ties broken by anchoring position."""
    pos = nx.get_node_attributes(graph, "position")
    return list(nx.lexicographical_topological_sort(graph, key=lambda n: pos.get(n, 0)))


def ancestry(graph: Any, vertex: str) -> set[str]:
    """All vertices ``vertex`` transitively depends on."""
    return set(nx.ancestors(graph, vertex))


def confirmation_depth(graph: Any, vertex: str) -> int:
    """Number of distinct authors (other than its own) of vertices descending from it."""
    authors = nx.get_node_attributes(graph, "author")
    own = authors.get(vertex)
    return len({authors[d] for d in nx.descendants(graph, vertex) if authors.get(d) != own})


def write_graph(graph: Any, path: str | Path) -> str:
    """Write GraphML (``.graphml``) or node-link JSON (anything else); returns the format."""
    path = Path(path)
    if path.suffix == ".graphml":
        nx.write_graphml(graph, path)
        return "graphml"
    import json

    path.write_text(json.dumps(nx.node_link_data(graph, edges="edges"), indent=1))
    return "json"
