"""DTN store-and-forward: bundles for unreachable peers, kept in RocksDB.

Waku relay delivers only to nodes online at publish time. When gossip (anomalies,
revocations, CRL updates) or a directive is meant for a peer whose announcements
have lapsed, the signed envelope is kept here as a *bundle* (destination, created,
expires, payload) and forwarded — sealed to the peer's current key — as soon as
its announcements resume. Bundles past their expiry are never forwarded: they are
purged by :meth:`BundleStore.expire` and skipped by :meth:`BundleStore.pending`.

Keys: ``b"B" ‖ sha256(destination)[:16] ‖ created_ms:u64 ‖ bundle_id`` so one
prefix scan yields a destination's bundles oldest first. Writes are synchronous
(WAL fsync) when ``sync=True``: a bundle accepted is a bundle kept across a crash.
A full store refuses new bundles with :class:`BundleStoreError` instead of evicting
someone else's; so does a destination already holding ``max_per_destination`` bundles
(one peer that never returns cannot use up the room every other absent peer needs).

The node runtime keeps one store per node under its data directory and hands it to
the :class:`~pqcnet.mesh.agent.ControlPlaneAgent`; what is held survives a restart of the
holder and is forwarded when the destination's announcements resume.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

import rocksdict

from pqcnet._util.rocks import DurableWrites
from pqcnet.mesh import metrics
from pqcnet.mesh._pb import parse
from pqcnet.mesh.errors import BundleStoreError, ConfigError
from pqcnet.proto import mesh_pb2

#: Bundles held at most (all destinations); bounds disk use while peers are away.
DEFAULT_MAX_BUNDLES = 100_000
#: Bundles held at most for one destination; bounds what one absent peer can take.
DEFAULT_MAX_PER_DESTINATION = 10_000
#: Largest bundle payload.
MAX_BUNDLE_BYTES = 128 * 1024

_PREFIX = b"B"
_U64 = struct.Struct(">Q")


@dataclass(frozen=True, slots=True)
class Bundle:
    """One held message."""

    bundle_id: bytes
    destination: str
    created_ms: int
    expires_ms: int
    payload: bytes

    def encode(self) -> bytes:
        return mesh_pb2.Bundle(bundle_id=self.bundle_id, destination=self.destination,
                               created_ms=self.created_ms, expires_ms=self.expires_ms,
                               payload=self.payload).SerializeToString()

    @classmethod
    def decode(cls, data: bytes) -> Bundle:
        pb = parse(mesh_pb2.Bundle, data, BundleStoreError, "corrupt bundle record")
        return cls(pb.bundle_id, pb.destination, pb.created_ms, pb.expires_ms, pb.payload)


def _dest_prefix(destination: str) -> bytes:
    return _PREFIX + hashlib.sha256(destination.encode()).digest()[:16]


class BundleStore:
    """RocksDB-backed bundle store."""

    def __init__(self, path: str | Path, *, max_bundles: int = DEFAULT_MAX_BUNDLES,
                 max_per_destination: int = DEFAULT_MAX_PER_DESTINATION,
                 sync: bool = True) -> None:
        if max_bundles < 1 or max_per_destination < 1:
            raise ConfigError("max_bundles and max_per_destination must be >= 1")
        self.max_bundles = max_bundles
        self.max_per_destination = max_per_destination
        try:
            self._db = rocksdict.Rdict(str(path), options=rocksdict.Options(raw_mode=True))
        except Exception as exc:  # rocksdict raises plain Exception on open failures
            raise BundleStoreError(f"cannot open bundle store at {path}: {exc}") from None
        self._writes = DurableWrites(self._db, sync)
        self._count = sum(1 for _ in self._scan(_PREFIX))
        metrics.BUNDLES.set(self._count)

    def close(self) -> None:
        self._db.close()

    def __len__(self) -> int:
        return self._count

    def _scan(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        out = []
        it = self._db.iter()
        it.seek(prefix)
        while it.valid() and it.key().startswith(prefix):
            out.append((bytes(it.key()), bytes(it.value())))
            it.next()
        return out

    def put(self, destination: str, payload: bytes, *, created_ms: int, expires_ms: int) -> Bundle:
        """Hold ``payload`` for ``destination`` until ``expires_ms``; idempotent per payload."""
        if len(payload) > MAX_BUNDLE_BYTES:
            metrics.BUNDLE_EVENTS.labels("rejected").inc()
            raise BundleStoreError(f"bundle of {len(payload)} bytes over {MAX_BUNDLE_BYTES}")
        if expires_ms <= created_ms:
            metrics.BUNDLE_EVENTS.labels("rejected").inc()
            raise BundleStoreError("bundle already expired")
        bundle_id = hashlib.sha256(destination.encode() + b"\0" + payload).digest()
        bundle = Bundle(bundle_id, destination, created_ms, expires_ms, payload)
        key = _dest_prefix(destination) + _U64.pack(created_ms) + bundle_id
        held = self._scan(_dest_prefix(destination))
        for k, _ in held:
            if k.endswith(bundle_id):
                return bundle
        live = sum(1 for _, v in held if Bundle.decode(v).expires_ms > created_ms)
        if live >= self.max_per_destination:
            metrics.BUNDLE_EVENTS.labels("rejected").inc()
            raise BundleStoreError(f"{live} bundles already held for {destination!r} "
                                   f"(limit {self.max_per_destination})")
        if self._count >= self.max_bundles:
            self.expire(created_ms)
            if self._count >= self.max_bundles:
                metrics.BUNDLE_EVENTS.labels("rejected").inc()
                raise BundleStoreError(f"bundle store full ({self.max_bundles} bundles)")
        self._writes.put(key, bundle.encode())
        self._count += 1
        metrics.BUNDLES.set(self._count)
        metrics.BUNDLE_EVENTS.labels("stored").inc()
        return bundle

    def pending(self, destination: str, now_ms: int) -> list[Bundle]:
        """Unexpired bundles for ``destination``, oldest first."""
        out = []
        for _, value in self._scan(_dest_prefix(destination)):
            b = Bundle.decode(value)
            if b.destination == destination and b.expires_ms > now_ms:
                out.append(b)
        return out

    def remove(self, bundle: Bundle) -> None:
        """Drop a bundle once it has been forwarded."""
        key = _dest_prefix(bundle.destination) + _U64.pack(bundle.created_ms) + bundle.bundle_id
        if self._db.get(key) is not None:
            self._writes.delete(key)
            self._count -= 1
            metrics.BUNDLES.set(self._count)
            metrics.BUNDLE_EVENTS.labels("forwarded").inc()

    def expire(self, now_ms: int) -> int:
        """Delete every expired bundle; returns how many."""
        gone = 0
        batch = rocksdict.WriteBatch(raw_mode=True)  # one write (and one sync) for all
        for key, value in self._scan(_PREFIX):
            if Bundle.decode(value).expires_ms <= now_ms:
                batch.delete(key)
                gone += 1
        if gone:
            self._writes.write(batch)
        self._count -= gone
        metrics.BUNDLES.set(self._count)
        if gone:
            metrics.BUNDLE_EVENTS.labels("expired").inc(gone)
        return gone

    def destinations(self) -> set[str]:
        return {Bundle.decode(v).destination for _, v in self._scan(_PREFIX)}
