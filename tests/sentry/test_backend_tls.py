"""Issue 12 §4: sentry -> backend over TLS (``https://`` targets, a CA bundle, an
optional client certificate), and ``sentry check`` refuses exactly what ``run`` would.
A real HTTPS backend (stdlib server wrapped in TLS) behind a real sentry and sidecar."""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pqcnet.errors import PqcnetError
from pqcnet.sentry.config import check_file, load_config
from pqcnet.sentry.errors import SentryConfigError
from pqcnet.sentry.wire import RequestHead

from .harness import HttpBackend, Mesh, config_dict, sentry_stack, write_config

pytestmark = pytest.mark.timeout(60)
STATUS = RequestHead("http", "GET", "/status")


def _cert(subject: str, issuer_key: Any, issuer: x509.Name | None, *, ca: bool,
          san: bool = False) -> tuple[Any, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=1))
         .not_valid_after(now + dt.timedelta(hours=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return key, b.sign(issuer_key or key, hashes.SHA256())


def _write(path: Path, key: Any, cert: x509.Certificate) -> tuple[Path, Path]:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return path.with_suffix(".crt"), path.with_suffix(".key")


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ca_key, ca = _cert("backend-ca", None, None, ca=True)
    other_key, other = _cert("other-ca", None, None, ca=True)
    out: dict[str, Path] = {}
    out["ca"], _ = _write(tmp_path / "ca", ca_key, ca)
    out["other_ca"], _ = _write(tmp_path / "other", other_key, other)
    k, c = _cert("backend", ca_key, ca.subject, ca=False, san=True)
    out["server_crt"], out["server_key"] = _write(tmp_path / "server", k, c)
    k, c = _cert("sentry-client", ca_key, ca.subject, ca=False)
    out["client_crt"], out["client_key"] = _write(tmp_path / "client", k, c)
    return out


@contextlib.contextmanager
def https_backend(pki: dict[str, Path], *, client_cert: bool) -> Iterator[HttpBackend]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki["server_crt"], pki["server_key"])
    if client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(pki["ca"])
    backend = HttpBackend()
    backend.server.socket = ctx.wrap_socket(backend.server.socket, server_side=True)
    with backend:
        yield backend


def _cfg(port: int, **tls: str) -> dict[str, Any]:
    cfg = config_dict(port, 1, 1)
    cfg["backends"][0] = {**cfg["backends"][0], "target": f"https://127.0.0.1:{port}", **tls}
    return cfg


async def _status(mesh: Mesh, path: Path) -> tuple[int, bytes, str]:
    async with sentry_stack(mesh, path) as stack:
        sidecar = stack.sidecar(mesh.acme, mesh.acme_issuer)
        try:
            head, stream, first = await sidecar.call(STATUS, b"")
            body = first
            with contextlib.suppress(PqcnetError):
                body += await stream.read_all(1 << 20)
            return head.status, body, head.error
        finally:
            await sidecar.aclose()


async def test_https_backend_with_ca_bundle_and_client_cert(
        mesh: Mesh, tmp_path: Path, pki: dict[str, Path]) -> None:
    with https_backend(pki, client_cert=True) as backend:
        path = write_config(tmp_path, mesh, _cfg(
            backend.port, tls_ca=pki["ca"].name, tls_cert=pki["client_crt"].name,
            tls_key=pki["client_key"].name))
        status, body, _ = await _status(mesh, path)
        assert status == 200 and b'"path": "/status"' in body
        assert backend.seen.requests and backend.seen.requests[-1]["path"] == "/status"


async def test_untrusted_or_missing_client_cert_is_a_backend_error(
        mesh: Mesh, tmp_path: Path, pki: dict[str, Path]) -> None:
    with https_backend(pki, client_cert=True) as backend:
        path = write_config(tmp_path, mesh, _cfg(backend.port, tls_ca=pki["other_ca"].name))
        status, _, error = await _status(mesh, path)  # the backend's cert is not trusted
        assert (status, error) == (502, "backend_error")
        path = write_config(tmp_path, mesh, _cfg(backend.port, tls_ca=pki["ca"].name))
        status, _, error = await _status(mesh, path)  # trusted, but no client certificate
        assert (status, error) == (502, "backend_error")
        assert backend.seen.requests == []  # nothing reached the backend


def test_check_and_run_refuse_the_same_tls_mistakes(
        mesh: Mesh, tmp_path: Path, pki: dict[str, Path]) -> None:
    for tls, why in (({"tls_ca": "missing.pem"}, "tls_ca"),
                     ({"tls_cert": pki["client_crt"].name}, "go together"),
                     ({"tls_ca": pki["client_key"].name}, "tls_ca")):
        path = write_config(tmp_path, mesh, _cfg(1, **tls))
        with pytest.raises(SentryConfigError, match=why):
            check_file(path)
        with pytest.raises(SentryConfigError, match=why):
            load_config(path)  # what `sentry run` loads
    cfg = config_dict(1, 1, 1)
    cfg["backends"][0]["tls_ca"] = pki["ca"].name  # an http:// target with TLS keys
    with pytest.raises(SentryConfigError, match="https"):
        load_config(write_config(tmp_path, mesh, cfg))
