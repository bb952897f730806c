"""The node file: which role runs, its own config, and how it joins the control plane.

One YAML file, validated once at start (cores never read files)::

    role: relayer                  # relayer | sentry
    relayer: relayer.yaml          # the role's own config: a path, or the mapping inline
    control_plane:
      transport: waku              # waku | embedded (in-process, a node alone)
      waku_rest_urls: [http://127.0.0.1:8645]
      namespace: prod
      governance: {keys: [gov.pub], threshold: 1, issuer: governance}
      trust: {other-node: other.pub}
      ...

The role's config is loaded by the role's own loader (``RelayerConfig.load`` /
``from_mapping``, ``pqcnet.sentry.config.load_config`` / ``parse_config``) as-is, so the
node file never redefines a relayer or sentry key. Every mistake — in the node file or
in the role's config — becomes one :class:`NodeConfigError` line naming the key.
Relative paths resolve against the node file's directory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pqcnet._util.yamlfile import read_yaml_file
from pqcnet.crypto.errors import CryptoError
from pqcnet.crypto.pqc import VerifyKey
from pqcnet.errors import PqcnetError
from pqcnet.relayer.config import RelayerConfig
from pqcnet.runtime.errors import NodeConfigError
from pqcnet.sentry.config import SentryConfig, load_config, parse_config

Role = Literal["relayer", "sentry"]
TransportKind = Literal["waku", "embedded"]

#: Bound on the node file and key files we read (a mistyped path to a huge file must not OOM us).
MAX_FILE_BYTES = 1024 * 1024
#: Most governance keys / trusted senders (each costs a keyring entry and a verify per message).
MAX_KEYS = 64

_TOP_KEYS = {"role", "relayer", "sentry", "control_plane"}


@dataclass(frozen=True, slots=True)
class ControlPlaneConfig:
    """How the node joins the control plane."""

    transport: TransportKind = "embedded"
    #: REST base URLs of Waku nodes; the first one answering ``/health`` at start is used
    waku_rest_urls: tuple[str, ...] = ()
    #: content-topic namespace (separates meshes sharing one Waku network)
    namespace: str = ""
    #: mesh node id (default: the relayer's node_id / the sentry certificate's node id)
    node_id: str = ""
    #: directive verification: keys, how many must sign
    governance_keys: tuple[VerifyKey, ...] = ()
    governance_threshold: int = 1
    #: node id the governance tooling sends as (``pqcnet mesh directive --issuer``);
    #: trusted under the first governance key
    governance_issuer: str = "governance"
    #: other senders whose envelopes we verify, node id -> key (version 1)
    trust: Mapping[str, VerifyKey] = field(default_factory=dict)
    #: "node": anchor directives in the role's QS-DAG before applying them; "none": do not
    ledger: Literal["node", "none"] = "node"
    announce_interval_s: float = 10.0
    #: relayer: publish anchored volume proofs on ``relay-reports``, this often
    publish_reports: bool = True
    report_interval_s: float = 1.0
    #: Prometheus for the control-plane metrics (``pqcnet_mesh_*``) on 127.0.0.1; None: off
    metrics_port: int | None = None
    #: sentry forced rekey: directory of a MeshCA that issues our new certificate
    ca_dir: Path | None = None
    #: housekeeping tick (announce / expiry / tips), seconds
    tick_s: float = 0.5


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """A validated node file."""

    role: Role
    control_plane: ControlPlaneConfig
    relayer: RelayerConfig | None = None
    sentry: SentryConfig | None = None
    #: the sentry config file (for the attestation's config hash), when given as a path
    sentry_path: Path | None = None


def _err(msg: str) -> NodeConfigError:
    return NodeConfigError(msg)


def load_key(path: Path, where: str) -> VerifyKey:
    """An ML-DSA public key PEM (or a signing key PEM, whose public half is used)."""
    try:
        pem = path.read_bytes()[:MAX_FILE_BYTES]
    except OSError as exc:
        raise _err(f"{where}: cannot read key {path}: {exc.strerror}") from None
    try:
        return VerifyKey.from_pem(pem, private_ok=True)
    except CryptoError:
        raise _err(f"{where}: {path} is not an ML-DSA key PEM") from None


def _num(raw: Mapping[str, Any], key: str, default: float, *, minimum: float = 0.0,
         integer: bool = False) -> Any:
    value = raw.get(key, default)
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or value <= minimum:
        raise _err(f"control_plane.{key}: must be a number > {minimum:g}, got {value!r}")
    return value


def _control_plane(raw: Any, base: Path) -> ControlPlaneConfig:
    if not isinstance(raw, Mapping):
        raise _err("control_plane: must be a mapping")
    known = {f for f in ControlPlaneConfig.__dataclass_fields__
             if not f.startswith("governance_")} | {"governance"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise _err(f"control_plane: unknown keys: {', '.join(map(str, unknown))}")
    transport = raw.get("transport", "embedded")
    if transport not in ("waku", "embedded"):
        raise _err(f"control_plane.transport: {transport!r} is not waku or embedded")
    urls = raw.get("waku_rest_urls", [])
    if isinstance(urls, str):
        urls = [urls]
    if not isinstance(urls, list) or not all(
            isinstance(u, str) and u.startswith(("http://", "https://")) for u in urls):
        raise _err("control_plane.waku_rest_urls: must be a list of http(s) URLs")
    if transport == "waku" and not urls:
        raise _err("control_plane.waku_rest_urls: required for transport waku")
    for key in ("namespace", "node_id"):
        if not isinstance(raw.get(key, ""), str):
            raise _err(f"control_plane.{key}: must be a string")
    gov = raw.get("governance", {})
    if not isinstance(gov, Mapping):
        raise _err("control_plane.governance: must be a mapping")
    unknown = sorted(set(gov) - {"keys", "threshold", "issuer"})
    if unknown:
        raise _err(f"control_plane.governance: unknown keys: {', '.join(map(str, unknown))}")
    paths = gov.get("keys", [])
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths) or (
            len(paths) > MAX_KEYS):
        raise _err(f"control_plane.governance.keys: must be a list of up to {MAX_KEYS} paths")
    keys = tuple(load_key(base / p, "control_plane.governance.keys") for p in paths)
    threshold = gov.get("threshold", 1)
    if isinstance(threshold, bool) or not isinstance(threshold, int) or not (
            1 <= threshold <= max(1, len(keys))):
        raise _err(f"control_plane.governance.threshold: must be 1..{max(1, len(keys))}")
    issuer = gov.get("issuer", "governance")
    if not isinstance(issuer, str) or not issuer:
        raise _err("control_plane.governance.issuer: must be a non-empty node id")
    trust_raw = raw.get("trust", {})
    if not isinstance(trust_raw, Mapping) or len(trust_raw) > MAX_KEYS or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in trust_raw.items()):
        raise _err(f"control_plane.trust: must map up to {MAX_KEYS} node ids to key paths")
    trust = {n: load_key(base / p, f"control_plane.trust.{n}") for n, p in trust_raw.items()}
    ledger = raw.get("ledger", "node")
    if ledger not in ("node", "none"):
        raise _err(f"control_plane.ledger: {ledger!r} is not node or none")
    publish = raw.get("publish_reports", True)
    if not isinstance(publish, bool):
        raise _err("control_plane.publish_reports: must be true or false")
    metrics = raw.get("metrics_port")
    if metrics is not None and (isinstance(metrics, bool) or not isinstance(metrics, int)
                                or not 0 <= metrics <= 65535):
        raise _err("control_plane.metrics_port: must be a port 0..65535 (0: any free port)")
    ca = raw.get("ca_dir")
    if ca is not None and not isinstance(ca, str):
        raise _err("control_plane.ca_dir: must be a path")
    return ControlPlaneConfig(
        transport=transport, waku_rest_urls=tuple(urls), namespace=raw.get("namespace", ""),
        node_id=raw.get("node_id", ""), governance_keys=keys, governance_threshold=threshold,
        governance_issuer=issuer, trust=trust, ledger=ledger,
        announce_interval_s=_num(raw, "announce_interval_s", 10.0),
        publish_reports=publish, report_interval_s=_num(raw, "report_interval_s", 1.0),
        metrics_port=metrics, ca_dir=base / ca if ca else None,
        tick_s=_num(raw, "tick_s", 0.5))


def parse_node_config(raw: Any, base: Path) -> NodeConfig:
    """Validate a loaded node mapping; relative paths resolve against ``base``."""
    if not isinstance(raw, Mapping):
        raise _err("node config must be a YAML mapping")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise _err(f"unknown node config keys: {', '.join(map(str, unknown))}")
    role = raw.get("role")
    if role not in ("relayer", "sentry"):
        raise _err(f"role: {role!r} is not relayer or sentry")
    other = "sentry" if role == "relayer" else "relayer"
    if other in raw:
        raise _err(f"{other}: not allowed for role {role}")
    if role not in raw:
        raise _err(f"{role}: required (a path to the {role} config, or the mapping inline)")
    cp = _control_plane(raw.get("control_plane", {}), base)
    section = raw[role]
    try:
        if role == "relayer":
            if isinstance(section, str):
                return NodeConfig(role, cp, relayer=RelayerConfig.load(base / section))
            return NodeConfig(role, cp, relayer=RelayerConfig.from_mapping(section, base=base))
        if isinstance(section, str):
            path = base / section
            return NodeConfig(role, cp, sentry=load_config(path), sentry_path=path)
        return NodeConfig(role, cp, sentry=parse_config(section, base))
    except NodeConfigError:
        raise
    except PqcnetError as exc:  # the role's own loader named the key; say where it was
        raise _err(f"{role}: {exc}") from None


def load_node_config(path: str | Path) -> NodeConfig:
    """Read and validate a node file."""
    p = Path(path)
    return parse_node_config(read_yaml_file(p, _err, what="node config", max_bytes=MAX_FILE_BYTES),
                             p.resolve().parent)

__all__ = ["MAX_FILE_BYTES", "MAX_KEYS", "ControlPlaneConfig", "NodeConfig",
           "load_key", "load_node_config", "parse_node_config"]
