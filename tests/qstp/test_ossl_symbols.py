"""Every private OpenSSL / pyOpenSSL name pqcnet uses exists in the installed wheels,
is listed in ``pqcnet.qstp._ossl.PRIVATE_SYMBOLS``, and is used nowhere else in ``src/``.

When a ``cryptography`` or pyOpenSSL release renames or drops one of them, this is
the one test that fails, naming the symbol and what depends on it.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
from cryptography.hazmat.bindings.openssl.binding import Binding
from OpenSSL import SSL

from pqcnet.qstp import _ossl

SRC = Path(__file__).resolve().parents[2] / "src"
OSSL = SRC / "pqcnet" / "qstp" / "_ossl.py"

BY_KIND = {kind: [s for s in _ossl.PRIVATE_SYMBOLS if s.where == kind]
           for kind in {s.where for s in _ossl.PRIVATE_SYMBOLS}}


def _ids(kind: str) -> list[str]:
    return [s.name for s in BY_KIND.get(kind, [])]


@pytest.mark.parametrize("name", _ids("module"))
def test_private_modules_import(name: str) -> None:
    importlib.import_module(name)


@pytest.mark.parametrize("name", _ids("binding.lib"))
def test_binding_lib_has(name: str) -> None:
    assert hasattr(Binding.lib, name), f"cryptography's binding lost lib.{name}"


@pytest.mark.parametrize("name", _ids("binding.ffi"))
def test_binding_ffi_has(name: str) -> None:
    assert hasattr(Binding.ffi, name), f"cryptography's binding lost ffi.{name}"


@pytest.mark.parametrize("name", _ids("pyopenssl.attr"))
def test_pyopenssl_private_attribute(name: str) -> None:
    cls, attr = name.split(".")
    ctx = SSL.Context(SSL.TLS_METHOD)
    obj = ctx if cls == "Context" else SSL.Connection(ctx, None)
    assert type(obj).__name__ == cls
    assert hasattr(obj, attr), f"pyOpenSSL's {cls} lost {attr}"


@pytest.mark.parametrize("name", _ids("pyopenssl.verify-local"))
def test_pyopenssl_verify_wrapper_local(name: str) -> None:
    # set_verify_error looks for this local in the wrapper _VerifyHelper builds
    nested = [c for c in SSL._VerifyHelper.__init__.__code__.co_consts
              if hasattr(c, "co_varnames")]
    assert any(name in c.co_varnames for c in nested), (
        f"pyOpenSSL's verify wrapper has no local {name!r}: set_verify_error would fall "
        "back to internal_error alerts")


@pytest.mark.parametrize("name", _ids("elf.symtab"))
def test_unexported_symbol_resolves(name: str) -> None:
    report = _ossl.symbol_report()
    offsets = report["offsets"]
    assert isinstance(offsets, dict)
    assert name in offsets, f"{name} not found in {report['module']}'s symbol table"


def test_every_binding_name_used_is_in_the_inventory() -> None:
    source = OSSL.read_text()
    listed = {(s.where, s.name) for s in _ossl.PRIVATE_SYMBOLS}
    used = {("binding.lib", n) for n in re.findall(r"\b_lib\.(\w+)", source)}
    used |= {("binding.ffi", n) for n in re.findall(r"\b_ffi\.(\w+)", source)}
    assert used <= listed, f"used but not in PRIVATE_SYMBOLS: {sorted(used - listed)}"
    unexported = {("elf.symtab", n) for n in _ossl._UNEXPORTED}
    assert unexported <= listed


#: What only _ossl.py may contain (word-bounded so ChannelBindingMismatch is fine).
PRIVATE_REACH = re.compile(
    r"\bBinding\b|hazmat\.bindings|\._ssl\b|\._context\b|_getframe|\b_lib\.|\b_ffi\.")


def test_no_other_module_reaches_into_openssl() -> None:
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path == OSSL or "/proto/" in path.as_posix():
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if PRIVATE_REACH.search(line):
                offenders.append(f"{path.relative_to(SRC)}:{lineno}: {line.strip()}")
    assert not offenders, "private OpenSSL access outside qstp/_ossl.py:\n" + "\n".join(offenders)


def test_the_grep_would_catch_a_reach() -> None:
    # the guard above is only worth something if its pattern matches the real idioms
    for line in ("from cryptography.hazmat.bindings.openssl.binding import Binding",
                 "Binding.lib.SSL_read(conn._ssl, buf, n)", "ctx._context",
                 "sys._getframe(1)", "_lib.SSL_get_error(p, n)"):
        assert PRIVATE_REACH.search(line), line
    assert not PRIVATE_REACH.search("class ChannelBindingMismatch(Unauthenticated):")
