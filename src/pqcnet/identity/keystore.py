"""Key stores: where a node's or the CA's ML-DSA private key lives between runs.

One small interface, :class:`KeyStore` (``load`` / ``store`` / ``describe``), and three
backends, so identity loading and the CA never care which one is configured:

- :class:`FileKeyStore` (here): PKCS#8 PEM encrypted under a passphrase — the
  original behaviour; existing key files keep loading unchanged;
- :class:`pqcnet.identity.hsm.Pkcs11KeyStore`: the key wrapped by an AES-256 key that
  never leaves a PKCS#11 token;
- :class:`pqcnet.identity.shamir.ShamirKeyStore`: the key split k-of-n among custodians.

:func:`pqcnet.identity.keyconfig.open_key_store` builds one from a ``key_store:`` mapping.

The file backend writes with the best encryption `cryptography` offers for PKCS#8
(PBES2 with a strong KDF and AES-256), creates the file with mode 0600 *before* any
byte is written, and replaces it atomically so a crash never leaves a half-written
key. A wrong passphrase is an :class:`IdentityError`, never a traceback.

``load`` blocks (file I/O, token calls, network for the share service): from async
code call it as ``await asyncio.to_thread(store.load)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, runtime_checkable

from pqcnet.crypto.errors import CryptoError
from pqcnet.crypto.pqc import SigningKey
from pqcnet.identity.errors import IdentityError, KeyStoreError, PassphraseRequired

#: Key files are tiny; refuse to read anything bigger (a wrong path, a device).
MAX_KEY_FILE_BYTES = 64 * 1024
_ENCRYPTED_MARKER = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"


#: ML-DSA keys are kept as their FIPS 204 seed (xi): 32 bytes expand to the full key.
SEED_BYTES = 32


@runtime_checkable
class KeyStore(Protocol):
    """Where one ML-DSA private key lives (see the module docstring)."""

    def load(self) -> SigningKey:
        """The key, in process memory; a typed :class:`IdentityError` when it cannot be had."""
        ...

    def store(self, key: SigningKey) -> None:
        """Put ``key`` into the store (replacing what it held)."""
        ...

    def describe(self) -> str:
        """One line for logs and ``pqcnet keys show`` (never secret material)."""
        ...


class FileKeyStore:
    """A PKCS#8 PEM file, encrypted when a passphrase is given (the original key file)."""

    def __init__(self, path: Path, passphrase: bytes | None) -> None:
        self.path = Path(path)
        self._passphrase = passphrase

    def load(self) -> SigningKey:
        return read_private_key(self.path, self._passphrase)

    def store(self, key: SigningKey) -> None:
        write_private_key(self.path, key, self._passphrase)

    def describe(self) -> str:
        state = "encrypted" if self._passphrase else "unencrypted"
        return f"file {self.path} ({state})"


def key_seed(key: SigningKey) -> bytes:
    """The 32-byte FIPS 204 seed of ``key`` (what the HSM wraps and Shamir splits).

    A key loaded from an expanded-only PKCS#8 has no seed: that is a clear error."""
    try:
        seed = key.cryptography_key.private_bytes_raw()
    except (ValueError, TypeError) as exc:
        raise KeyStoreError(f"{key} has no seed form to protect: {exc}") from None
    if len(seed) != SEED_BYTES:
        raise KeyStoreError(f"{key} seed is {len(seed)} bytes, expected {SEED_BYTES}")
    return seed


def key_from_seed(seed: bytearray, algorithm: str) -> SigningKey:
    """Expand ``seed`` into a key, then overwrite ``seed`` with zeros (see
    docs/how-to/key-custody.md for what zeroising can and cannot do in Python)."""
    try:
        return SigningKey.from_seed(seed, algorithm)  # type: ignore[arg-type]
    except CryptoError as exc:
        raise KeyStoreError(f"cannot rebuild the {algorithm} key: {exc}") from None
    finally:
        zeroize(seed)


def zeroize(buf: bytearray) -> None:
    """Overwrite a buffer we own with zeros (bytes objects cannot be wiped)."""
    buf[:] = bytes(len(buf))


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` via a same-directory temp file and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_private_key(path: Path, key: SigningKey, passphrase: bytes | None) -> None:
    """Store ``key`` at ``path`` (0600), PKCS#8-encrypted when a passphrase is given."""
    atomic_write(path, key.to_pem(passphrase), mode=0o600)


def is_encrypted(path: Path) -> bool:
    """Whether the key file at ``path`` is an encrypted PKCS#8 PEM."""
    return read_bounded(path, MAX_KEY_FILE_BYTES, "private key").lstrip().startswith(
        _ENCRYPTED_MARKER
    )


def read_private_key(path: Path, passphrase: bytes | None) -> SigningKey:
    """Load an ML-DSA key; missing file, wrong passphrase or wrong type is an IdentityError."""
    pem = read_bounded(path, MAX_KEY_FILE_BYTES, "private key")
    encrypted = pem.lstrip().startswith(_ENCRYPTED_MARKER)
    if encrypted and not passphrase:
        raise PassphraseRequired(f"{path} is encrypted: a passphrase is required")
    try:
        return SigningKey.from_pem(pem, passphrase if encrypted else None)
    except CryptoError as exc:
        hint = " (wrong passphrase?)" if encrypted else ""
        raise IdentityError(f"cannot load private key {path}{hint}: {exc}") from None


def read_bounded(path: Path, limit: int, what: str) -> bytes:
    """Read a small file with a size bound and a clear error."""
    try:
        size = path.stat().st_size
        if size > limit:
            raise IdentityError(f"{what} file {path} is {size} bytes (max {limit})")
        return path.read_bytes()
    except FileNotFoundError:
        raise IdentityError(f"{what} file not found: {path}") from None
    except IsADirectoryError:
        raise IdentityError(f"{what} path is a directory: {path}") from None
    except PermissionError:
        raise IdentityError(f"{what} file not readable: {path}") from None
