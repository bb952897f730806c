"""The audit: re-check every stored vertex in anchoring order (``pqcnet ledger verify``).

Why a replay of its own instead of re-running the anchoring rules: those rules read
the views, and the audit must catch a damaged view too. So :class:`Replay` rebuilds
the key registry and the slash rule from the vertices themselves, in memory, and
checks each vertex against that: parents anchored before it, counters without gaps,
key version in force, signature, slash ancestry. Every invalid vertex is reported
with its reason; the audit never stops at the first one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from pqcnet.crypto.errors import CryptoError
from pqcnet.crypto.pqc import VerifyKey
from pqcnet.qsdag.errors import KeyVersionMismatch, LedgerError, MalformedVertex
from pqcnet.qsdag.parallel import ParallelVerifier
from pqcnet.qsdag.payloads import Genesis, KeyRecord, decode_payload
from pqcnet.qsdag.receipts import VerifyReport
from pqcnet.qsdag.rules import verify_key, verify_signature
from pqcnet.qsdag.slashing import SlashAudit
from pqcnet.qsdag.store import U64, Store
from pqcnet.qsdag.vertex import Vertex


class Replay:
    """The state rebuilt from the vertices seen so far, and the check of the next one."""

    def __init__(self) -> None:
        self.keys: dict[tuple[str, int], VerifyKey] = {}
        #: key version in force per node
        self.current: dict[str, int] = {}
        #: last counter per author
        self.counters: dict[str, int] = {}
        #: anchored ids -> position
        self.seen: dict[bytes, int] = {}
        self.slashes = SlashAudit(())

    def check(self, v: Vertex, vid: bytes, position: int) -> None:
        """Raise the typed error anchoring would have raised; else record ``v``."""
        payload = decode_payload(v.kind, v.payload)
        for p in v.parents:
            if p not in self.seen:
                raise MalformedVertex(f"parent {p.hex()[:16]} not anchored before it")
        expected = self.counters.get(v.author, -1) + 1
        if v.counter != expected:
            raise MalformedVertex(f"counter {v.counter}, expected {expected}")
        if isinstance(payload, Genesis):
            self.slashes.authorities = {a.node_id for a in payload.authorities}
            for a in payload.authorities:
                self._register(a, v.author, vid)
        elif (isinstance(payload, KeyRecord) and v.author not in self.current
              and payload.node_id == v.author):
            self.keys[(v.author, 1)] = verify_key(payload, vid)
            self.current[v.author] = 1
        if self.current.get(v.author) != v.key_version:
            raise KeyVersionMismatch(f"key version {v.key_version} not in force")
        verify_signature(self.keys[(v.author, v.key_version)], v, vid)
        self.slashes.check(v, vid, payload)
        if isinstance(payload, KeyRecord):
            self._register(payload, v.author, vid)
        self.counters[v.author] = v.counter
        self.seen[vid] = position

    def _register(self, rec: KeyRecord, registrar: str, vid: bytes) -> None:
        self.keys[(rec.node_id, rec.key_version)] = verify_key(rec, vid)
        self.current[rec.node_id] = rec.key_version
        self.slashes.registered_by[(rec.node_id, rec.key_version)] = registrar


#: One stored row as the audit reads it: position, id (None if unreadable), and the
#: vertex or the error reading it raised.
Row = tuple[int, bytes | None, Vertex | Exception]
_READ_ERRORS = (LedgerError, CryptoError, AssertionError)


def _rows(store: Store, get: Callable[[bytes], Vertex]) -> Iterator[Row]:
    for pos_key in store.keys("positions"):
        position = U64.unpack(pos_key)[0]
        vid = None
        try:
            vid = store.get("positions", pos_key)
            assert vid is not None
            yield position, vid, get(vid)
        except _READ_ERRORS as exc:
            yield position, vid, exc


def _checkable(row: Row) -> tuple[Row, Vertex | None]:
    return row, row[2] if isinstance(row[2], Vertex) else None


def audit(store: Store, get: Callable[[bytes], Vertex],
          progress: Callable[[int], None] | None = None,
          verifier: ParallelVerifier | None = None) -> VerifyReport:
    """Replay every vertex of ``store`` (read with ``get``) in anchoring order;
    ``verifier`` checks the signatures ahead of the replay on other cores."""
    replay = Replay()
    if verifier is None:
        return _replay(_rows(store, get), replay, progress)
    with verifier.ahead(_rows(store, get), _checkable,
                        lambda node, version: replay.keys.get((node, version))) as rows:
        return _replay(rows, replay, progress)


def _replay(rows: Iterable[Row], replay: Replay,
            progress: Callable[[int], None] | None) -> VerifyReport:
    report = VerifyReport()
    for position, vid, vertex in rows:
        report.checked += 1
        if progress:
            progress(1)
        vid_hex = "?" if vid is None else vid.hex()
        try:
            if isinstance(vertex, Exception):
                raise vertex
            assert vid is not None
            replay.check(vertex, vid, position)
        except _READ_ERRORS as exc:
            report.invalid.append((vid_hex, f"{type(exc).__name__}: {exc}"))
    return report
