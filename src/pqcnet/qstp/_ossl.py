"""Every OpenSSL call pyOpenSSL does not wrap, and every private attribute we read, in one place.

pyOpenSSL (>= 26.4) covers most of what QSTP needs publicly (``get_group_name``,
``clear_mode``, ``get_session``). What it lacks lives here and nowhere else in
``src/`` (``tests/qstp/test_ossl_symbols.py`` greps the tree and checks every name
in :data:`PRIVATE_SYMBOLS` against the installed wheels, so a new ``cryptography`` or
pyOpenSSL release fails in that one test instead of at the first rekey):

* calls in the cffi binding that ``cryptography`` ships (``Binding.lib``) on the
  ``SSL_CTX*`` / ``SSL*`` behind pyOpenSSL's private ``_context`` / ``_ssl``:
  TLS groups, session reuse, OpenSSL's verify verdict, a reused-buffer reader;
* the stack walk in :func:`set_verify_error` (the alert a policy refusal sends);
* ``SSL_key_update`` and ``SSL_CTX_set_num_tickets``: compiled into that same static
  OpenSSL but not exported by the binding, so their addresses are computed from the
  extension module's ELF symbol table plus its load address in ``/proc/self/maps``.

A function pointer computed that way is never called first on a live tunnel. The
first time a process needs it (:func:`capabilities`, reached from
``pqcnet.qstp.tls.build_context`` before any tunnel exists; the asyncio API asks from a
worker thread), a **self-check child** (``python -m pqcnet.qstp._selfcheck``) resolves
the same symbols, performs TLS 1.3 KeyUpdates and the ticket-count call on an
in-memory pair and reports what worked. If the child fails, dies on a signal, times
out or disagrees with us about the binary, both features are disabled for this
process and one WARNING line says why. The documented fallbacks then apply: rekey
by GOAWAY + reconnect (see :mod:`pqcnet.qstp.connection`;
``QstpConfiguration.tls_key_update=False`` selects it on purpose) and OpenSSL's
default of two session tickets. The verdict is :func:`capabilities` (a frozen
:class:`Capabilities`) and the gauge ``pqcnet_qstp_openssl_feature_enabled{feature}``.
There is no switch to skip the check: it costs one ~0.3 s child per process.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from cryptography.hazmat.bindings import _rust
from cryptography.hazmat.bindings.openssl.binding import Binding
from OpenSSL import SSL
from prometheus_client import Gauge

from pqcnet.crypto.errors import CryptoError
from pqcnet.qstp.errors import HandshakeError

log = logging.getLogger(__name__)

_ffi: Any = Binding.ffi
_lib: Any = Binding.lib

# ---------------------------------------------------------------------------- the inventory

Where = Literal["module", "binding.lib", "binding.ffi", "pyopenssl.attr",
                "pyopenssl.verify-local", "elf.symtab"]


@dataclass(frozen=True, slots=True)
class PrivateSymbol:
    """One private name this module relies on; a test checks each one exists."""

    where: Where
    """``module``: a private module; ``binding.lib`` / ``binding.ffi``: an attribute of
    ``cryptography``'s cffi binding; ``pyopenssl.attr``: ``Class.attribute`` on pyOpenSSL
    objects; ``pyopenssl.verify-local``: a local variable of pyOpenSSL's verify-callback
    wrapper; ``elf.symtab``: a symbol in the ``_rust`` extension's ELF symbol table."""
    name: str
    """The symbol, attribute or module name."""
    why: str
    """What breaks (or falls back) without it."""


PRIVATE_SYMBOLS: Final[tuple[PrivateSymbol, ...]] = (
    PrivateSymbol("module", "cryptography.hazmat.bindings._rust",
                  "the ELF file whose symbol table holds the unexported functions"),
    PrivateSymbol("binding.lib", "SSL_CTX_set1_curves_list",
                  "TLS key-exchange groups per policy (pyOpenSSL has no set_groups)"),
    PrivateSymbol("binding.lib", "SSL_session_reused", "PeerInfo.resumed"),
    PrivateSymbol("binding.lib", "SSL_get_verify_result",
                  "OpenSSL's chain verdict, taken instead of a second ML-DSA verify"),
    PrivateSymbol("binding.lib", "X509_verify_cert_error_string", "refusal messages"),
    PrivateSymbol("binding.lib", "X509_STORE_CTX_set_error",
                  "bad_certificate / certificate_revoked instead of internal_error"),
    PrivateSymbol("binding.lib", "SSL_read", "read_plaintext: many records, one buffer"),
    PrivateSymbol("binding.lib", "SSL_get_error", "read_plaintext: why SSL_read stopped"),
    PrivateSymbol("binding.lib", "SSL_ERROR_WANT_READ", "read_plaintext: the normal stop"),
    PrivateSymbol("binding.lib", "ERR_clear_error", "a refused SSL_key_update"),
    PrivateSymbol("binding.lib", "BIO_get_mem_data", "fresh_bios: both BIOs drained"),
    PrivateSymbol("binding.lib", "BIO_new", "fresh_bios: the new pair"),
    PrivateSymbol("binding.lib", "BIO_s_mem", "fresh_bios: the new pair"),
    PrivateSymbol("binding.lib", "BIO_free", "fresh_bios: a pair that could not be made"),
    PrivateSymbol("binding.lib", "SSL_set_bio", "fresh_bios: swap (frees the old pair)"),
    PrivateSymbol("binding.ffi", "NULL", "fresh_bios: no data pointer wanted"),
    PrivateSymbol("binding.ffi", "new", "read_plaintext's reused buffer"),
    PrivateSymbol("binding.ffi", "buffer", "read_plaintext's copy out"),
    PrivateSymbol("binding.ffi", "cast", "function pointers from symbol addresses"),
    PrivateSymbol("binding.ffi", "typeof", "set_verify_error finds the store context"),
    PrivateSymbol("binding.ffi", "string", "C strings from OpenSSL"),
    PrivateSymbol("pyopenssl.attr", "Context._context", "the SSL_CTX* for the calls above"),
    PrivateSymbol("pyopenssl.attr", "Connection._ssl", "the SSL* for the calls above"),
    PrivateSymbol("pyopenssl.attr", "Connection._into_ssl",
                  "fresh_bios: the memory BIO pyOpenSSL's bio_write fills"),
    PrivateSymbol("pyopenssl.attr", "Connection._from_ssl",
                  "fresh_bios, pending_out: the memory BIO pyOpenSSL's bio_read drains"),
    PrivateSymbol("pyopenssl.verify-local", "store_ctx",
                  "set_verify_error (else the alert stays internal_error)"),
    PrivateSymbol("elf.symtab", "SSL_key_update",
                  "TLS 1.3 KeyUpdate (else rekey by GOAWAY + reconnect)"),
    PrivateSymbol("elf.symtab", "SSL_CTX_set_num_tickets",
                  "one session ticket per handshake (else OpenSSL's default two)"),
)

# ---------------------------------------------------------------------------- binding calls


def set_groups(ctx: SSL.Context, groups: list[str]) -> None:
    """Restrict a context's key-exchange groups (``SSL_CTX_set1_groups_list``)."""
    spec = ":".join(groups).encode()
    if _lib.SSL_CTX_set1_curves_list(ctx._context, spec) != 1:
        raise CryptoError(f"OpenSSL rejected group list {spec.decode()!r}")


def session_reused(conn: SSL.Connection) -> bool:
    """True when the handshake resumed a previous session (TLS 1.3 PSK)."""
    return bool(_lib.SSL_session_reused(conn._ssl))


def verify_result(conn: SSL.Connection) -> int:
    """OpenSSL's X509 verdict on the peer chain of a finished handshake (0: ok)."""
    return int(_lib.SSL_get_verify_result(conn._ssl))


def verify_error_string(x509_error: int) -> str:
    """OpenSSL's text for an X509 verify error number."""
    text: bytes = _ffi.string(_lib.X509_verify_cert_error_string(x509_error))
    return text.decode(errors="replace")


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


_scratch = threading.local()

#: Reads of at least this many bytes come back as a view on the scratch buffer instead
#: of a copy: one copy per payload byte fewer (receive CPU -12 % in memory, 64 KiB
#: frames; benchmarks/README.md). Smaller reads are copied into ``bytes``, which
#: slices faster per frame.
VIEW_MIN_BYTES = 64 * 1024


def read_plaintext(tls: SSL.Connection,
                   limit: int) -> tuple[bytes | memoryview, BaseException | None]:
    """Up to ``limit`` bytes of decrypted plaintext and the error that stopped reading.

    ``SSL.Connection.recv`` returns one record (<= 16 KiB) per call and allocates a
    buffer each time; here ``SSL_read`` fills one reused (per-thread) buffer until the
    BIO is empty. At least :data:`VIEW_MIN_BYTES` are returned as a ``memoryview`` on
    that buffer, valid only until the next call in this thread: the caller must copy
    out what it keeps before reading again (``FrameDecoder.feed`` does); less is
    copied into ``bytes``. The common stop (SSL_ERROR_WANT_READ: need
    more bytes) returns no error; any other condition is re-raised by pyOpenSSL's own
    ``recv`` so close_notify, alerts and error queues are classified exactly as usual.
    ``tests/qstp/test_read_plaintext.py`` exercises every exit.
    """
    buf = getattr(_scratch, "buf", None)
    if buf is None or len(buf) < limit:
        buf = _scratch.buf = _ffi.new("char[]", limit)
    ssl_ptr = tls._ssl
    total = 0
    failure: BaseException | None = None
    while total < limit:
        n = _lib.SSL_read(ssl_ptr, buf + total, limit - total)
        if n > 0:
            total += n
            continue
        if _lib.SSL_get_error(ssl_ptr, n) != _lib.SSL_ERROR_WANT_READ:
            try:
                tls.recv(1)  # let pyOpenSSL raise the precise exception
            except (SSL.Error, HandshakeError) as exc:
                # kept without its traceback: that would hold this frame, whose
                # ``failure`` is the exception itself — a cycle that kept the whole
                # closed tunnel (TLS objects, buffers) until a full collection
                failure = exc.with_traceback(None)
            else:  # pragma: no cover - a record became readable in between
                failure = None
        break
    if total >= VIEW_MIN_BYTES:
        return memoryview(_ffi.buffer(buf, total)), failure
    return (_ffi.buffer(buf, total)[:] if total else b""), failure


def pending_out(tls: SSL.Connection) -> int:
    """Bytes waiting in the write BIO of a memory-BIO connection (QSTP's only kind).

    ``Connection.data_to_send`` reads exactly that much in one ``bio_read``, and skips
    the read when it is 0: most of its calls on a busy tunnel find nothing to send,
    and pyOpenSSL answers an empty BIO by allocating the buffer and raising
    ``WantReadError`` (4 of every 6 calls on the relayer's one-frame path, profiled)."""
    wbio = tls._from_ssl
    if wbio is None:
        raise TypeError("pending_out needs a memory-BIO connection (no socket)")
    return int(_lib.BIO_get_mem_data(wbio, _ffi.NULL))


def fresh_bios(tls: SSL.Connection) -> bool:
    """Give a memory-BIO connection a new, empty pair of BIOs once both are drained;
    returns whether it did.

    A memory BIO never shrinks: after a handshake (ML-DSA certificate flights of
    several KiB each way) each of the two keeps the capacity of the largest flight,
    ≈ 23 KiB per connection in all, for the connection's life — a third of a sentry's
    memory per idle tunnel. ``SSL_set_bio`` frees the old pair; pyOpenSSL's
    ``bio_write`` / ``bio_read`` use the attributes updated here. Nothing is lost:
    it only swaps when neither BIO holds a byte.
    """
    rbio, wbio = tls._into_ssl, tls._from_ssl
    if rbio is None or wbio is None:
        return False
    if _lib.BIO_get_mem_data(rbio, _ffi.NULL) or _lib.BIO_get_mem_data(wbio, _ffi.NULL):
        return False
    new_r = _lib.BIO_new(_lib.BIO_s_mem())
    new_w = _lib.BIO_new(_lib.BIO_s_mem())
    if new_r == _ffi.NULL or new_w == _ffi.NULL:  # pragma: no cover - out of memory
        for bio in (new_r, new_w):
            if bio != _ffi.NULL:
                _lib.BIO_free(bio)
        return False
    _lib.SSL_set_bio(tls._ssl, new_r, new_w)
    tls._into_ssl, tls._from_ssl = new_r, new_w
    return True


# ---------------------------------------------------------------------------- unexported calls


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
_UNEXPORTED: Final[dict[str, str]] = {
    "SSL_key_update": "int(*)(SSL*, int)",
    "SSL_CTX_set_num_tickets": "int(*)(SSL_CTX*, size_t)",
}

_resolve_lock = threading.Lock()
_resolved: tuple[str, dict[str, int], dict[str, Any]] | None = None


def _resolve() -> tuple[str, dict[str, int], dict[str, Any]]:
    """(extension path, symbol offsets, function pointers) for :data:`_UNEXPORTED`.

    Computing the pointers calls nothing; only :func:`capabilities` decides whether
    they may be called. Empty dicts when the symbols cannot be found.
    """
    global _resolved
    with _resolve_lock:
        if _resolved is None:
            _resolved = _resolve_uncached()
        return _resolved


def _resolve_uncached() -> tuple[str, dict[str, int], dict[str, Any]]:
    path = os.path.realpath(getattr(_rust, "__file__", "") or "")
    if not path:
        return "", {}, {}
    try:
        offsets = _elf_symbols(path, frozenset(_UNEXPORTED))
    except (OSError, struct.error, ValueError):
        return path, {}, {}
    base = _load_base(path)
    if base is None:
        return path, offsets, {}
    pointers = {name: _ffi.cast(ctype, base + offsets[name])
                for name, ctype in _UNEXPORTED.items() if name in offsets}
    return path, offsets, pointers


def symbol_report() -> dict[str, object]:
    """What this process resolved: the extension's path and the symbols' offsets in it
    (the self-check child prints its own; the parent requires them to be equal)."""
    path, offsets, pointers = _resolve()
    return {"module": path, "offsets": {n: offsets[n] for n in sorted(pointers)}}


# ---------------------------------------------------------------------------- capabilities


@dataclass(frozen=True, slots=True)
class Capabilities:
    """Which unexported OpenSSL calls this process may make (see the module docstring)."""

    key_update: bool
    """``SSL_key_update`` may be called: rekeys use TLS 1.3 KeyUpdate (else GOAWAY +
    reconnect)."""
    num_tickets: bool
    """``SSL_CTX_set_num_tickets`` may be called (else OpenSSL's default two tickets)."""
    source: Literal["self-check", "unresolved", "self-check-child", "override"]
    """How it was decided: a child process ran the calls (``self-check``); the symbols
    were not found so nothing was run (``unresolved``); this process *is* the child and
    runs them on its own resolution (``self-check-child``); set by a test (``override``)."""
    detail: str
    """One line: ``ok``, or why features are off."""

    @property
    def ok(self) -> bool:
        """Both features enabled."""
        return self.key_update and self.num_tickets


#: Seconds the self-check child may take (a cold, loaded machine takes a few).
SELF_CHECK_TIMEOUT: Final = 30.0
#: The child program (a module, so it imports exactly the pqcnet the parent runs).
SELF_CHECK_MODULE: Final = "pqcnet.qstp._selfcheck"
#: Bound on child output quoted in the failure line.
_QUOTE_CHARS = 300

OPENSSL_FEATURES = Gauge(
    "pqcnet_qstp_openssl_feature_enabled",
    "Unexported OpenSSL calls this process uses after its self-check (1) or not (0)",
    ["feature"],
)

_caps_lock = threading.Lock()
_capabilities: Capabilities | None = None


def capabilities() -> Capabilities:
    """The verdict for this process; the first call runs the self-check child (blocking,
    ~0.3 s; thread-safe, once per process)."""
    caps = _capabilities
    if caps is not None:
        return caps
    with _caps_lock:
        if _capabilities is None:
            _install(run_self_check(), announce=True)
        assert _capabilities is not None
        return _capabilities


def capabilities_known() -> bool:
    """Whether :func:`capabilities` returns without running the child."""
    return _capabilities is not None


def override_capabilities(caps: Capabilities | None) -> Capabilities | None:
    """Replace the verdict (None: forget it, the next use re-runs the check); returns
    the previous one. For the self-check child and for tests of the fallbacks."""
    global _capabilities
    with _caps_lock:
        previous = _capabilities
        if caps is None:
            _capabilities = None
        else:
            _install(caps, announce=False)
        return previous


def enter_self_check_child() -> Capabilities:
    """In the self-check child: trust this process's own resolution (no grandchild)."""
    _path, _offsets, pointers = _resolve()
    caps = Capabilities("SSL_key_update" in pointers, "SSL_CTX_set_num_tickets" in pointers,
                        "self-check-child", "calls made in the self-check child")
    override_capabilities(caps)
    return caps


def _install(caps: Capabilities, *, announce: bool) -> None:
    global _capabilities
    _capabilities = caps
    OPENSSL_FEATURES.labels(feature="key_update").set(int(caps.key_update))
    OPENSSL_FEATURES.labels(feature="num_tickets").set(int(caps.num_tickets))
    if not announce:
        return
    if caps.ok:
        log.info("OpenSSL self-check passed: TLS KeyUpdate and ticket count enabled",
                 extra={"openssl_key_update": True, "openssl_num_tickets": True,
                        "openssl_check": caps.source})
        return
    off = [(name, fallback) for name, fallback, on in (
        ("TLS KeyUpdate", "rekey by GOAWAY + reconnect", caps.key_update),
        ("SSL_CTX_set_num_tickets", "OpenSSL's default ticket count", caps.num_tickets),
    ) if not on]
    log.warning(
        "OpenSSL self-check: %s disabled (%s); %s", " and ".join(n for n, _ in off),
        caps.detail, ", ".join(f for _, f in off),
        extra={"openssl_key_update": caps.key_update,
               "openssl_num_tickets": caps.num_tickets, "openssl_check": caps.source})


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # the directory holding this pqcnet package goes first: the child must test the
    # code (and, through it, the cryptography wheel) this process runs
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _quote(raw: bytes) -> str:
    lines = raw.decode(errors="replace").strip().splitlines()
    return lines[-1][:_QUOTE_CHARS] if lines else "no output"


def run_self_check(*, timeout: float = SELF_CHECK_TIMEOUT,
                   command: Sequence[str] | None = None) -> Capabilities:
    """Run the self-check child now and return its verdict (installs nothing).

    ``command`` replaces the child program (tests inject failures with it).
    """
    path, _offsets, pointers = _resolve()
    if not pointers:
        return Capabilities(False, False, "unresolved",
                            f"symbols not resolvable in {path or 'cryptography'}")

    def failed(why: str) -> Capabilities:
        return Capabilities(False, False, "self-check", why)

    if command is None and not sys.executable:
        return failed("no Python executable to run the self-check child with")
    cmd = list(command) if command is not None else [sys.executable, "-m", SELF_CHECK_MODULE]
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout, env=_child_env(),
                              stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        return failed(f"self-check child timed out after {timeout:g}s")
    except OSError as exc:
        return failed(f"cannot start the self-check child: {exc.strerror or exc}")
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        return failed(f"self-check child killed by {name}")
    if proc.returncode != 0:
        return failed(f"self-check child exited {proc.returncode}: {_quote(proc.stderr)}")
    try:
        report = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        return failed(f"self-check child printed no verdict: {_quote(proc.stdout)}")
    if not isinstance(report, dict):
        return failed("self-check child printed no verdict")
    mine = symbol_report()
    if report.get("module") != mine["module"] or report.get("offsets") != mine["offsets"]:
        return failed(f"self-check child resolved another binary: {report.get('module')}")
    key_update = report.get("key_update") is True and "SSL_key_update" in pointers
    num_tickets = report.get("num_tickets") is True and "SSL_CTX_set_num_tickets" in pointers
    detail = str(report.get("detail", ""))[:_QUOTE_CHARS] or "ok"
    log.debug("OpenSSL self-check child finished",
              extra={"ms": round((time.monotonic() - started) * 1000), "report": detail})
    return Capabilities(key_update, num_tickets, "self-check", detail)


def set_num_tickets(ctx: SSL.Context, n: int) -> bool:
    """How many TLS 1.3 session tickets a server sends after a full handshake
    (OpenSSL's default is 2). False when the call is disabled (default stays)."""
    if not capabilities().num_tickets:
        return False
    fn = _resolve()[2]["SSL_CTX_set_num_tickets"]
    return bool(fn(ctx._context, n) == 1)


def key_update_supported() -> bool:
    """Whether :func:`key_update` may be called in this process."""
    return capabilities().key_update


#: SSL_KEY_UPDATE_REQUESTED: the peer must answer with its own KeyUpdate.
KEY_UPDATE_REQUESTED = 1
KEY_UPDATE_NOT_REQUESTED = 0


def key_update(conn: SSL.Connection, *, request_peer: bool = True) -> None:
    """Schedule a TLS 1.3 KeyUpdate; it is sent with the next write on ``conn``."""
    if not capabilities().key_update:
        raise CryptoError("TLS KeyUpdate is disabled in this process (OpenSSL self-check)")
    fn = _resolve()[2]["SSL_key_update"]
    mode = KEY_UPDATE_REQUESTED if request_peer else KEY_UPDATE_NOT_REQUESTED
    if fn(conn._ssl, mode) != 1:
        _lib.ERR_clear_error()
        raise CryptoError("SSL_key_update refused (handshake not finished or write pending)")
