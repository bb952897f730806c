"""Sentry configuration: one YAML file, parsed into typed objects and validated at load.

The file has a *static* part (listen address, identity, backends, routes, bounds),
fixed for the life of the process, and a *policy* part (issuers, limits, ACL,
sanitizer) that :meth:`Sentry.reload` swaps in while tunnels stay up. Relative paths
are resolved against the config file's directory. See ``examples/sentry.yaml`` for a
complete, commented file. Every mistake is a :class:`~pqcnet.sentry.errors.SentryConfigError`
naming the offending key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pqcnet._util.yamlfile import read_yaml_file
from pqcnet.crypto.errors import CryptoError
from pqcnet.crypto.pqc import VerifyKey
from pqcnet.sentry.acl import AclPolicy
from pqcnet.sentry.errors import SentryConfigError
from pqcnet.sentry.limiter import Plan
from pqcnet.sentry.sanitizer import SanitizerPolicy, parse_policy

#: Bound on the config file we read (a typo'd path to a huge file must not OOM us).
MAX_CONFIG_BYTES = 1024 * 1024
BACKEND_KINDS = ("http", "grpc", "tcp")


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """One upstream the sentry forwards to."""

    name: str
    #: "http" (JSON-RPC / REST over HTTP/1.1), "grpc", or "tcp"
    kind: str
    #: http: base URL ``http://127.0.0.1:8080``; grpc/tcp: ``host:port``
    target: str
    #: tenants whose requests may reach this backend (namespace isolation)
    tenants: tuple[str, ...]
    #: seconds per request (connect + response head)
    timeout: float = 10.0
    #: pooled connections kept to this backend
    max_connections: int = 100


@dataclass(frozen=True, slots=True)
class Route:
    """First route whose ``prefix`` starts the request path (or gRPC method) wins."""

    prefix: str
    backend: str
    #: "http" or "grpc" (tcp requests name their backend directly)
    kind: str = "http"


@dataclass(frozen=True, slots=True)
class Bounds:
    """Named bounds of the sentry's request handling."""

    #: largest request body read into memory (sanitizer needs whole JSON bodies)
    max_request_body: int = 4 * 1024 * 1024
    #: seconds for a client to deliver head + body on a stream (slowloris bound)
    request_read_timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class Policy:
    """The hot-reloadable part."""

    issuers: Mapping[str, tuple[VerifyKey, ...]]
    default_plan: Plan
    plans: Mapping[str, Plan]
    max_in_flight: int
    acl: AclPolicy
    sanitizer: Mapping[str, SanitizerPolicy]
    assertion_cache_size: int = 100_000
    clock_skew: float = 30.0


@dataclass(frozen=True, slots=True)
class SentryConfig:
    """A whole validated sentry configuration."""

    listen_host: str
    listen_port: int
    identity_dir: Path | None
    backends: Mapping[str, BackendConfig]
    routes: tuple[Route, ...]
    policy: Policy
    bounds: Bounds = field(default_factory=Bounds)
    metrics_port: int | None = None
    ledger_path: Path | None = None
    attestation_interval: float = 60.0
    source: Path | None = None


def load_verify_key(path: Path) -> VerifyKey:
    """Read an ML-DSA public key (PEM SubjectPublicKeyInfo)."""
    try:
        return VerifyKey.from_pem(path.read_bytes()[:MAX_CONFIG_BYTES])
    except (OSError, CryptoError) as exc:
        raise SentryConfigError(f"cannot load issuer key {path}: {exc}") from None


def verify_key_pem(key: VerifyKey) -> bytes:
    """PEM SubjectPublicKeyInfo of an ML-DSA public key (what issuers publish)."""
    return key.to_pem()


def _get(d: Mapping[str, Any], key: str, typ: type, where: str, default: Any = ...) -> Any:
    if key not in d:
        if default is ...:
            raise SentryConfigError(f"{where}.{key} is required")
        return default
    value = d[key]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise SentryConfigError(f"{where}.{key} must be {typ.__name__}, got {value!r}")
    return value


def _plan(d: Any, where: str) -> Plan:
    if not isinstance(d, Mapping):
        raise SentryConfigError(f"{where} must be a mapping with rate and burst")
    return Plan(rate=_get(d, "rate", float, where), burst=_get(d, "burst", float, where))


def _hostport(value: str, where: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise SentryConfigError(f"{where} must be host:port, got {value!r}")
    return host, int(port)


def _sanitizer_key(tenant: str, spec: Mapping[str, Any], base: Path) -> bytes:
    if "key_hex" in spec:
        try:
            return bytes.fromhex(str(spec["key_hex"]))
        except ValueError:
            raise SentryConfigError(f"sanitizer.{tenant}.key_hex is not hex") from None
    if "key_file" in spec:
        try:
            return (base / str(spec["key_file"])).read_bytes()[:4096].strip()
        except OSError as exc:
            raise SentryConfigError(f"sanitizer.{tenant}.key_file: {exc}") from None
    raise SentryConfigError(f"sanitizer.{tenant} needs key_hex or key_file")


def parse_policy_section(raw: Mapping[str, Any], base: Path) -> Policy:
    """The hot-reloadable sections: issuers, limits, acl, sanitizer."""
    issuers_raw = _get(raw, "issuers", dict, "config")
    issuers: dict[str, tuple[VerifyKey, ...]] = {}
    for tenant, files in issuers_raw.items():
        if not isinstance(files, list) or not files:
            raise SentryConfigError(f"issuers.{tenant} must be a non-empty list of key files")
        issuers[str(tenant)] = tuple(load_verify_key(base / str(f)) for f in files)
    limits = _get(raw, "limits", dict, "config")
    plans = {str(t): _plan(p, f"limits.tenants.{t}") for t, p in
             _get(limits, "tenants", dict, "limits", {}).items()}
    acl_raw = _get(raw, "acl", dict, "config")
    acl = AclPolicy.of(
        [str(x) for x in _get(acl_raw, "allow_from", list, "acl")],
        [str(x) for x in _get(acl_raw, "allow_methods", list, "acl")],
    )
    sanitizer: dict[str, SanitizerPolicy] = {}
    for tenant, spec in _get(raw, "sanitizer", dict, "config", {}).items():
        if not isinstance(spec, Mapping):
            raise SentryConfigError(f"sanitizer.{tenant} must be a mapping")
        sanitizer[str(tenant)] = parse_policy(_sanitizer_key(str(tenant), spec, base), spec)
    max_in_flight = _get(limits, "max_in_flight", int, "limits")
    if max_in_flight < 1:
        raise SentryConfigError("limits.max_in_flight must be >= 1")
    return Policy(
        issuers=issuers,
        default_plan=_plan(_get(limits, "default", dict, "limits"), "limits.default"),
        plans=plans,
        max_in_flight=max_in_flight,
        acl=acl,
        sanitizer=sanitizer,
        assertion_cache_size=_get(raw, "assertion_cache_size", int, "config", 100_000),
        clock_skew=_get(raw, "clock_skew", float, "config", 30.0),
    )


def _backend(d: Any, i: int) -> BackendConfig:
    where = f"backends[{i}]"
    if not isinstance(d, Mapping):
        raise SentryConfigError(f"{where} must be a mapping")
    kind = _get(d, "kind", str, where)
    if kind not in BACKEND_KINDS:
        raise SentryConfigError(f"{where}.kind must be one of {BACKEND_KINDS}, got {kind!r}")
    target = _get(d, "target", str, where)
    if kind == "http" and not target.startswith("http://") and not target.startswith("https://"):
        raise SentryConfigError(f"{where}.target must be an http(s):// URL")
    if kind != "http":
        _hostport(target, f"{where}.target")
    tenants = _get(d, "tenants", list, where)
    timeout = _get(d, "timeout", float, where, 10.0)
    conns = _get(d, "max_connections", int, where, 100)
    if timeout <= 0 or conns < 1:
        raise SentryConfigError(f"{where}: timeout must be > 0 and max_connections >= 1")
    return BackendConfig(_get(d, "name", str, where), kind, target,
                         tuple(str(t) for t in tenants), timeout, conns)


def parse_config(raw: Mapping[str, Any], base: Path, source: Path | None = None) -> SentryConfig:
    """Validate a loaded YAML mapping."""
    if not isinstance(raw, Mapping):
        raise SentryConfigError("config must be a YAML mapping")
    host, port = _hostport(_get(raw, "listen", str, "config"), "listen")
    backends: dict[str, BackendConfig] = {}
    for i, b in enumerate(_get(raw, "backends", list, "config")):
        be = _backend(b, i)
        if be.name in backends:
            raise SentryConfigError(f"duplicate backend name {be.name!r}")
        backends[be.name] = be
    routes = []
    for i, r in enumerate(_get(raw, "routes", list, "config", [])):
        where = f"routes[{i}]"
        if not isinstance(r, Mapping):
            raise SentryConfigError(f"{where} must be a mapping")
        route = Route(_get(r, "prefix", str, where), _get(r, "backend", str, where))
        if route.backend not in backends:
            raise SentryConfigError(f"{where}.backend {route.backend!r} is not defined")
        kind = backends[route.backend].kind
        if kind == "tcp":
            raise SentryConfigError(f"{where}: tcp backends are addressed by name, not routed")
        routes.append(Route(route.prefix, route.backend, kind))
    bounds_raw = _get(raw, "bounds", dict, "config", {})
    dflt = Bounds()
    bounds = Bounds(
        max_request_body=_get(bounds_raw, "max_request_body", int, "bounds",
                              dflt.max_request_body),
        request_read_timeout=_get(bounds_raw, "request_read_timeout", float, "bounds",
                                  dflt.request_read_timeout),
    )
    identity = _get(raw, "identity_dir", str, "config", "")
    metrics = _get(raw, "metrics_port", int, "config", 0)
    ledger = _get(raw, "ledger", str, "config", "")
    return SentryConfig(
        listen_host=host,
        listen_port=port,
        identity_dir=base / identity if identity else None,
        backends=backends,
        routes=tuple(routes),
        policy=parse_policy_section(raw, base),
        bounds=bounds,
        metrics_port=metrics or None,
        ledger_path=base / ledger if ledger else None,
        attestation_interval=_get(raw, "attestation_interval", float, "config", 60.0),
        source=source,
    )


def read_yaml(path: Path) -> Mapping[str, Any]:
    """Read and parse a bounded YAML file that must hold a mapping."""
    raw = read_yaml_file(path, SentryConfigError, max_bytes=MAX_CONFIG_BYTES)
    if not isinstance(raw, Mapping):
        raise SentryConfigError(f"config {path} must be a YAML mapping")
    return raw


def load_config(path: Path) -> SentryConfig:
    """Read, parse and validate a sentry config file."""
    return parse_config(read_yaml(path), path.parent, source=path)


def file_fingerprint(path: Path) -> bytes:
    """SHA-256 of a file's bytes (used to notice config edits for hot reload)."""
    try:
        return hashlib.sha256(path.read_bytes()[: MAX_CONFIG_BYTES + 1]).digest()
    except OSError:
        return b""
