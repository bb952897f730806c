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

:class:`NodeFile` is the schema (pydantic, see :mod:`pqcnet._util.schema`); an inline
role section is validated by the role's own model (:class:`~pqcnet.relayer.config.RelayerConfig`,
:class:`~pqcnet.sentry.schema.SentryFile`) inside it, so its errors carry the full key
path (``node.yaml: relayer.shards: ...``), and a role config given as a path is loaded
by the role's own loader. The node file never redefines a relayer or sentry key.
Every mistake becomes one :class:`NodeConfigError` line naming the file and the key.
Relative paths resolve against the node file's directory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from pqcnet._util.schema import Count, HttpUrl, Port, Positive, Schema, validate, where
from pqcnet._util.yamlfile import read_yaml_file
from pqcnet.crypto.pqc import SigningKey, VerifyKey
from pqcnet.errors import PqcnetError
from pqcnet.relayer.config import RelayerConfig
from pqcnet.runtime.errors import NodeConfigError
from pqcnet.sentry.config import SentryConfig, load_config, load_verify_key, parse_config
from pqcnet.sentry.schema import SentryFile

Role = Literal["relayer", "sentry"]
ROLES: tuple[Role, ...] = ("relayer", "sentry")
TransportKind = Literal["waku", "embedded"]

#: Bound on the node file we read (a mistyped path to a huge file must not OOM us).
MAX_FILE_BYTES = 1024 * 1024
#: Most governance keys / trusted senders (each costs a keyring entry and a verify per message).
MAX_KEYS = 64


class GovernanceSpec(Schema):
    """Directive verification."""

    keys: list[str] = Field(default_factory=list, max_length=MAX_KEYS)
    """Governance public key PEMs (or signing keys: their public half is used)."""
    threshold: Count = 1
    """Signatures a directive needs (at most the number of keys)."""
    issuer: str = Field(default="governance", min_length=1)
    """Node id the governance tooling sends as (``pqcnet mesh directive --issuer``);
    trusted under the first governance key."""
    signing_keys: list[str] = Field(default_factory=list, max_length=MAX_KEYS)
    """Governance nodes only: private governance key files (unencrypted ML-DSA PEM, each
    one of ``keys``) this node signs slash directives with; empty on every other node."""


class ControlPlaneSpec(Schema):
    """How the node joins the control plane."""

    transport: TransportKind = "embedded"
    """waku, or embedded (in-process: a node alone, for try-outs)."""
    waku_rest_urls: list[HttpUrl] | HttpUrl = Field(default_factory=list)
    """REST base URLs of Waku nodes; one must answer /health at start, then the node
    fails over across all of them (active node plus a standby subscription leg)."""
    namespace: str = ""
    """Content-topic namespace (separates meshes sharing one Waku network)."""
    node_id: str = ""
    """Mesh node id (default: the relayer's node_id / the sentry certificate's node id)."""
    governance: GovernanceSpec = GovernanceSpec()
    trust: dict[str, str] = Field(default_factory=dict, max_length=MAX_KEYS)
    """Other senders whose envelopes we verify: node id -> key file (version 1)."""
    ledger: Literal["node", "none"] = "node"
    """node: anchor directives in the role's QS-DAG before applying them; none: no ledger,
    so the node obeys no directive (each must be anchored in its own QS-DAG first)."""
    announce_interval_s: Positive = 10.0
    """Seconds between node announcements."""
    dag_sync_interval_s: Annotated[float, Field(ge=0)] = 2.0
    """Seconds between publishing this node's QS-DAG tips (0: never; it still answers
    pulls)."""
    dag_pull_from: list[Annotated[str, Field(min_length=1)]] | None = Field(
        default=None, max_length=MAX_KEYS)
    """Node ids (the validators) whose tips this node pulls vertices from; null: any
    sender; []: nobody (anchor-only: a sentry keeps its ledger for anchor-before-effect
    without pulling every other node's diverged DAG)."""
    publish_reports: bool = True
    """Relayer: publish anchored volume proofs on relay-reports."""
    report_interval_s: Positive = 1.0
    """Seconds between relay-report rounds."""
    metrics_port: Port | None = None
    """Prometheus for pqcnet_mesh_* on 127.0.0.1 (null: off, 0: any free port)."""
    ca_dir: str | None = None
    """Forced rekey: directory of a MeshCA that certifies our new key."""
    tick_s: Positive = 0.5
    """Housekeeping tick (announce / expiry / tips), seconds."""
    state_dir: str = "mesh-state"
    """Control-plane state: DTN bundles, the last CA-signed CRL, the slashing journal, and
    (for a sentry without a ledger) the QS-DAG the node anchors directives in."""
    slashing_interval_s: Positive = 10.0
    """Seconds between rounds of the slashing pipeline (evidence -> proposal -> slash)."""
    sign_threads: Annotated[int, Field(ge=0, le=16)] = 1
    """Threads that sign and seal this node's control messages, off the event loop the
    role's tunnels run on (ML-DSA releases the GIL). 0: on the loop, where each ~1 ms
    signature stalls every tunnel of the node meanwhile."""

    model_config = ConfigDict(json_schema_extra={
        "if": {"properties": {"transport": {"const": "waku"}}, "required": ["transport"]},
        "then": {"required": ["waku_rest_urls"], "properties": {
            "waku_rest_urls": {"minItems": 1, "minLength": 1}}}})


def _role_rule(role: str, other: str) -> dict[str, Any]:
    return {"if": {"properties": {"role": {"const": role}}},
            "then": {"required": [role], "not": {"required": [other]}}}


class NodeFile(Schema):
    """A node file (``pqcnet node run --config``)."""

    role: Role
    """Which role this node runs."""
    relayer: Annotated[str, Field(min_length=1)] | RelayerConfig | SkipJsonSchema[None] = None
    """role relayer: the relayer config file, or its keys inline."""
    sentry: Annotated[str, Field(min_length=1)] | SentryFile | SkipJsonSchema[None] = None
    """role sentry: the sentry config file, or its keys inline."""
    control_plane: ControlPlaneSpec = ControlPlaneSpec()

    model_config = ConfigDict(json_schema_extra={"allOf": [
        _role_rule("relayer", "sentry"), _role_rule("sentry", "relayer")]})


@dataclass(frozen=True, slots=True)
class ControlPlaneConfig:
    """The validated ``control_plane`` section (``spec``) with what the loader adds:
    keys loaded, paths resolved, one URL turned into a list."""

    spec: ControlPlaneSpec
    waku_rest_urls: tuple[str, ...] = ()
    governance_keys: tuple[VerifyKey, ...] = ()
    #: other senders whose envelopes we verify, node id -> key (version 1)
    trust: Mapping[str, VerifyKey] = field(default_factory=dict)
    ca_dir: Path | None = None
    #: resolved ``state_dir``
    state_dir: Path = Path("mesh-state")
    #: governance signing keys this node holds (governance nodes only)
    governance_signing_keys: tuple[SigningKey, ...] = ()


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """A validated node file."""

    role: Role
    control_plane: ControlPlaneConfig
    relayer: RelayerConfig | None = None
    sentry: SentryConfig | None = None
    #: the sentry config file (for the attestation's config hash), when given as a path
    sentry_path: Path | None = None
    #: the node file itself (error messages)
    source: str = ""


def load_key(path: Path, at: str) -> VerifyKey:
    """An ML-DSA public key PEM (or a signing key PEM, whose public half is used)."""
    return load_verify_key(path, error=NodeConfigError, at=at, allow_private=True)


def _control_plane(cp: ControlPlaneSpec, base: Path, src: str) -> ControlPlaneConfig:
    urls = (cp.waku_rest_urls,) if isinstance(cp.waku_rest_urls, str) else tuple(
        cp.waku_rest_urls)
    if cp.transport == "waku" and not urls:
        raise NodeConfigError(where(src, "control_plane", "waku_rest_urls")
                              + ": required for transport waku")
    gov = cp.governance
    keys = tuple(load_key(base / p, where(src, "control_plane", "governance", "keys", i))
                 for i, p in enumerate(gov.keys))
    if gov.threshold > max(1, len(keys)):
        raise NodeConfigError(where(src, "control_plane", "governance", "threshold")
                              + f": must be 1..{max(1, len(keys))} (the number of keys), "
                              f"got {gov.threshold}")
    trust = {n: load_key(base / p, where(src, "control_plane", "trust", n))
             for n, p in cp.trust.items()}
    signing = tuple(_signing_key(base / p, where(src, "control_plane", "governance",
                                                 "signing_keys", i), keys)
                    for i, p in enumerate(gov.signing_keys))
    return ControlPlaneConfig(spec=cp, waku_rest_urls=urls, governance_keys=keys, trust=trust,
                              ca_dir=base / cp.ca_dir if cp.ca_dir else None,
                              state_dir=base / cp.state_dir, governance_signing_keys=signing)


def _signing_key(path: Path, at: str, governance: tuple[VerifyKey, ...]) -> SigningKey:
    """A governance signing key file; it must be one of the configured governance keys."""
    try:
        with path.open("rb") as fh:
            key = SigningKey.from_pem(fh.read(MAX_FILE_BYTES))
    except OSError as exc:
        raise NodeConfigError(f"{at}: cannot read key {path}: {exc.strerror}") from None
    except PqcnetError as exc:
        raise NodeConfigError(f"{at}: {path} is not an unencrypted ML-DSA key: {exc}") from None
    if key.public_key.key_id not in {k.key_id for k in governance}:
        raise NodeConfigError(f"{at}: {path} is not one of control_plane.governance.keys")
    return key


def _role_config(f: NodeFile, raw: Mapping[str, Any], base: Path, src: str) -> NodeConfig:
    role = f.role
    other = "sentry" if role == "relayer" else "relayer"
    if other in raw:
        raise NodeConfigError(where(src, other) + f": not allowed for role {role}")
    section = f.relayer if role == "relayer" else f.sentry
    if section is None:
        raise NodeConfigError(where(src, role) + f": required (a path to the {role} config, "
                              "or the mapping inline)")
    cp = _control_plane(f.control_plane, base, src)
    try:
        if isinstance(section, RelayerConfig):
            return NodeConfig(role, cp, relayer=RelayerConfig.from_mapping(
                raw[role], base=base, source=where(src, role)), source=src)
        if isinstance(section, SentryFile):
            return NodeConfig(role, cp, sentry=parse_config(raw[role], base,
                                                            name=where(src, role)), source=src)
        path = base / section
        if role == "relayer":
            return NodeConfig(role, cp, relayer=RelayerConfig.load(path), source=src)
        return NodeConfig(role, cp, sentry=load_config(path), sentry_path=path, source=src)
    except NodeConfigError:
        raise
    except PqcnetError as exc:  # the role's loader named its file (or our key) and the key
        raise NodeConfigError(str(exc)) from None


def parse_node_config(raw: Any, base: Path, *, source: str = "") -> NodeConfig:
    """Validate a loaded node mapping; relative paths resolve against ``base``."""
    f = validate(NodeFile, raw, NodeConfigError, source=source)
    return _role_config(f, raw, base, source)


def load_node_config(path: str | Path) -> NodeConfig:
    """Read and validate a node file."""
    p = Path(path)
    raw = read_yaml_file(p, NodeConfigError, what="node config", max_bytes=MAX_FILE_BYTES)
    return parse_node_config(raw, p.resolve().parent, source=str(p))


__all__ = ["MAX_FILE_BYTES", "MAX_KEYS", "ROLES", "ControlPlaneConfig", "ControlPlaneSpec",
           "GovernanceSpec", "NodeConfig", "NodeFile", "load_key", "load_node_config",
           "parse_node_config"]
