"""The config schema's public face: JSON Schema per file kind, and the one "check"
path every command that validates a config file goes through.

* :func:`json_schema` emits the JSON Schema (draft 2020-12) of a ``sentry``,
  ``relayer`` or ``node`` file from the pydantic models that also validate it
  (:class:`pqcnet.sentry.schema.SentryFile`, :class:`pqcnet.relayer.config.RelayerFile`
  / :class:`~pqcnet.relayer.config.RelayerConfig`, :class:`pqcnet.runtime.config.NodeFile`).
  Deployment tooling (Helm's ``values.schema.json``) is generated from it.
* :func:`check` loads a file of a kind the way ``run`` does — schema, then what only
  the loader can check (key files readable, routes name defined backends, the
  identity directory a ``run`` needs) — and returns a JSON-able summary. ``pqcnet
  config check``, ``pqcnet sentry check`` and ``pqcnet node check`` all call it, and
  the ``run`` commands call :func:`load` + :func:`require_runnable`, so a file one
  accepts the other accepts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import TypeAdapter

from pqcnet._util.schema import where
from pqcnet.errors import PqcnetError
from pqcnet.relayer.config import RelayerConfig, RelayerFile
from pqcnet.relayer.errors import ConfigError
from pqcnet.runtime.config import NodeConfig, NodeFile, load_node_config
from pqcnet.runtime.errors import NodeConfigError
from pqcnet.sentry.config import SentryConfig, load_config, require_identity
from pqcnet.sentry.schema import SentryFile

Kind = Literal["sentry", "relayer", "node"]
KINDS: tuple[Kind, ...] = get_args(Kind)
#: the JSON Schema dialect pydantic emits
DIALECT = "https://json-schema.org/draft/2020-12/schema"

Loaded = SentryConfig | RelayerConfig | NodeConfig


def json_schema(kind: str) -> dict[str, Any]:
    """The JSON Schema of a ``kind`` config file (a fresh dict; JSON-serialisable)."""
    if kind == "sentry":
        schema = SentryFile.model_json_schema()
    elif kind == "relayer":  # `relayer: {...}`, or the keys alone
        schema = TypeAdapter(RelayerFile | RelayerConfig).json_schema()
    elif kind == "node":
        schema = NodeFile.model_json_schema()
    else:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return {"$schema": DIALECT, "title": f"pqcnet {kind} config", **schema}


def load(kind: Kind, path: Path) -> Loaded:
    """Read and validate ``path`` as a ``kind`` file (each role's own loader)."""
    if kind == "sentry":
        return load_config(path)
    if kind == "relayer":
        return RelayerConfig.load(path)
    return load_node_config(path)


def require_runnable(cfg: Loaded, name: str = "") -> None:
    """What ``run`` needs beyond a valid file: an identity directory. ``name`` is the
    file (error messages)."""
    if isinstance(cfg, SentryConfig):
        require_identity(cfg, name)
    elif isinstance(cfg, RelayerConfig):
        if not cfg.identity_dir:
            raise ConfigError(where(name, "relayer", "identity_dir")
                              + ": required to run a relayer")
    elif cfg.sentry is not None:
        try:
            require_identity(cfg.sentry, "" if cfg.sentry_path else where(cfg.source, "sentry"))
        except PqcnetError as exc:
            raise NodeConfigError(str(exc)) from None
    elif cfg.relayer is not None and not cfg.relayer.identity_dir:
        raise NodeConfigError(where(cfg.source, "relayer", "identity_dir")
                              + ": required to run a relayer")


def summary(cfg: Loaded) -> dict[str, Any]:
    """What a check prints: the facts an operator verifies at a glance."""
    if isinstance(cfg, SentryConfig):
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
    if isinstance(cfg, RelayerConfig):
        return {"node": cfg.node_id, "listen": f"{cfg.listen_host}:{cfg.listen_port}",
                "backend": cfg.backend, "shards": cfg.shards,
                "owned_shards": list(cfg.owned_shards) or "all",
                "metrics_port": cfg.metrics_port, "grpc_port": cfg.grpc_port}
    cp = cfg.control_plane
    return {
        "role": cfg.role, "transport": cp.transport, "waku_rest_urls": list(cp.waku_rest_urls),
        "namespace": cp.namespace, "governance_keys": len(cp.governance_keys),
        "governance_threshold": cp.governance_threshold, "trusted": sorted(cp.trust),
        "ledger": cp.ledger}


def check(path: Path, kind: str) -> dict[str, Any]:
    """Validate ``path`` exactly as ``run`` would and return its :func:`summary`."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    cfg = load(kind, path)
    require_runnable(cfg, str(path))
    return summary(cfg)


__all__ = ["DIALECT", "KINDS", "Kind", "Loaded", "check", "json_schema", "load",
           "require_runnable", "summary"]
