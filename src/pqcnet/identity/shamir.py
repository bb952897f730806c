"""Shamir k-of-n custody of an ML-DSA key: split into share files, combine in memory.

The secret split is the key's 32-byte FIPS 204 seed. Splitting and combining use
``shamir-mnemonic``, the SLIP-0039 reference implementation (Trezor): GF(256)
Shamir with a 4-byte HMAC digest of the secret inside the sharing and an RS1024
checksum on every share — we do not run a field of our own. Each custodian gets
one share file (the SLIP-39 mnemonic plus which key it belongs to); the node keeps
a public **manifest**: the public key and the SHA-256 of every share.

A share is checked four ways, so a tampered one is caught and named:
  1. manifest digest — which custodian's share was altered (before combining);
  2. the SLIP-39 RS1024 checksum — a mistyped or corrupted word;
  3. the SLIP-39 digest share — a value altered with a recomputed checksum;
  4. the combined seed must expand to the manifest's public key (256-bit commitment).

Where shares come from is a :class:`ShareSource`: files here (``pqcnet keys combine``,
tests), custodians over QSTP in :mod:`pqcnet.runtime.shares`.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import shamir_mnemonic
from shamir_mnemonic import MnemonicError

from pqcnet.crypto.errors import CryptoError
from pqcnet.crypto.pqc import ALGORITHMS, SigningKey, VerifyKey
from pqcnet.identity.errors import KeyStoreError, NotEnoughShares, ShareError, ShareTampered
from pqcnet.identity.keystore import atomic_write, key_from_seed, key_seed, read_bounded

SHARE_FORMAT = "pqcnet-key-share/1"
MANIFEST_FORMAT = "pqcnet-key-shares/1"
#: SLIP-39 allows at most 16 shares in a group.
MAX_SHARES = 16
#: A share file / manifest is well under this (33 words; a public key and 16 digests).
MAX_SHARE_FILE_BYTES = 16 * 1024
#: PBKDF2 cost exponent inside SLIP-39 (10000 * 2**e iterations); we use no
#: passphrase, so this only sets the library's fixed cost: keep it the minimum.
_ITERATION_EXPONENT = 0


@dataclass(frozen=True, slots=True)
class KeyShare:
    """One custodian's share of one key."""

    #: ML-DSA parameter set of the key
    algorithm: str
    #: SHA-256 of the key's raw public key (which key this share belongs to)
    key_id: bytes
    threshold: int
    shares: int
    #: 1-based share number (SLIP-39 member index + 1)
    index: int
    #: the SLIP-39 share mnemonic (secret)
    mnemonic: str

    @property
    def digest(self) -> bytes:
        """SHA-256 of the mnemonic: what the manifest records for this share."""
        return hashlib.sha256(self.mnemonic.encode()).digest()

    def to_json(self) -> dict[str, Any]:
        return {"format": SHARE_FORMAT, "algorithm": self.algorithm, "key_id": self.key_id.hex(),
                "threshold": self.threshold, "shares": self.shares, "index": self.index,
                "mnemonic": self.mnemonic}

    @classmethod
    def from_json(cls, doc: object, where: str = "share") -> KeyShare:
        """Parse and sanity-check; anything malformed is a :class:`ShareError`."""
        try:
            if not isinstance(doc, dict) or doc.get("format") != SHARE_FORMAT:
                raise ValueError(f"not a {SHARE_FORMAT} document")
            share = cls(
                algorithm=_signature_algorithm(doc["algorithm"]),
                key_id=bytes.fromhex(str(doc["key_id"])),
                threshold=_int(doc["threshold"]), shares=_int(doc["shares"]),
                index=_int(doc["index"]), mnemonic=str(doc["mnemonic"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ShareError(f"{where} is malformed: {exc}") from None
        check_counts(share.shares, share.threshold)
        if len(share.key_id) != 32 or not 1 <= share.index <= share.shares:
            raise ShareError(f"{where} is malformed: bad key id or index {share.index}")
        return share

    def __repr__(self) -> str:  # never print the mnemonic
        return (f"KeyShare({self.index}/{self.shares}, k={self.threshold}, "
                f"key {self.key_id.hex()[:16]})")


@dataclass(frozen=True, slots=True)
class ShareManifest:
    """Public facts about a split key: its public key and the digest of every share."""

    public_key: VerifyKey
    threshold: int
    shares: int
    #: share index -> SHA-256 of that share's mnemonic
    digests: dict[int, bytes]

    @property
    def key_id(self) -> bytes:
        return self.public_key.key_id

    def check(self, share: KeyShare) -> None:
        """Raise :class:`ShareTampered` unless ``share`` is the one recorded for its index."""
        if (share.key_id != self.key_id or share.algorithm != self.public_key.algorithm
                or share.threshold != self.threshold or share.shares != self.shares):
            raise ShareTampered(f"share {share.index} belongs to a different key or split")
        if self.digests.get(share.index) != share.digest:
            raise ShareTampered(f"share {share.index} does not match the manifest digest "
                                "(tampered or from another split)")

    def to_json(self) -> dict[str, Any]:
        return {"format": MANIFEST_FORMAT, "algorithm": self.public_key.algorithm,
                "public_key": base64.b64encode(self.public_key.raw).decode(),
                "key_id": self.key_id.hex(), "threshold": self.threshold, "shares": self.shares,
                "digests": {str(i): d.hex() for i, d in sorted(self.digests.items())}}

    @classmethod
    def from_json(cls, doc: object, where: str = "manifest") -> ShareManifest:
        try:
            if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"not a {MANIFEST_FORMAT} document")
            public = VerifyKey.from_raw(_signature_algorithm(doc["algorithm"]),
                                        base64.b64decode(doc["public_key"], validate=True))
            digests = {_int(i): bytes.fromhex(str(d)) for i, d in dict(doc["digests"]).items()}
            manifest = cls(public, _int(doc["threshold"]), _int(doc["shares"]), digests)
        except (ValueError, KeyError, TypeError, CryptoError) as exc:
            raise ShareError(f"{where} is malformed: {exc}") from None
        check_counts(manifest.shares, manifest.threshold)
        if sorted(digests) != list(range(1, manifest.shares + 1)):
            raise ShareError(f"{where} is malformed: digests must cover 1..{manifest.shares}")
        return manifest


# --------------------------------------------------------------------------- split/combine


def check_counts(shares: int, threshold: int) -> None:
    """2 <= threshold <= shares <= 16, or a clear :class:`ShareError`."""
    if not 2 <= shares <= MAX_SHARES:
        raise ShareError(f"share count must be 2..{MAX_SHARES}, got {shares}")
    if not 2 <= threshold <= shares:
        raise ShareError(f"threshold must be 2..{shares} (the share count), got {threshold}")


def split_key(key: SigningKey, shares: int, threshold: int) -> tuple[ShareManifest, list[KeyShare]]:
    """Split ``key``'s seed into ``shares`` shares, any ``threshold`` of which rebuild it."""
    check_counts(shares, threshold)
    mnemonics = shamir_mnemonic.generate_mnemonics(
        1, [(threshold, shares)], key_seed(key), b"", extendable=True,
        iteration_exponent=_ITERATION_EXPONENT,
    )[0]
    out = [KeyShare(key.algorithm, key.key_id, threshold, shares, i + 1, m)
           for i, m in enumerate(mnemonics)]
    manifest = ShareManifest(key.public_key, threshold, shares, {s.index: s.digest for s in out})
    return manifest, out


def combine_key(shares: Iterable[KeyShare], manifest: ShareManifest | None = None) -> SigningKey:
    """Rebuild the key from at least ``threshold`` shares, in memory only.

    Every share is checked against ``manifest`` when given (which share is bad, by
    index); without one, the shares must agree on key and split. Exactly
    ``threshold`` of them are combined; the seed buffer is zeroised after use.
    """
    distinct: dict[int, KeyShare] = {}
    for share in shares:
        if manifest is not None:
            manifest.check(share)
        seen = distinct.setdefault(share.index, share)
        if seen.mnemonic != share.mnemonic:
            raise ShareTampered(f"two different shares claim index {share.index}")
    if not distinct:
        raise NotEnoughShares("no shares given")
    first = next(iter(distinct.values()))
    for share in distinct.values():
        if (share.key_id, share.algorithm, share.threshold, share.shares) != (
                first.key_id, first.algorithm, first.threshold, first.shares):
            raise ShareError(f"shares {first.index} and {share.index} belong to different "
                             "keys or splits")
    if len(distinct) < first.threshold:
        raise NotEnoughShares(f"{len(distinct)} share(s) given, {first.threshold} needed "
                              f"(a {first.threshold}-of-{first.shares} split)")
    chosen = [distinct[i] for i in sorted(distinct)[: first.threshold]]
    for share in chosen:
        _check_slip39_index(share)
    try:
        raw = shamir_mnemonic.combine_mnemonics([s.mnemonic for s in chosen], b"")
    except MnemonicError as exc:
        raise ShareTampered(f"shares {', '.join(str(s.index) for s in chosen)} do not combine "
                            f"(a share is corrupt or tampered): {exc}") from None
    seed = bytearray(raw)
    del raw  # the library returns immutable bytes: dropped, not wiped
    try:
        key = key_from_seed(seed, first.algorithm)
    except KeyStoreError as exc:
        raise ShareTampered(f"combined secret is not a key: {exc}") from None
    if key.key_id != first.key_id:
        raise ShareTampered("combined key does not match the expected public key "
                            "(a share is tampered)")
    return key


def _check_slip39_index(share: KeyShare) -> None:
    try:
        parsed = shamir_mnemonic.Share.from_mnemonic(share.mnemonic)
    except MnemonicError as exc:
        raise ShareTampered(f"share {share.index} is corrupt or tampered: {exc}") from None
    if parsed.index != share.index - 1 or parsed.member_threshold != share.threshold:
        raise ShareTampered(f"share {share.index}: its mnemonic is for a different index "
                            "or threshold")


# --------------------------------------------------------------------------- files


def write_share(path: Path, share: KeyShare) -> None:
    """One custodian's share file (0600)."""
    atomic_write(path, json.dumps(share.to_json(), indent=1).encode() + b"\n", mode=0o600)


def read_share(path: Path) -> KeyShare:
    return KeyShare.from_json(_read_json(path, "share"), str(path))


def write_manifest(path: Path, manifest: ShareManifest) -> None:
    atomic_write(path, json.dumps(manifest.to_json(), indent=1).encode() + b"\n")


def read_manifest(path: Path) -> ShareManifest:
    return ShareManifest.from_json(_read_json(path, "share manifest"), str(path))


def _read_json(path: Path, what: str) -> object:
    raw = read_bounded(path, MAX_SHARE_FILE_BYTES, what)
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ShareError(f"{path} is not JSON: {exc}") from None


# --------------------------------------------------------------------------- key store


class ShareSource(Protocol):
    """Where a starting node gets shares from (files, or custodians over QSTP)."""

    def gather(self, manifest: ShareManifest) -> list[KeyShare]:
        """At least ``manifest.threshold`` shares that pass ``manifest.check``, or a
        :class:`ShareError` saying what was missing."""
        ...


class FileShareSource:
    """Share files on local disk (the dev/test path, ``pqcnet keys combine``)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = [Path(p) for p in paths]

    def gather(self, manifest: ShareManifest) -> list[KeyShare]:
        return [read_share(p) for p in self.paths]


class ShamirKeyStore:
    """A key held as k-of-n shares: ``load`` gathers and combines, ``store`` splits.

    ``store`` writes the manifest and ``share-<i>.json`` files into ``share_dir`` for
    hand-over to custodians; it needs ``shares``/``threshold``.
    """

    def __init__(self, manifest_path: Path, source: ShareSource | None, *,
                 share_dir: Path | None = None, shares: int = 0, threshold: int = 0) -> None:
        self.manifest_path = Path(manifest_path)
        self.source = source
        self.share_dir = share_dir
        self.shares = shares
        self.threshold = threshold

    def load(self) -> SigningKey:
        manifest = read_manifest(self.manifest_path)
        if self.source is None:
            raise KeyStoreError(f"Shamir key {self.manifest_path}: no share source configured "
                                "(share files or custodians)")
        return combine_key(self.source.gather(manifest), manifest)

    def store(self, key: SigningKey) -> None:
        if self.share_dir is None:
            raise KeyStoreError("a Shamir key store writes shares only with a share_dir "
                                "(or use `pqcnet keys split`)")
        manifest, shares = split_key(key, self.shares, self.threshold)
        for share in shares:
            write_share(self.share_dir / f"share-{share.index}.json", share)
        write_manifest(self.manifest_path, manifest)

    def describe(self) -> str:
        return f"shamir shares, manifest {self.manifest_path}"


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected an integer, got {value!r}")
    return int(value)


def _signature_algorithm(value: object) -> str:
    name = str(value)
    if name not in ALGORITHMS or ALGORITHMS[name].kind != "sig":
        raise ValueError(f"unknown signature algorithm {name!r}")
    return name
