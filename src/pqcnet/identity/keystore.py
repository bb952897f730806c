"""On-disk key store: private keys as PKCS#8 PEM, encrypted under a passphrase.

A node's or CA's private key is the one secret on disk. It is written with the
best encryption `cryptography` offers for PKCS#8 (PBES2 with a strong KDF and
AES-256), created with mode 0600 *before* any byte is written, and replaced
atomically so a crash never leaves a half-written key. Loading with a wrong
passphrase is an :class:`IdentityError`, never a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

from pqcnet.crypto.errors import CryptoError
from pqcnet.crypto.pqc import SigningKey
from pqcnet.identity.errors import IdentityError, PassphraseRequired

#: Key files are tiny; refuse to read anything bigger (a wrong path, a device).
MAX_KEY_FILE_BYTES = 64 * 1024
_ENCRYPTED_MARKER = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"


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
