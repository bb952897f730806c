"""Post-quantum primitives: ML-KEM, ML-DSA, and a hybrid one-shot seal.

Everything signed in pqcnet (QS-DAG vertices, attestations, directives, assertions)
goes through :class:`SigningKey` / :class:`VerifyKey`; everything sealed to a
recipient (control-plane gossip) goes through :func:`seal` / :func:`open_sealed`.
Domain separation uses ML-DSA's FIPS 204 *context string*, so a signature made for
one object type can never verify as another.

The seal is a KEM-combiner in the X-Wing style: X25519 and ML-KEM-768 shared
secrets are both fed to HKDF-SHA256 together with the ciphertexts and the
recipient's public keys, so the result stays secret while *either* primitive holds.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from typing import Literal

from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import mldsa, mlkem, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pqcnet.crypto.errors import CryptoError, SealError, SignatureInvalid

# --------------------------------------------------------------------------- registry


@dataclass(frozen=True, slots=True)
class Algorithm:
    """One PQ algorithm and its sizes in bytes (FIPS 203 / FIPS 204)."""

    name: str
    kind: Literal["kem", "sig"]
    nist_level: int
    public_key_size: int
    #: signature size (sig) or ciphertext size (kem)
    output_size: int
    #: shared-secret size (kem); 0 for signatures
    shared_secret_size: int = 0


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("ML-KEM-768", "kem", 3, 1184, 1088, 32),
        Algorithm("ML-KEM-1024", "kem", 5, 1568, 1568, 32),
        Algorithm("ML-DSA-44", "sig", 2, 1312, 2420),
        Algorithm("ML-DSA-65", "sig", 3, 1952, 3309),
        Algorithm("ML-DSA-87", "sig", 5, 2592, 4627),
    )
}

MLDSAPrivate = mldsa.MLDSA44PrivateKey | mldsa.MLDSA65PrivateKey | mldsa.MLDSA87PrivateKey
MLDSAPublic = mldsa.MLDSA44PublicKey | mldsa.MLDSA65PublicKey | mldsa.MLDSA87PublicKey

_SIG_PRIVATE: dict[str, type[MLDSAPrivate]] = {
    "ML-DSA-44": mldsa.MLDSA44PrivateKey,
    "ML-DSA-65": mldsa.MLDSA65PrivateKey,
    "ML-DSA-87": mldsa.MLDSA87PrivateKey,
}
_SIG_PUBLIC: dict[str, type[MLDSAPublic]] = {
    "ML-DSA-44": mldsa.MLDSA44PublicKey,
    "ML-DSA-65": mldsa.MLDSA65PublicKey,
    "ML-DSA-87": mldsa.MLDSA87PublicKey,
}
_KEM_PRIVATE: dict[str, type[mlkem.MLKEM768PrivateKey | mlkem.MLKEM1024PrivateKey]] = {
    "ML-KEM-768": mlkem.MLKEM768PrivateKey,
    "ML-KEM-1024": mlkem.MLKEM1024PrivateKey,
}
_KEM_PUBLIC = {"ML-KEM-768": mlkem.MLKEM768PublicKey, "ML-KEM-1024": mlkem.MLKEM1024PublicKey}


DEFAULT_SIGNATURE = "ML-DSA-65"
#: FIPS 204 limits the context string to 255 bytes.
MAX_CONTEXT = 255


def algorithm(name: str) -> Algorithm:
    """Look up an algorithm by its FIPS name, with a clear error for unknown names."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        known = ", ".join(sorted(ALGORITHMS))
        raise CryptoError(f"unknown algorithm {name!r}; known: {known}") from None


def algorithm_of(key: object) -> str:
    """The registry name of a `cryptography` ML-DSA / ML-KEM key object."""
    for table in (_SIG_PRIVATE, _SIG_PUBLIC, _KEM_PRIVATE, _KEM_PUBLIC):
        for name, cls in table.items():
            if isinstance(key, cls):
                return name
    raise CryptoError(f"not a post-quantum key: {type(key).__name__}")


def _check_context(context: bytes) -> bytes:
    if len(context) > MAX_CONTEXT:
        raise CryptoError(
            f"signature context is {len(context)} bytes; FIPS 204 allows {MAX_CONTEXT}"
        )
    return context


# --------------------------------------------------------------------------- signatures


class VerifyKey:
    """An ML-DSA public key. ``key_id`` is SHA-256 over the raw public key."""

    __slots__ = ("_key", "algorithm", "key_id", "raw")

    def __init__(self, key: MLDSAPublic) -> None:
        self._key = key
        self.algorithm = algorithm_of(key)
        self.raw = key.public_bytes_raw()
        self.key_id = hashlib.sha256(self.raw).digest()

    @classmethod
    def from_raw(cls, algorithm_name: str, raw: bytes) -> VerifyKey:
        """Rebuild from raw public bytes; raises :class:`CryptoError` on bad size/name."""
        alg = algorithm(algorithm_name)
        if alg.kind != "sig":
            raise CryptoError(f"{algorithm_name} is not a signature algorithm")
        if len(raw) != alg.public_key_size:
            raise CryptoError(
                f"{algorithm_name} public key must be {alg.public_key_size} bytes, got {len(raw)}"
            )
        try:
            return cls(_SIG_PUBLIC[algorithm_name].from_public_bytes(raw))
        except ValueError as exc:
            raise CryptoError(f"invalid {algorithm_name} public key: {exc}") from None

    @classmethod
    def from_pem(cls, pem: bytes, *, private_ok: bool = False) -> VerifyKey:
        """Load a PEM SubjectPublicKeyInfo ML-DSA key (what issuers publish).

        With ``private_ok`` an unencrypted ML-DSA private key PEM (what ``keygen``
        writes) is accepted too and its public half returned. Anything else is a
        :class:`CryptoError` saying what was found.
        """
        if private_ok and b"PRIVATE KEY-----" in pem:
            return SigningKey.from_pem(pem).public_key
        try:
            key = serialization.load_pem_public_key(pem)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise CryptoError(f"cannot load public key: {exc}") from None
        if not isinstance(key, tuple(_SIG_PUBLIC.values())):
            raise CryptoError(f"expected an ML-DSA public key, got {type(key).__name__}")
        return cls(key)  # type: ignore[arg-type]

    def to_pem(self) -> bytes:
        """PEM SubjectPublicKeyInfo (the inverse of :meth:`from_pem`)."""
        return self._key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def cryptography_key(self) -> MLDSAPublic:
        """The underlying `cryptography` key (for X.509 builders)."""
        return self._key

    def verify(self, signature: bytes, message: bytes, *, context: bytes = b"") -> None:
        """Raise :class:`SignatureInvalid` unless ``signature`` is valid over ``message``."""
        try:
            self._key.verify(signature, message, _check_context(context) or None)
        except InvalidSignature:
            raise SignatureInvalid(f"{self.algorithm} signature does not verify") from None
        except ValueError as exc:
            raise SignatureInvalid(f"{self.algorithm} signature malformed: {exc}") from None

    def is_valid(self, signature: bytes, message: bytes, *, context: bytes = b"") -> bool:
        """Boolean form of :meth:`verify`."""
        try:
            self.verify(signature, message, context=context)
        except SignatureInvalid:
            return False
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VerifyKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"VerifyKey({self.algorithm}, id={self.key_id.hex()[:16]})"


class SigningKey:
    """An ML-DSA private key with domain-separated signing."""

    __slots__ = ("_key", "algorithm", "public_key")

    def __init__(self, key: MLDSAPrivate) -> None:
        self._key = key
        self.algorithm = algorithm_of(key)
        self.public_key = VerifyKey(key.public_key())

    @classmethod
    def generate(cls, algorithm_name: str = DEFAULT_SIGNATURE) -> SigningKey:
        """A fresh key of the named ML-DSA parameter set."""
        alg = algorithm(algorithm_name)
        if alg.kind != "sig":
            raise CryptoError(f"{algorithm_name} is not a signature algorithm")
        return cls(_SIG_PRIVATE[algorithm_name].generate())

    @classmethod
    def from_seed(cls, seed: bytes, algorithm_name: str = DEFAULT_SIGNATURE) -> SigningKey:
        """Deterministic key from a 32-byte seed (tests, simulations)."""
        if len(seed) != 32:
            raise CryptoError("ML-DSA seed must be 32 bytes")
        algorithm(algorithm_name)
        return cls(_SIG_PRIVATE[algorithm_name].from_seed_bytes(seed))

    @property
    def cryptography_key(self) -> MLDSAPrivate:
        """The underlying `cryptography` key (for X.509 builders and PEM export)."""
        return self._key

    @property
    def key_id(self) -> bytes:
        """SHA-256 of the raw public key."""
        return self.public_key.key_id

    def sign(self, message: bytes, *, context: bytes = b"") -> bytes:
        """ML-DSA signature over ``message`` under the FIPS 204 ``context`` string."""
        return self._key.sign(message, _check_context(context) or None)

    def to_pem(self, passphrase: bytes | None = None) -> bytes:
        """PKCS#8 PEM, encrypted with the best available scheme when a passphrase is given."""
        enc: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(passphrase)
            if passphrase
            else serialization.NoEncryption()
        )
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc
        )

    @classmethod
    def from_pem(cls, pem: bytes, passphrase: bytes | None = None) -> SigningKey:
        """Load a PKCS#8 PEM ML-DSA key; wrong passphrase or type gives :class:`CryptoError`."""
        try:
            key = serialization.load_pem_private_key(pem, passphrase)
        except (ValueError, TypeError) as exc:
            raise CryptoError(f"cannot load private key: {exc}") from None
        if not isinstance(key, tuple(_SIG_PRIVATE.values())):
            raise CryptoError(f"expected an ML-DSA private key, got {type(key).__name__}")
        return cls(key)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"SigningKey({self.algorithm}, id={self.key_id.hex()[:16]})"


# --------------------------------------------------------------------------- KEM


def kem_generate(
    algorithm_name: str = "ML-KEM-768",
) -> mlkem.MLKEM768PrivateKey | mlkem.MLKEM1024PrivateKey:
    """A fresh ML-KEM decapsulation key."""
    alg = algorithm(algorithm_name)
    if alg.kind != "kem":
        raise CryptoError(f"{algorithm_name} is not a KEM")
    return _KEM_PRIVATE[algorithm_name].generate()


# --------------------------------------------------------------------------- hybrid seal

_SEAL_MAGIC = b"QSL1"
_SEAL_INFO = b"pqcnet/seal/v1 X25519+ML-KEM-768 HKDF-SHA256 AES-256-GCM"
_X25519_LEN = 32
_MLKEM768_CT = ALGORITHMS["ML-KEM-768"].output_size
_NONCE_LEN = 12
_HEADER_LEN = len(_SEAL_MAGIC) + _X25519_LEN + _MLKEM768_CT + _NONCE_LEN
#: Bound on what one sealed message may carry (gossip, directives, small blobs).
MAX_SEAL_PLAINTEXT = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class RecipientPublicKey:
    """What a sender needs to seal to a recipient: X25519 + ML-KEM-768 public keys."""

    x25519: bytes
    mlkem: bytes

    def to_bytes(self) -> bytes:
        """Fixed-size encoding: 32 bytes X25519 ‖ 1184 bytes ML-KEM-768."""
        return self.x25519 + self.mlkem

    @classmethod
    def from_bytes(cls, data: bytes) -> RecipientPublicKey:
        """Parse :meth:`to_bytes` output; raises :class:`CryptoError` on bad length."""
        want = _X25519_LEN + ALGORITHMS["ML-KEM-768"].public_key_size
        if len(data) != want:
            raise CryptoError(f"recipient public key must be {want} bytes, got {len(data)}")
        return cls(data[:_X25519_LEN], data[_X25519_LEN:])

    @property
    def key_id(self) -> bytes:
        """SHA-256 over the encoding: names a recipient in bundles and logs."""
        return hashlib.sha256(self.to_bytes()).digest()


class RecipientKey:
    """The private half of a seal recipient (a node or a group key)."""

    __slots__ = ("_kem", "_x", "public")

    def __init__(self, x: x25519.X25519PrivateKey, kem: mlkem.MLKEM768PrivateKey) -> None:
        self._x = x
        self._kem = kem
        self.public = RecipientPublicKey(
            x.public_key().public_bytes_raw(), kem.public_key().public_bytes_raw()
        )

    @classmethod
    def generate(cls) -> RecipientKey:
        """Fresh X25519 + ML-KEM-768 key pair."""
        return cls(x25519.X25519PrivateKey.generate(), mlkem.MLKEM768PrivateKey.generate())

    def to_bytes(self) -> bytes:
        """Secret encoding (32-byte X25519 ‖ 64-byte ML-KEM seed). Store it encrypted."""
        return self._x.private_bytes_raw() + self._kem.private_bytes_raw()

    @classmethod
    def from_bytes(cls, data: bytes) -> RecipientKey:
        """Inverse of :meth:`to_bytes`."""
        if len(data) != 96:
            raise CryptoError("recipient private key must be 96 bytes")
        return cls(
            x25519.X25519PrivateKey.from_private_bytes(data[:32]),
            mlkem.MLKEM768PrivateKey.from_seed_bytes(data[32:]),
        )

    def decapsulate(self, eph_x: bytes, kem_ct: bytes) -> bytes:
        """Combined shared key for the given ephemeral X25519 share and ML-KEM ciphertext."""
        try:
            ss_x = self._x.exchange(x25519.X25519PublicKey.from_public_bytes(eph_x))
            ss_k = self._kem.decapsulate(kem_ct)
        except ValueError as exc:
            raise SealError(f"cannot decapsulate: {exc}") from None
        return _combine(ss_k, ss_x, eph_x, kem_ct, self.public)


def _combine(
    ss_kem: bytes, ss_x: bytes, eph_x: bytes, kem_ct: bytes, rcpt: RecipientPublicKey
) -> bytes:
    info = _SEAL_INFO + eph_x + rcpt.x25519 + hashlib.sha256(kem_ct + rcpt.mlkem).digest()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(ss_kem + ss_x)


def seal(recipient: RecipientPublicKey, plaintext: bytes, *, aad: bytes = b"") -> bytes:
    """Encrypt ``plaintext`` so only ``recipient`` can open it.

    Layout: ``"QSL1" ‖ eph X25519 (32) ‖ ML-KEM-768 ct (1088) ‖ nonce (12) ‖ AES-256-GCM ct+tag``.
    The header is authenticated as AAD together with the caller's ``aad``.
    """
    if len(plaintext) > MAX_SEAL_PLAINTEXT:
        raise CryptoError(f"seal plaintext over {MAX_SEAL_PLAINTEXT} bytes")
    eph = x25519.X25519PrivateKey.generate()
    eph_pub = eph.public_key().public_bytes_raw()
    try:
        ss_x = eph.exchange(x25519.X25519PublicKey.from_public_bytes(recipient.x25519))
        ss_k, kem_ct = mlkem.MLKEM768PublicKey.from_public_bytes(recipient.mlkem).encapsulate()
    except ValueError as exc:
        raise CryptoError(f"invalid recipient key: {exc}") from None
    key = _combine(ss_k, ss_x, eph_pub, kem_ct, recipient)
    nonce = os.urandom(_NONCE_LEN)
    header = _SEAL_MAGIC + eph_pub + kem_ct + nonce
    return header + AESGCM(key).encrypt(nonce, plaintext, header + aad)


def open_sealed(recipient: RecipientKey, blob: bytes, *, aad: bytes = b"") -> bytes:
    """Decrypt a :func:`seal` output. Any tampering or wrong key raises :class:`SealError`."""
    if len(blob) < _HEADER_LEN + 16 or not blob.startswith(_SEAL_MAGIC):
        raise SealError("not a sealed message (bad magic or too short)")
    off = len(_SEAL_MAGIC)
    eph_x = blob[off : off + _X25519_LEN]
    off += _X25519_LEN
    kem_ct = blob[off : off + _MLKEM768_CT]
    off += _MLKEM768_CT
    nonce = blob[off : off + _NONCE_LEN]
    key = recipient.decapsulate(eph_x, kem_ct)
    try:
        return AESGCM(key).decrypt(nonce, blob[_HEADER_LEN:], blob[:_HEADER_LEN] + aad)
    except InvalidTag:
        raise SealError(
            "sealed message failed authentication (tampered or wrong recipient)"
        ) from None


def sealed_overhead() -> int:
    """Bytes a seal adds to its plaintext."""
    return _HEADER_LEN + 16


def length_prefixed(*parts: bytes) -> bytes:
    """Unambiguous concatenation (u32 big-endian length before each part) for signing."""
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)
