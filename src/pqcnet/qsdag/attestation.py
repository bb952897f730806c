"""Attestation events: what a node claims to be running, signed by the node.

A node measures itself (hash of every installed file of the ``pqcnet`` package,
generated protobuf code included, found through the package itself; the container
image digest given by ``PQCNET_IMAGE_DIGEST``, the hash of its config bytes), adds
an optional opaque TPM/HSM quote, a monotonic counter and a timestamp, and signs
the canonical encoding below with context ``pqcnet/attestation/v1``::

    lp(b"pqcnet/attestation/v1") lp(node_id) lp(role) lp(package_hash)
    lp(image_digest) lp(config_hash) lp(quote) u64 counter u64 timestamp_ms u32 key_version

The event is emitted into the QS-DAG as an ``ATTESTATION`` vertex; the ledger checks
its signature and that its counter increases. Whether the measurements are
*acceptable* is a policy question answered by :func:`verify_attestation` against an
allow-list (:class:`MeasurementPolicy`), e.g. by governance before paying rewards.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from pqcnet.crypto.errors import SignatureInvalid
from pqcnet.crypto.pqc import SigningKey, VerifyKey, length_prefixed
from pqcnet.proto import qsdag_pb2
from pqcnet.qsdag.errors import AttestationRejected, InvalidPayload
from pqcnet.qsdag.vertex import check_node_id

DOMAIN = b"pqcnet/attestation/v1"
#: The import package whose installed files make up the measured software.
MEASURED_PACKAGE = "pqcnet"
IMAGE_DIGEST_ENV = "PQCNET_IMAGE_DIGEST"
#: The base image's digest, baked into pqcnet images at build time (docker/Dockerfile
#: ``ARG BASE_IMAGE_DIGEST`` → ``ENV``); measured next to the running image's digest.
BASE_IMAGE_DIGEST_ENV = "PQCNET_BASE_IMAGE_DIGEST"
#: Largest TPM/HSM quote blob carried (quotes are a few KiB).
MAX_QUOTE = 16 * 1024


@dataclass(frozen=True, slots=True)
class Measurements:
    """What was measured on the node."""

    package_hash: bytes
    image_digest: str
    config_hash: bytes


@dataclass(frozen=True, slots=True)
class AttestationEvent:
    """A node's signed statement of its measurements (ATTESTATION payload)."""

    node_id: str
    role: str
    measurements: Measurements
    counter: int
    timestamp_ms: int
    key_version: int
    quote: bytes = b""
    signature: bytes = b""

    def signed_bytes(self) -> bytes:
        """Canonical encoding covered by the signature (module docstring)."""
        m = self.measurements
        return length_prefixed(
            DOMAIN, self.node_id.encode(), self.role.encode(), m.package_hash,
            m.image_digest.encode(), m.config_hash, self.quote,
        ) + struct.pack(">QQI", self.counter, self.timestamp_ms, self.key_version)

    @property
    def digest(self) -> bytes:
        """SHA3-256 over the signed bytes and signature: names this event in views."""
        return hashlib.sha3_256(self.signed_bytes() + self.signature).digest()

    def to_proto(self) -> qsdag_pb2.AttestationEvent:
        m = self.measurements
        return qsdag_pb2.AttestationEvent(
            node_id=self.node_id, role=self.role,
            measurements=qsdag_pb2.Measurements(package_hash=m.package_hash,
                                                image_digest=m.image_digest,
                                                config_hash=m.config_hash),
            quote=self.quote, counter=self.counter, timestamp_ms=self.timestamp_ms,
            key_version=self.key_version, signature=self.signature,
        )

    @classmethod
    def from_proto(cls, p: qsdag_pb2.AttestationEvent) -> AttestationEvent:
        check_node_id(p.node_id, "attestation node_id", error=InvalidPayload)
        if not p.role or len(p.role) > 64:
            raise InvalidPayload("attestation needs a role (<=64)")
        m = p.measurements
        if len(m.package_hash) != 32 or len(m.config_hash) != 32:
            raise InvalidPayload("package_hash and config_hash must be 32 bytes")
        if len(m.image_digest) > 256 or len(p.quote) > MAX_QUOTE:
            raise InvalidPayload("image digest or quote over its bound")
        if not p.signature or p.key_version < 1:
            raise InvalidPayload("attestation must be signed and name a key version")
        return cls(p.node_id, p.role, Measurements(m.package_hash, m.image_digest,
                                                   m.config_hash),
                   p.counter, p.timestamp_ms, p.key_version, p.quote, p.signature)


def installed_root() -> Path:
    """The directory of the installed ``pqcnet`` package, found through the package itself.

    Never by bare module names: another distribution may install a top-level ``proto``
    or ``sentry``, and measuring it would attest someone else's code.
    """
    root = importlib.resources.files(MEASURED_PACKAGE)
    if not isinstance(root, Path):  # a zipped or namespace install cannot be walked
        raise AttestationRejected(f"cannot measure {MEASURED_PACKAGE}: not installed as files")
    return root


def package_files(root: Path | None = None) -> list[tuple[str, Path]]:
    """(``pqcnet/relative/path``, file) for every file of the package, in sorted order.

    ``root`` defaults to :func:`installed_root`. Byte-code caches are skipped: they
    differ between runs without the code changing.
    """
    base = installed_root() if root is None else root
    out: list[tuple[str, Path]] = []
    for path in base.rglob("*"):
        if "__pycache__" in path.parts or path.suffix == ".pyc" or not path.is_file():
            continue
        out.append((f"{MEASURED_PACKAGE}/{path.relative_to(base).as_posix()}", path))
    out.sort(key=lambda item: item[0])
    return out


def package_hash(root: Path | None = None) -> bytes:
    """SHA3-256 over ``lp(path) ‖ SHA3-256(content)`` for each file of :func:`package_files`."""
    h = hashlib.sha3_256()
    for rel, path in package_files(root):
        h.update(length_prefixed(rel.encode(), hashlib.sha3_256(path.read_bytes()).digest()))
    return h.digest()


def image_identity(environ: Mapping[str, str]) -> str:
    """The measured image identity: the running image's digest as the orchestrator
    passes it (``PQCNET_IMAGE_DIGEST``), then ``base=<digest>`` of the base image the
    image was built from (``PQCNET_BASE_IMAGE_DIGEST``), comma-separated; empty outside
    an image."""
    parts = [environ.get(IMAGE_DIGEST_ENV, "").strip()]
    base = environ.get(BASE_IMAGE_DIGEST_ENV, "").strip()
    if base:
        parts.append(f"base={base}")
    return ",".join(p for p in parts if p)[:256]


def measure(config_bytes: bytes, *, env: Mapping[str, str] | None = None,
            root: Path | None = None) -> Measurements:
    """Measure the running node: the installed package, image digest (env), config."""
    environ = os.environ if env is None else env
    return Measurements(
        package_hash=package_hash(root),
        image_digest=image_identity(environ),
        config_hash=hashlib.sha3_256(config_bytes).digest(),
    )


def build_attestation(
    node_id: str, role: str, signer: SigningKey, counter: int, config_bytes: bytes,
    quote: bytes | None = None, *, key_version: int = 1, timestamp_ms: int | None = None,
    measurements: Measurements | None = None,
) -> AttestationEvent:
    """Measure this node and sign an :class:`AttestationEvent`."""
    if quote is not None and len(quote) > MAX_QUOTE:
        raise AttestationRejected(f"quote over {MAX_QUOTE} bytes")
    event = AttestationEvent(
        node_id=node_id, role=role,
        measurements=measurements or measure(config_bytes),
        counter=counter,
        timestamp_ms=int(time.time() * 1000) if timestamp_ms is None else timestamp_ms,
        key_version=key_version, quote=quote or b"",
    )
    return replace(event, signature=signer.sign(event.signed_bytes(), context=DOMAIN))


def check_signature(event: AttestationEvent, key: VerifyKey) -> None:
    """Raise :class:`AttestationRejected` unless the node's signature verifies."""
    try:
        key.verify(event.signature, event.signed_bytes(), context=DOMAIN)
    except SignatureInvalid as exc:
        raise AttestationRejected(f"attestation of {event.node_id}: {exc}") from None


@dataclass(frozen=True, slots=True)
class MeasurementPolicy:
    """Allow-lists of acceptable measurements; ``None`` means "not checked"."""

    package_hashes: frozenset[bytes]
    config_hashes: frozenset[bytes] | None = None
    image_digests: frozenset[str] | None = None
    roles: frozenset[str] | None = None
    require_quote: bool = False


def verify_attestation(
    event: AttestationEvent, key: VerifyKey, policy: MeasurementPolicy
) -> None:
    """Check signature and measurements against ``policy``; raise with the first reason."""
    check_signature(event, key)
    m = event.measurements
    if m.package_hash not in policy.package_hashes:
        raise AttestationRejected(f"{event.node_id}: package hash {m.package_hash.hex()[:16]}… "
                                  "not allow-listed")
    if policy.config_hashes is not None and m.config_hash not in policy.config_hashes:
        raise AttestationRejected(f"{event.node_id}: config hash not allow-listed")
    if policy.image_digests is not None and m.image_digest not in policy.image_digests:
        raise AttestationRejected(f"{event.node_id}: image digest {m.image_digest!r} "
                                  "not allow-listed")
    if policy.roles is not None and event.role not in policy.roles:
        raise AttestationRejected(f"{event.node_id}: role {event.role!r} not allowed")
    if policy.require_quote and not event.quote:
        raise AttestationRejected(f"{event.node_id}: a TPM/HSM quote is required")
