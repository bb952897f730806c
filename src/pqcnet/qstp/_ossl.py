"""The few OpenSSL calls pyOpenSSL does not wrap, in one place.

pyOpenSSL has no API for TLS groups, the negotiated group name, TLS 1.3 KeyUpdate
or the number of session tickets. The first two are in the cffi binding that
`cryptography` ships (``SSL_CTX_set1_curves_list`` is the same call as
``set1_groups_list``). ``SSL_key_update`` and ``SSL_CTX_set_num_tickets`` are
compiled into that same static OpenSSL but not exported by the binding, so we
resolve them from the extension module's ELF symbol table and its load address in
``/proc/self/maps``. If that is impossible (stripped wheel, other OS),
:func:`key_update_supported` is False and QSTP falls back to a reconnect for
rekeying (GOAWAY when a rekey is due, close at the next; see :mod:`pqcnet.qstp.connection`;
``QstpConfiguration.tls_key_update=False`` selects the same fallback on purpose),
and servers send OpenSSL's default two tickets. Everything here touches private
attributes (``_context``, ``_ssl``); tests in ``tests/qstp/test_ossl.py`` pin the
behaviour.
"""

from __future__ import annotations

import functools
import os
import struct
import sys
from typing import Any

from cryptography.hazmat.bindings import _rust
from cryptography.hazmat.bindings.openssl.binding import Binding
from OpenSSL import SSL

from pqcnet.crypto.errors import CryptoError

_ffi: Any = Binding.ffi
_lib: Any = Binding.lib

#: SSL_KEY_UPDATE_REQUESTED: the peer must answer with its own KeyUpdate.
KEY_UPDATE_REQUESTED = 1
KEY_UPDATE_NOT_REQUESTED = 0


def set_groups(ctx: SSL.Context, groups: list[str]) -> None:
    """Restrict a context's key-exchange groups (``SSL_CTX_set1_groups_list``)."""
    spec = ":".join(groups).encode()
    if _lib.SSL_CTX_set1_curves_list(ctx._context, spec) != 1:
        raise CryptoError(f"OpenSSL rejected group list {spec.decode()!r}")


def negotiated_group(conn: SSL.Connection) -> str | None:
    """Name of the negotiated key-exchange group, e.g. ``X25519MLKEM768``.

    ``None`` before a session exists: OpenSSL dereferences the session, so we
    must not call it on a fresh connection.
    """
    if _lib.SSL_get_session(conn._ssl) == _ffi.NULL:
        return None
    name = _lib.SSL_get0_group_name(conn._ssl)
    if name == _ffi.NULL:
        return None
    return str(_ffi.string(name).decode())


def session_reused(conn: SSL.Connection) -> bool:
    """True when the handshake resumed a previous session (TLS 1.3 PSK)."""
    return bool(_lib.SSL_session_reused(conn._ssl))


#: X509_V_ERR_CERT_REJECTED: OpenSSL answers it with a ``bad_certificate`` alert.
X509_CERT_REJECTED = 28
#: X509_V_ERR_CERT_REVOKED: answered with ``certificate_revoked``.
X509_CERT_REVOKED = 23
#: How many frames up from a verify callback pyOpenSSL's wrapper may sit.
_VERIFY_FRAME_DEPTH = 4


def set_verify_error(x509_error: int) -> bool:
    """From inside a pyOpenSSL verify callback, choose the X509 error (and so the TLS
    alert) OpenSSL reports when the callback then refuses the certificate.

    pyOpenSSL's wrapper returns 0 for a callback that raises but leaves the store
    context's error at ``X509_V_OK``, which OpenSSL turns into an ``internal_error``
    alert — misleading for a policy refusal. The store context is a local of that
    wrapper (its signature is the C callback's), so we look it up on the stack.
    Best effort: returns False (alert stays ``internal_error``) if pyOpenSSL changes;
    ``tests/qstp/test_tls_reject.py`` pins the alert.
    """
    frame = sys._getframe(1)
    for _ in range(_VERIFY_FRAME_DEPTH):
        frame = frame.f_back  # type: ignore[assignment]
        if frame is None:
            return False
        store_ctx = frame.f_locals.get("store_ctx")
        if store_ctx is not None and _ffi.typeof(store_ctx).cname == "X509_STORE_CTX *":
            _lib.X509_STORE_CTX_set_error(store_ctx, x509_error)
            return True
    return False


def _elf_symbols(path: str, names: frozenset[str]) -> dict[str, int]:
    """Values of the named symbols in an ELF64 little-endian file's .symtab."""
    with open(path, "rb") as fh:
        data = fh.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return {}
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [
        struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)
    ]
    found: dict[str, int] = {}
    for sec in sections:
        if sec[1] != 2:  # SHT_SYMTAB
            continue
        str_off = sections[sec[6]][4]
        off, size, entsize = sec[4], sec[5], sec[9]
        for j in range(size // entsize):
            st_name, _info, _other, shndx, value, _size = struct.unpack_from(
                "<IBBHQQ", data, off + j * entsize
            )
            if shndx == 0 or not value:
                continue
            end = data.index(b"\0", str_off + st_name)
            name = data[str_off + st_name : end].decode(errors="replace")
            if name in names:
                found[name] = value
    return found


def _load_base(path: str) -> int | None:
    real = os.path.realpath(path)
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split()
                if len(parts) < 6 or int(parts[2], 16) != 0:
                    continue
                if os.path.realpath(parts[5]) == real:
                    return int(parts[0].split("-")[0], 16)
    except OSError:
        return None
    return None


#: Functions compiled into cryptography's static OpenSSL but not in its binding,
#: with their C types (resolved together: reading the symbol table is one pass).
_UNEXPORTED: dict[str, str] = {
    "SSL_key_update": "int(*)(SSL*, int)",
    "SSL_CTX_set_num_tickets": "int(*)(SSL_CTX*, size_t)",
}


@functools.cache
def _unexported() -> dict[str, Any]:
    path = getattr(_rust, "__file__", None)
    if not path:
        return {}
    try:
        syms = _elf_symbols(path, frozenset(_UNEXPORTED))
    except (OSError, struct.error, ValueError):
        return {}
    base = _load_base(path)
    if base is None:
        return {}
    return {name: _ffi.cast(ctype, base + syms[name])
            for name, ctype in _UNEXPORTED.items() if name in syms}


def _key_update_fn() -> Any:
    return _unexported().get("SSL_key_update")


def set_num_tickets(ctx: SSL.Context, n: int) -> bool:
    """How many TLS 1.3 session tickets a server sends after a full handshake
    (OpenSSL's default is 2). False when the call is unavailable (default stays)."""
    fn = _unexported().get("SSL_CTX_set_num_tickets")
    if fn is None:
        return False
    return bool(fn(ctx._context, n) == 1)


def key_update_supported() -> bool:
    """Whether :func:`key_update` can be called in this process."""
    return _key_update_fn() is not None


def key_update(conn: SSL.Connection, *, request_peer: bool = True) -> None:
    """Schedule a TLS 1.3 KeyUpdate; it is sent with the next write on ``conn``."""
    fn = _key_update_fn()
    if fn is None:
        raise CryptoError("TLS KeyUpdate is not available with this OpenSSL build")
    mode = KEY_UPDATE_REQUESTED if request_peer else KEY_UPDATE_NOT_REQUESTED
    if fn(conn._ssl, mode) != 1:
        _lib.ERR_clear_error()
        raise CryptoError("SSL_key_update refused (handshake not finished or write pending)")
