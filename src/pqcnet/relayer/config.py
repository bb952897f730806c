"""Typed, validated relayer configuration (one YAML file, same keys as the Helm values).

:class:`RelayerConfig` is at once the object the relayer's parts read and the schema
of its config file (a pydantic model on :class:`pqcnet._util.schema.Schema`): its
flat fields are exactly the keys under ``relayer:``, so there is nothing to convert
and nothing to keep in sync. It is validated whenever it is built: from a file by
:meth:`RelayerConfig.load` or a mapping by :meth:`from_mapping` (every mistake is one
:class:`ConfigError` line naming the key, ``relayer.yaml: relayer.shards: must be less
than or equal to 4096, got 5000``), or in code as ``RelayerConfig(shards=4, ...)``
(a mistake in code is pydantic's ``ValidationError``). Cores never read files or the
environment: ``load`` does, once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationError, model_validator

from pqcnet._util.schema import (
    Count,
    HostPorts,
    Port,
    Positive,
    Schema,
    format_error,
    validate,
    where,
)
from pqcnet._util.yamlfile import read_yaml_file
from pqcnet.identity.errors import IdentityError
from pqcnet.identity.policy import SpiffeLayoutSpec, compile_layouts
from pqcnet.qstp.aio.server import DEFAULT_MAX_TUNNELS
from pqcnet.qstp.config import INITIAL_WINDOW
from pqcnet.relayer.authz import AuthzSpec, QuotasSpec
from pqcnet.relayer.backpressure import HIGH_WATER, LOW_WATER
from pqcnet.relayer.counters import TOLERANCE_FRAMES, TOLERANCE_RATIO
from pqcnet.relayer.egress import ACK_TIMEOUT
from pqcnet.relayer.errors import ConfigError
from pqcnet.relayer.frame import MAX_ID, MAX_PAYLOAD
from pqcnet.relayer.metering import MAX_LABEL_SERIES
from pqcnet.relayer.overflow import MAX_OVERFLOW_RECORDS
from pqcnet.relayer.sequencer import GAP_TIMEOUT, MAX_REORDER, MAX_TOPICS
from pqcnet.relayer.wire import MAX_PAYLOAD_LIMIT

Backend = Literal["embedded", "redis", "kafka"]
#: most shards a relayer mesh is split into (a shard costs a worker task and a bus stream)
MAX_SHARDS = 4096
#: keys holding paths, resolved against the config file's directory when relative
PATH_KEYS = ("identity_dir", "data_dir", "ledger_dir", "grpc_tls_cert", "grpc_tls_key",
             "ledger_anchors")
REDIS_URL_PATTERN = r"^((rediss?|unix)://\S+)?$"


class RelayerConfig(Schema):
    """Everything a relayer node needs to start."""

    node_id: str = Field(default="relayer-1", min_length=1)
    """Node id (proof signer name, Redis consumer, Kafka client id)."""
    listen_host: str = "127.0.0.1"
    """QSTP ingress address (publishers and subscribers)."""
    listen_port: Port = 7400
    """QSTP ingress port (0: any free port)."""
    max_tunnels: Count = DEFAULT_MAX_TUNNELS
    """QSTP tunnels (publishers and subscribers) served at once; one more is refused
    when it connects."""
    tunnel_buffer_bytes: int = Field(default=8 * 1024 * 1024, ge=INITIAL_WINDOW,
                                     le=2**31 - 1)
    """Most bytes one tunnel may make the relayer buffer: the QSTP connection window it
    grants (a stream's is the smaller of this and 4 MiB). ``max_tunnels`` times this
    bounds what slow tunnels can pile up (defaults: 1024 x 8 MiB = 8 GiB worst case);
    ``tunnel_buffer_total_bytes`` caps their sum."""
    tunnel_buffer_total_bytes: int = Field(default=1024**3, ge=0, le=2**40)
    """Most bytes all tunnels together may make the relayer buffer beyond 64 KiB each:
    a tunnel takes its window beyond 64 KiB from this budget when it opens and gives it
    back when it closes; one that opens while it is spent starts with 64 KiB and grows
    as it frees. Under ``--workers N`` each worker gets ``1/N`` of it (the kernel
    spreads tunnels evenly), so it bounds the host."""
    identity_dir: str = ""
    """Directory written by ``NodeIdentity.save`` (key, chain, trust bundle, CRL)."""
    identity_passphrase_env: str = ""
    """Environment variable holding the identity key passphrase (empty: unencrypted)."""
    data_dir: str = "relayer-data"
    """Node-local state: embedded bus, dedup marks, overflow queue, ledger."""
    backend: Backend = "embedded"
    """Message bus: embedded (RocksDB log), redis (Streams) or kafka."""
    shards: int = Field(default=32, ge=1, le=MAX_SHARDS)
    """Bus partitions."""
    owned_shards: tuple[int, ...] = Field(default=(), strict=False)
    """Shards this node works on (empty: all)."""
    group: str = "relayer"
    """Consumer group of the shard workers."""
    redis_url: str = Field(default="", pattern=REDIS_URL_PATTERN)
    """redis:// URL (backend redis; with backend kafka, optional: the store of dedup marks
    and metered volume, shared by a cluster so marks move with a partition)."""
    redis_prefix: str = "pqcnet:relayer"
    """Key prefix of the relayer's Redis streams and marks."""
    redis_lease: float = Field(default=3.0, ge=0.5, le=300.0)
    """Backend redis without owned_shards (a cluster): seconds a relayer's shard lease
    lasts without renewal (renewed every lease/3 s); a dead relayer's shards are taken
    over this long after its last renewal. node_id must be unique in the cluster."""
    redis_max_len: int = Field(default=1_000_000, ge=1, le=100_000_000)
    """Backend redis: entries a shard stream may hold before acknowledged ones are
    trimmed (the replay window; never trimmed past an unacknowledged entry). Redis
    memory is about shards x this x (entry size + ~50 B)."""
    kafka_bootstrap: HostPorts = ""
    """Kafka bootstrap servers, host:port[,host:port...] (backend kafka)."""
    kafka_topic: str = "pqcnet.relayer"
    """Kafka topic; one partition per shard."""
    kafka_commit_interval: float = Field(default=0.2, ge=0)
    """Seconds between Kafka offset commits (0: commit on every ack)."""
    kafka_rebalance: bool = True
    """Let the Kafka group protocol split shards among the relayers of ``group`` (off
    when owned_shards is given)."""
    kafka_session_timeout: float = Field(default=6.0, ge=1.0, le=300.0)
    """Seconds without heartbeats before the Kafka group gives a dead relayer's
    partitions to the others (must be >= the broker's group.min.session.timeout.ms;
    the project's broker allows 1 s)."""
    kafka_static_membership: bool = False
    """Kafka static group membership (group.instance.id = node_id, unique per group): a
    relayer restarted under the same node_id gets its partitions back without a
    rebalance; a clean stop does not leave the group either, so its partitions move
    only after kafka_session_timeout."""
    sync: bool = False
    """fsync RocksDB writes (power-loss safety; process crashes are safe without it)."""
    high_water: int = Field(default=HIGH_WATER, ge=1)
    """Backlog (records) per shard that sends FLOW PAUSE."""
    low_water: int = Field(default=LOW_WATER, ge=0)
    """Backlog below which a paused shard gets FLOW RESUME."""
    retry_after: Positive = 1.0
    """Seconds publishers are told to wait when refused for backpressure."""
    backpressure_interval: Positive = 0.5
    """Seconds between backlog samples."""
    publish_timeout: Positive = 2.0
    """Seconds a bus publish may take before the frames go to the overflow queue."""
    overflow_max_records: Count = MAX_OVERFLOW_RECORDS
    """Bound of the local overflow queue (records)."""
    max_payload: int = Field(default=MAX_PAYLOAD, ge=1, le=MAX_PAYLOAD_LIMIT)
    """Largest frame payload accepted (bytes)."""
    max_id: Count = MAX_ID
    """Longest customer / channel id accepted (bytes)."""
    batch: Count = 512
    """Records a shard worker reads per bus call."""
    gap_timeout: Positive = GAP_TIMEOUT
    """Seconds a sequence gap is waited for before it is reported and skipped."""
    idle_poll_timeout: float = Field(default=2.0, ge=0, le=60)
    """Longest wait of a quiet shard worker's bus read, in seconds: each empty read
    doubles the wait from 0.2 s up to this (0: stay at 0.2 s). New records end a wait at
    once; on Redis every wait is a read and a script, so an idle relayer's command rate
    falls with it."""
    subscriber_ack_timeout: float = Field(default=ACK_TIMEOUT, gt=0, le=3600)
    """Seconds a subscriber may leave a delivered batch unacknowledged before it is
    evicted (its stream reset; the batch goes to the subscribers left). Its shard's
    delivery waits for the ack meanwhile, other customers' topics included."""
    park_max_records: int = Field(default=HIGH_WATER, ge=0, le=10_000_000)
    """Per shard: records a worker may consume past the first frame of a topic with no
    subscriber (parked; the shard's other topics keep flowing) before the shard holds
    for it instead. The bus keeps those records unacknowledged (it cannot trim them).
    0: no parking (a topic with no subscriber holds its shard at once)."""
    max_reorder: Count = MAX_REORDER
    """Out-of-order frames held per topic while waiting for a gap."""
    max_topics: Count = MAX_TOPICS
    """Per shard worker: topics whose dedup marks stay in memory (LRU; misses read the
    store)."""
    epoch_seconds: Positive = 60.0
    """Length of a metering epoch."""
    keep_epochs: Count = 1024
    """Proven epochs kept (proof files, persisted volume, in-memory meter); older ones
    are pruned once anchored — the QS-DAG vertex is then the record of them."""
    counter_tolerance_ratio: float = Field(default=TOLERANCE_RATIO, ge=0.0, le=1.0)
    """How far a volume claim may exceed the clients' signed ack counters (ratio) ..."""
    counter_tolerance_frames: Count = TOLERANCE_FRAMES
    """... plus this many frames, before it is an over-claim (decision 0014)."""
    metrics_port: Port | None = None
    """Operations HTTP: Prometheus /metrics, /healthz, /readyz (null: off, 0: any free
    port)."""
    metrics_host: str = "127.0.0.1"
    """Address of the operations HTTP port (``0.0.0.0`` in a container, for the scraper
    and the orchestrator's probes)."""
    metrics_max_label_series: Count = MAX_LABEL_SERIES
    """(customer, channel) pairs with their own volume series; later ones share the
    ``other`` series until pruned epochs free a slot."""
    grpc_host: str = "127.0.0.1"
    """Governance gRPC address (plaintext only on loopback)."""
    grpc_port: Port | None = None
    """Governance gRPC port (null: off, 0: any free port)."""
    grpc_tls_cert: str = ""
    """Classical TLS certificate (PEM) of the governance gRPC service."""
    grpc_tls_key: str = ""
    """Its private key (PEM)."""
    governance_qstp_port: Port | None = None
    """Post-quantum face of the governance gRPC (VolumeMetrics + Ledger): a QSTP listener
    on listen_host that forwards each stream to grpc_port (null: off, 0: any free port).
    Needs grpc_port on loopback without classical TLS."""
    governance_allowed_peers: list[str] = Field(default_factory=list)
    """SPIFFE IDs or globs allowed on governance_qstp_port (empty: any identity of the
    trust domain)."""
    ledger_anchors: str = ""
    """Layer-0 JSONL anchor sink of this node's ledger, for Ledger.GetAnchor (optional)."""
    ledger_dir: str = ""
    """QS-DAG ledger directory (default: <data_dir>/ledger)."""
    ledger_dev_genesis: bool = True
    """Create a dev genesis with this node as authority when the ledger has none."""
    authz: AuthzSpec = Field(default_factory=AuthzSpec)
    """Data-plane authorization: which SPIFFE identities may publish to / subscribe from
    which customers' channels (default: a tenant is its own customer, nothing else)."""
    quotas: QuotasSpec = Field(default_factory=QuotasSpec)
    """Per-customer quotas at this relayer (frames/s, bytes/s; 0: unlimited)."""
    quota_scope: Literal["host", "cluster"] = "host"
    """Whom a customer's quota bounds: this host (each relayer of a cluster admits the
    whole plan) or the cluster (shared buckets in the cluster's Redis: backend redis,
    or redis_url with kafka). Restart to change."""
    spiffe_layouts: list[SpiffeLayoutSpec] = Field(default_factory=list)
    """How tenant/role/node are read from peers' SPIFFE IDs of other shapes than
    ``tenant/role/node`` (first fitting template wins; unread IDs have no tenant)."""

    model_config = ConfigDict(json_schema_extra={"allOf": [
        {"if": {"properties": {"backend": {"const": "redis"}}, "required": ["backend"]},
         "then": {"required": ["redis_url"], "properties": {"redis_url": {"minLength": 1}}}},
        {"if": {"properties": {"backend": {"const": "kafka"}}, "required": ["backend"]},
         "then": {"required": ["kafka_bootstrap"],
                  "properties": {"kafka_bootstrap": {"minLength": 1}}}},
    ]})

    @model_validator(mode="after")
    def _cross_checks(self) -> RelayerConfig:
        """Rules between keys (the JSON Schema states the backend ones as if/then)."""
        if any(not 0 <= s < self.shards for s in self.owned_shards):
            raise ValueError("owned_shards: every shard must be in 0..shards-1")
        if self.backend == "redis" and not self.redis_url:
            raise ValueError("redis_url: required for backend redis")
        if self.backend == "kafka" and not self.kafka_bootstrap:
            raise ValueError("kafka_bootstrap: required for backend kafka")
        if self.quota_scope == "cluster" and not self.redis_url:
            raise ValueError("quota_scope: cluster keeps the quotas in the cluster's Redis; "
                             "set redis_url (backend redis, or kafka with shared marks)")
        if (self.kafka_rebalance and self.owned_shards
                and "kafka_rebalance" in self.model_fields_set):
            raise ValueError("kafka_rebalance: the group assigns shards; leave owned_shards "
                             "empty")
        if not self.low_water < self.high_water:
            raise ValueError("low_water/high_water: need 0 <= low_water < high_water")
        if bool(self.grpc_tls_cert) != bool(self.grpc_tls_key):
            raise ValueError("grpc_tls_cert/grpc_tls_key: give both or neither")
        if self.governance_qstp_port is not None and (self.grpc_port is None
                                                      or self.grpc_tls_cert):
            raise ValueError("governance_qstp_port: needs grpc_port (loopback plaintext, "
                             "no grpc_tls_cert) to forward to")
        try:
            compile_layouts(self.spiffe_layouts)
        except IdentityError as exc:
            raise ValueError(str(exc)) from None
        return self

    @property
    def rebalancing(self) -> bool:
        """The Kafka group assigns this node's shards (default unless owned_shards)."""
        return self.backend == "kafka" and self.kafka_rebalance and not self.owned_shards

    @property
    def redis_leases(self) -> bool:
        """Shards come from leases in Redis (backend redis, no owned_shards)."""
        return self.backend == "redis" and not self.owned_shards

    @property
    def shards_owned(self) -> list[int]:
        """Owned shards, defaulting to all."""
        return list(self.owned_shards) or list(range(self.shards))

    @classmethod
    def from_mapping(cls, data: Any, *, base: Path | None = None,
                     source: str = "") -> RelayerConfig:
        """Build from a YAML mapping — ``{relayer: {...}}`` or the keys alone; relative
        paths resolve against ``base``; errors name ``source`` and the key."""
        if isinstance(data, dict) and "relayer" in data:
            cfg = validate(RelayerFile, data, ConfigError, source=source).relayer
        else:
            cfg = validate(cls, data, ConfigError, source=source)
        if base is None:
            return cfg
        changes = {k: str(base / getattr(cfg, k)) for k in PATH_KEYS
                   if k in cfg.model_fields_set and getattr(cfg, k)
                   and not Path(getattr(cfg, k)).is_absolute()}
        return cfg.replace(**changes) if changes else cfg

    @classmethod
    def load(cls, path: str | Path) -> RelayerConfig:
        """Read and validate a YAML file."""
        p = Path(path)
        data = read_yaml_file(p, ConfigError)
        return cls.from_mapping({} if data is None else data, base=p.parent.resolve(),
                                source=str(p))

    def require_identity(self, name: str = "") -> str:
        """The identity directory ``relayer run`` needs (what a check and a run agree on);
        ``name`` is the file (error messages)."""
        if not self.identity_dir:
            raise ConfigError(where(name, "relayer", "identity_dir")
                              + ": required to run a relayer")
        return self.identity_dir

    def summary(self) -> dict[str, Any]:
        """What a check prints."""
        return {"node": self.node_id, "listen": f"{self.listen_host}:{self.listen_port}",
                "backend": self.backend, "shards": self.shards,
                "owned_shards": list(self.owned_shards) or "all",
                "metrics_port": self.metrics_port, "grpc_port": self.grpc_port}

    @classmethod
    def check_file(cls, path: Path) -> dict[str, Any]:
        """Validate ``path`` as ``relayer run`` would; return its :meth:`summary`."""
        cfg = cls.load(path)
        cfg.require_identity(str(path))
        return cfg.summary()

    def replace(self, **changes: Any) -> RelayerConfig:
        """A copy with ``changes`` applied (validated again; :class:`ConfigError`)."""
        data = {**self.model_dump(exclude_unset=True, by_alias=True), **changes}
        try:
            return type(self).model_validate(data)
        except ValidationError as exc:
            raise ConfigError(format_error(exc, data)) from None


class RelayerFile(Schema):
    """A relayer config file: the relayer's keys under ``relayer:``."""

    relayer: RelayerConfig = Field(default_factory=RelayerConfig)
    """The relayer's configuration."""


__all__ = ["MAX_SHARDS", "PATH_KEYS", "Backend", "RelayerConfig", "RelayerFile"]
