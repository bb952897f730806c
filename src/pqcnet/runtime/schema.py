"""The config schema's public face: JSON Schema per file kind, and the one "check"
path every command that validates a config file goes through.

* :func:`json_schema` emits the JSON Schema (draft 2020-12) of a ``sentry``,
  ``relayer`` or ``node`` file from the pydantic models that also validate it
  (:class:`pqcnet.sentry.schema.SentryFile`, :class:`pqcnet.relayer.config.RelayerFile`
  / :class:`~pqcnet.relayer.config.RelayerConfig`, :class:`pqcnet.runtime.config.NodeFile`).
  Deployment tooling (Helm's ``values.schema.json``) is generated from it.
* :func:`check` validates a file of a kind the way ``run`` does — schema, then what
  only the loader can check (key files readable, routes name defined backends, the
  identity directory a ``run`` needs) — and returns a JSON-able summary. It delegates
  to each role's own check (:func:`pqcnet.sentry.config.check_file`,
  :meth:`pqcnet.relayer.config.RelayerConfig.check_file`, :func:`check_node_file`), which
  ``pqcnet sentry check`` / ``node check`` call directly (a sentry install does not
  ship the relayer) and whose parts the ``run`` commands use, so a file one accepts the
  other accepts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import TypeAdapter

from pqcnet._util.schema import where
from pqcnet.errors import PqcnetError
from pqcnet.relayer.config import RelayerConfig, RelayerFile
from pqcnet.runtime.config import NodeConfig, NodeFile, load_node_config
from pqcnet.runtime.errors import NodeConfigError
from pqcnet.sentry.config import check_file as check_sentry_file
from pqcnet.sentry.config import require_identity
from pqcnet.sentry.schema import SentryFile

Kind = Literal["sentry", "relayer", "node"]
KINDS: tuple[Kind, ...] = get_args(Kind)
#: the JSON Schema dialect pydantic emits
DIALECT = "https://json-schema.org/draft/2020-12/schema"


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


def require_runnable(cfg: NodeConfig) -> None:
    """What ``node run`` needs beyond a valid file: the role's identity directory."""
    try:
        if cfg.sentry is not None:
            require_identity(cfg.sentry, "" if cfg.sentry_path else where(cfg.source, "sentry"))
        elif cfg.relayer is not None:
            cfg.relayer.require_identity(cfg.source)
    except PqcnetError as exc:
        raise NodeConfigError(str(exc)) from None


def node_summary(cfg: NodeConfig) -> dict[str, Any]:
    """What a node check prints."""
    cp = cfg.control_plane
    return {
        "role": cfg.role, "transport": cp.spec.transport, "waku_rest_urls": list(cp.waku_rest_urls),
        "namespace": cp.spec.namespace, "governance_keys": len(cp.governance_keys),
        "governance_threshold": cp.spec.governance.threshold, "trusted": sorted(cp.trust),
        "ledger": cp.spec.ledger}


def load_node_file(path: Path) -> NodeConfig:
    """Load a node file as ``node run`` does (valid and runnable)."""
    cfg = load_node_config(path)
    require_runnable(cfg)
    return cfg


def check_node_file(path: Path) -> dict[str, Any]:
    """``node check``: :func:`load_node_file` and its summary."""
    return node_summary(load_node_file(path))


def check(path: Path, kind: str) -> dict[str, Any]:
    """Validate ``path`` exactly as the ``kind``'s ``run`` would; return its summary."""
    if kind == "sentry":
        return check_sentry_file(path)
    if kind == "relayer":
        return RelayerConfig.check_file(path)
    if kind == "node":
        return check_node_file(path)
    raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")


__all__ = ["DIALECT", "KINDS", "Kind", "check", "check_node_file", "json_schema",
           "load_node_file", "node_summary", "require_runnable"]
