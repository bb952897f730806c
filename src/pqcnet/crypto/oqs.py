"""Optional second PQ implementation through liboqs-python (extra ``pqcnet[oqs]``).

`cryptography` (OpenSSL) is the engine; liboqs is only an optional cross-check or
alternative backend on machines that already have the liboqs shared library.
It is never required, and it must never be *built* by us: ``import oqs`` in
liboqs-python clones and compiles liboqs when it cannot find the library (and
calls ``sys.exit`` if that fails). So :func:`load` first looks for the shared
library itself, loads it with ctypes, and only then imports ``oqs``; if the
library is absent the module is never imported and :func:`load` returns None
with the reason in :func:`status`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pqcnet.crypto.errors import CryptoError
from pqcnet.crypto.pqc import algorithm

#: Where liboqs-python itself looks besides the loader path (we only *look*).
_ENV_DIR = "OQS_INSTALL_PATH"
_HOME_DIRS = ("_oqs", "oqs")


def _candidate_dirs() -> list[Path]:
    dirs = []
    env = os.environ.get(_ENV_DIR)
    if env:
        dirs.append(Path(env) / "lib")
    home = Path.home()
    dirs.extend(home / d / "lib" for d in _HOME_DIRS)
    return dirs


def find_liboqs() -> str | None:
    """Path or soname of an installed liboqs shared library, or None. Never builds."""
    for d in _candidate_dirs():
        if d.is_dir():
            for lib in sorted(d.glob("liboqs.so*")) + sorted(d.glob("liboqs*.dylib")):
                return str(lib)
    return ctypes.util.find_library("oqs")


@dataclass(frozen=True, slots=True)
class OqsStatus:
    """Why the liboqs backend is or is not available."""

    available: bool
    reason: str
    library: str | None = None


@functools.cache
def _probe() -> tuple[OqsStatus, Any]:
    if importlib.util.find_spec("oqs") is None:
        return OqsStatus(False, "liboqs-python is not installed (pip install 'pqcnet[oqs]')"), None
    lib = find_liboqs()
    if lib is None:
        return OqsStatus(False, "liboqs shared library not found; not importing oqs "
                                "(it would try to download and build liboqs)"), None
    try:
        ctypes.CDLL(lib)
    except OSError as exc:
        return OqsStatus(False, f"liboqs at {lib} does not load: {exc}", lib), None
    try:
        module = importlib.import_module("oqs")
    except (Exception, SystemExit) as exc:  # liboqs-python calls sys.exit on failure
        return OqsStatus(False, f"import oqs failed: {exc}", lib), None
    return OqsStatus(True, "liboqs available", lib), module


def status() -> OqsStatus:
    """Availability of the liboqs backend (probed once per process)."""
    return _probe()[0]


class OqsBackend:
    """ML-KEM / ML-DSA through liboqs, with pqcnet's algorithm names and errors."""

    def __init__(self, module: Any) -> None:
        self._oqs = module

    def _check(self, name: str, kind: str) -> None:
        if algorithm(name).kind != kind:
            raise CryptoError(f"{name} is not a {'KEM' if kind == 'kem' else 'signature'}")

    def kem_keypair(self, name: str) -> tuple[bytes, bytes]:
        """(public key, secret key)."""
        self._check(name, "kem")
        with self._oqs.KeyEncapsulation(name) as kem:
            pk = kem.generate_keypair()
            return bytes(pk), bytes(kem.export_secret_key())

    def kem_encapsulate(self, name: str, public_key: bytes) -> tuple[bytes, bytes]:
        """(ciphertext, shared secret)."""
        self._check(name, "kem")
        with self._oqs.KeyEncapsulation(name) as kem:
            ct, ss = kem.encap_secret(public_key)
            return bytes(ct), bytes(ss)

    def kem_decapsulate(self, name: str, secret_key: bytes, ciphertext: bytes) -> bytes:
        """The shared secret."""
        self._check(name, "kem")
        with self._oqs.KeyEncapsulation(name, secret_key) as kem:
            return bytes(kem.decap_secret(ciphertext))

    def verify(self, name: str, public_key: bytes, signature: bytes, message: bytes,
               *, context: bytes = b"") -> bool:
        """ML-DSA verification (FIPS 204 context string if liboqs supports it)."""
        self._check(name, "sig")
        with self._oqs.Signature(name) as sig:
            if context:
                if not hasattr(sig, "verify_with_ctx_str"):
                    raise CryptoError("this liboqs-python has no context-string support")
                return bool(sig.verify_with_ctx_str(message, signature, context, public_key))
            return bool(sig.verify(message, signature, public_key))


def load() -> OqsBackend | None:
    """The liboqs backend, or None (see :func:`status` for why)."""
    st, module = _probe()
    return OqsBackend(module) if st.available else None
