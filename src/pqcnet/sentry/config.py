"""Sentry configuration: one YAML file, validated against :class:`~pqcnet.sentry.schema.SentryFile`
and turned into the typed objects the core uses.

The file has a *static* part (listen address, identity, backends, routes, bounds),
fixed for the life of the process, and a *policy* part (issuers, limits, ACL,
sanitizer) that :meth:`Sentry.reload` swaps in while tunnels stay up. Relative paths
are resolved against the config file's directory. See ``examples/sentry.yaml`` for a
complete, commented file. Every mistake is one :class:`~pqcnet.sentry.errors.SentryConfigError`
line naming the file and the key (``sentry.yaml: limits.default.rate: must be greater
than 0, got 0``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pqcnet._util.schema import (
    HOSTPORT_PATTERN,
    HTTP_URL_PATTERN,
    split_hostport,
    validate,
    where,
)
from pqcnet._util.yamlfile import read_yaml_file
from pqcnet.crypto.errors import CryptoError
from pqcnet.crypto.pqc import VerifyKey
from pqcnet.errors import PqcnetError
from pqcnet.identity.errors import IdentityError
from pqcnet.identity.policy import compile_layouts
from pqcnet.identity.spiffe import SpiffeLayout
from pqcnet.qstp.config import QstpConfiguration
from pqcnet.qstp.tls import TlsPolicy
from pqcnet.sentry.acl import AclPolicy
from pqcnet.sentry.errors import SentryConfigError
from pqcnet.sentry.limiter import Plan
from pqcnet.sentry.sanitizer import SanitizerPolicy, parse_policy
from pqcnet.sentry.schema import (
    BACKEND_KINDS,
    BackendConfig,
    Bounds,
    PlanSpec,
    SanitizerSpec,
    SentryFile,
)
from pqcnet.sentry.upstream import backend_tls_context

#: Bound on the config file and key files we read (a typo'd path to a huge file must
#: not OOM us).
MAX_CONFIG_BYTES = 1024 * 1024
#: Bound on a sanitizer key file.
MAX_KEY_FILE_BYTES = 4096

__all__ = [
    "BACKEND_KINDS",
    "MAX_CONFIG_BYTES",
    "BackendConfig",
    "Bounds",
    "Policy",
    "Route",
    "SentryConfig",
    "check_file",
    "file_fingerprint",
    "load_config",
    "load_verify_key",
    "parse_config",
    "read_yaml",
    "require_identity",
    "summary",
    "verify_key_pem",
]


@dataclass(frozen=True, slots=True)
class Route:
    """A route with the kind of the backend it names."""

    prefix: str
    backend: str
    #: "http" or "grpc" (tcp requests name their backend directly)
    kind: str = "http"


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
    #: most of ``max_in_flight`` one tenant may hold (a plan's own cap overrides it)
    tenant_share: float = 1.0

    @property
    def tenant_caps(self) -> dict[str, int]:
        """Caps set by plans: tenants whose own plan sets ``max_in_flight``, and under
        ``""`` the default plan's (every other tenant's)."""
        caps = {t: p.max_in_flight for t, p in self.plans.items() if p.max_in_flight}
        if self.default_plan.max_in_flight:
            caps[""] = self.default_plan.max_in_flight
        return caps


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
    metrics_host: str = "127.0.0.1"
    ledger_path: Path | None = None
    attestation_interval: float = 60.0
    source: Path | None = None
    #: create a dev genesis (this node as authority) in an empty ledger
    ledger_dev_genesis: bool = True
    #: read tenant/role/node from peers' SPIFFE IDs of other shapes (static part)
    spiffe_layouts: tuple[SpiffeLayout, ...] = ()

    def tls_policy(self) -> TlsPolicy:
        """The QSTP policy the sentry serves with (its SPIFFE layouts applied)."""
        return TlsPolicy(spiffe_layouts=self.spiffe_layouts)

    def qstp_config(self) -> QstpConfiguration:
        """The QSTP settings the sentry serves with: windows from
        ``bounds.tunnel_buffer_bytes`` and a new receive budget of
        ``bounds.tunnel_buffer_total_bytes`` (call once per server: the budget is what
        its tunnels share)."""
        return QstpConfiguration().with_buffer(self.bounds.tunnel_buffer_bytes,
                                               self.bounds.tunnel_buffer_total_bytes)


def load_verify_key(path: Path, *, error: type[PqcnetError] = SentryConfigError,
                    at: str = "", allow_private: bool = False) -> VerifyKey:
    """Read an ML-DSA public key (PEM SubjectPublicKeyInfo) — the one reader of key
    files named in configs. With ``allow_private`` a PKCS#8 signing key is accepted
    too (its public half is used). ``at`` prefixes the error (file and key path)."""
    prefix = f"{at}: " if at else ""
    try:
        with path.open("rb") as fh:
            pem = fh.read(MAX_CONFIG_BYTES)
    except OSError as exc:
        raise error(f"{prefix}cannot read key {path}: {exc.strerror}") from None
    try:
        return VerifyKey.from_pem(pem, private_ok=allow_private)
    except CryptoError:
        raise error(f"{prefix}{path} is not an ML-DSA "
                    f"{'key' if allow_private else 'public key'} PEM") from None


def verify_key_pem(key: VerifyKey) -> bytes:
    """PEM SubjectPublicKeyInfo of an ML-DSA public key (what issuers publish)."""
    return key.to_pem()


def _plan(spec: PlanSpec) -> Plan:
    return Plan(rate=spec.rate, burst=spec.burst, tenant_rate=spec.tenant_rate,
                tenant_burst=spec.tenant_burst, tunnel_rate=spec.tunnel_rate,
                tunnel_burst=spec.tunnel_burst, max_in_flight=spec.max_in_flight,
                pipe_rate=spec.pipe_rate, pipe_burst=spec.pipe_burst)


def _sanitizer_key(spec: SanitizerSpec, base: Path, at: str) -> bytes:
    if spec.key_hex is not None:
        return bytes.fromhex(spec.key_hex)
    if spec.key_file is not None:
        try:
            with (base / spec.key_file).open("rb") as fh:
                return fh.read(MAX_KEY_FILE_BYTES).strip()
        except OSError as exc:
            raise SentryConfigError(f"{at}.key_file: {exc.strerror}: {exc.filename}") from None
    raise SentryConfigError(f"{at}: needs key_hex or key_file")


def _policy(f: SentryFile, base: Path, src: str) -> Policy:
    """The hot-reloadable sections: issuers, limits, acl, sanitizer."""
    issuers = {tenant: tuple(load_verify_key(base / name, at=where(src, "issuers", tenant, i))
                             for i, name in enumerate(files))
               for tenant, files in f.issuers.items()}
    sanitizer: dict[str, SanitizerPolicy] = {}
    for tenant, spec in f.sanitizer.items():
        at = where(src, "sanitizer", tenant)
        rules = spec.model_dump(include={"headers", "json_fields"})
        try:
            sanitizer[tenant] = parse_policy(_sanitizer_key(spec, base, at), rules)
        except SentryConfigError as exc:
            raise SentryConfigError(str(exc) if str(exc).startswith(at) else f"{at}: {exc}"
                                    ) from None
    try:
        acl = (AclPolicy.from_rules(f.acl.rules) if f.acl.rules is not None
               else AclPolicy.of(f.acl.allow_from or (), f.acl.allow_methods or ()))
    except SentryConfigError as exc:
        raise SentryConfigError(where(src, str(exc))) from None
    return Policy(
        issuers=issuers,
        default_plan=_plan(f.limits.default),
        plans={t: _plan(p) for t, p in f.limits.tenants.items()},
        max_in_flight=f.limits.max_in_flight,
        tenant_share=f.limits.tenant_share,
        acl=acl,
        sanitizer=sanitizer,
        assertion_cache_size=f.assertion_cache_size,
        clock_skew=f.clock_skew,
    )


def _backends(f: SentryFile, src: str, base: Path) -> dict[str, BackendConfig]:
    backends: dict[str, BackendConfig] = {}
    for i, be in enumerate(f.backends):
        at = where(src, "backends", i)
        if be.name in backends:
            raise SentryConfigError(f"{at}.name: duplicate backend name {be.name!r}")
        # the same patterns the JSON Schema states for this rule (if kind: http ...)
        pattern, what = ((HTTP_URL_PATTERN, "an http(s):// URL") if be.kind == "http"
                         else (HOSTPORT_PATTERN, "host:port"))
        if not re.fullmatch(pattern, be.target):
            raise SentryConfigError(f"{at}.target: expected {what} for a {be.kind} backend, "
                                    f"got {be.target!r}")
        paths = {k: str(base / v) for k in ("tls_ca", "tls_cert", "tls_key")
                 if (v := getattr(be, k)) and not Path(v).is_absolute()}
        if paths:
            be = be.model_copy(update=paths)
        if be.kind == "http":  # the TLS context run builds, built here too: check == run
            try:
                backend_tls_context(be.name, be.target, ca=be.tls_ca, cert=be.tls_cert,
                                    key=be.tls_key)
            except SentryConfigError as exc:
                raise SentryConfigError(f"{at}: {exc}") from None
        elif be.tls_ca or be.tls_cert or be.tls_key:
            raise SentryConfigError(f"{at}.tls_ca: TLS to a backend is for http backends")
        backends[be.name] = be
    return backends


def _routes(f: SentryFile, backends: Mapping[str, BackendConfig], src: str) -> tuple[Route, ...]:
    routes = []
    for i, r in enumerate(f.routes):
        at = where(src, "routes", i)
        if r.backend not in backends:
            raise SentryConfigError(f"{at}.backend: {r.backend!r} is not defined")
        kind = backends[r.backend].kind
        if kind == "tcp":
            raise SentryConfigError(f"{at}.backend: tcp backends are addressed by name, "
                                    "not routed")
        routes.append(Route(r.prefix, r.backend, kind))
    return tuple(routes)


def _layouts(f: SentryFile, src: str) -> tuple[SpiffeLayout, ...]:
    try:
        return compile_layouts(f.spiffe_layouts)
    except IdentityError as exc:
        raise SentryConfigError(where(src, str(exc))) from None


def parse_config(raw: Any, base: Path, source: Path | None = None, *,
                 name: str = "") -> SentryConfig:
    """Validate a loaded YAML mapping; ``name`` (default: ``source``) starts every
    error message."""
    src = name or (str(source) if source is not None else "")
    f = validate(SentryFile, raw, SentryConfigError, source=src)
    host, port = split_hostport(f.listen)
    backends = _backends(f, src, base)
    return SentryConfig(
        listen_host=host,
        listen_port=port,
        identity_dir=base / f.identity_dir if f.identity_dir else None,
        backends=backends,
        routes=_routes(f, backends, src),
        policy=_policy(f, base, src),
        bounds=f.bounds,
        metrics_port=f.metrics_port or None,
        metrics_host=f.metrics_host,
        ledger_path=base / f.ledger if f.ledger else None,
        attestation_interval=f.attestation_interval,
        source=source,
        ledger_dev_genesis=f.ledger_dev_genesis,
        spiffe_layouts=_layouts(f, src),
    )


def read_yaml(path: Path) -> Any:
    """Read and parse a bounded YAML file."""
    return read_yaml_file(path, SentryConfigError, max_bytes=MAX_CONFIG_BYTES)


def load_config(path: Path) -> SentryConfig:
    """Read, parse and validate a sentry config file."""
    return parse_config(read_yaml(path), path.parent, source=path)


def require_identity(cfg: SentryConfig, name: str = "") -> Path:
    """The identity directory a sentry needs to run (what ``check`` and ``run`` agree on)."""
    src = name or (str(cfg.source) if cfg.source is not None else "")
    if cfg.identity_dir is None:
        raise SentryConfigError(where(src, "identity_dir") + ": required to run a sentry "
                                "(the node identity from `pqcnet ca issue ... --out DIR`)")
    if not cfg.identity_dir.is_dir():
        raise SentryConfigError(where(src, "identity_dir") + f": {cfg.identity_dir} is not a "
                                "directory (create it with `pqcnet ca issue ... --out DIR`)")
    return cfg.identity_dir


def summary(cfg: SentryConfig) -> dict[str, Any]:
    """What a check prints: the facts an operator verifies at a glance."""
    from pqcnet.sentry.sanitizer import IdentitySanitizer

    p = cfg.policy
    return {
        "listen": f"{cfg.listen_host}:{cfg.listen_port}",
        "backends": {n: {"kind": b.kind, "target": b.target, "tenants": list(b.tenants)}
                     for n, b in cfg.backends.items()},
        "tenants": sorted(p.issuers),
        "max_in_flight": p.max_in_flight,
        "sanitizer_policy_sha256": {t: d.hex() for t, d in
                                    IdentitySanitizer(p.sanitizer).digests().items()},
    }


def check_file(path: Path) -> dict[str, Any]:
    """Validate ``path`` as ``sentry run`` would (schema, key files, identity directory)
    and return its :func:`summary` — ``sentry check`` and ``config check --kind sentry``."""
    cfg = load_config(path)
    require_identity(cfg)
    return summary(cfg)


def file_fingerprint(path: Path) -> bytes:
    """SHA-256 of a file's bytes (used to notice config edits for hot reload)."""
    try:
        with path.open("rb") as fh:
            return hashlib.sha256(fh.read(MAX_CONFIG_BYTES + 1)).digest()
    except OSError:
        return b""
