"""Typed, validated relayer configuration (one YAML file, same keys as the Helm values).

Cores never read files or the environment: :meth:`RelayerConfig.load` does, once,
and rejects unknown keys and out-of-range values with a :class:`ConfigError` that
names the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from pqcnet._util.yamlfile import read_yaml_file
from pqcnet.relayer.backpressure import HIGH_WATER, LOW_WATER
from pqcnet.relayer.errors import ConfigError
from pqcnet.relayer.frame import MAX_ID, MAX_PAYLOAD
from pqcnet.relayer.overflow import MAX_OVERFLOW_RECORDS
from pqcnet.relayer.sequencer import GAP_TIMEOUT, MAX_REORDER, MAX_TOPICS

Backend = Literal["embedded", "redis", "kafka"]


@dataclass(frozen=True)
class RelayerConfig:
    """Everything a relayer node needs to start."""

    node_id: str = "relayer-1"
    #: QSTP ingress (publishers and subscribers)
    listen_host: str = "127.0.0.1"
    listen_port: int = 7400
    #: directory written by ``NodeIdentity.save`` (key, chain, trust bundle, CRL)
    identity_dir: str = ""
    #: environment variable holding the identity key passphrase (empty: unencrypted)
    identity_passphrase_env: str = ""
    #: node-local state: embedded bus, dedup marks, overflow queue, ledger
    data_dir: str = "relayer-data"
    backend: Backend = "embedded"
    shards: int = 32
    #: shards this node works on (empty: all)
    owned_shards: tuple[int, ...] = ()
    group: str = "relayer"
    redis_url: str = ""
    redis_prefix: str = "pqcnet:relayer"
    kafka_bootstrap: str = ""
    kafka_topic: str = "pqcnet.relayer"
    #: seconds between Kafka offset commits (0: commit on every ack)
    kafka_commit_interval: float = 0.2
    #: let the Kafka group protocol split shards among relayers (owned_shards must be empty)
    kafka_rebalance: bool = False
    #: fsync RocksDB writes (power-loss safety; process crashes are safe without it)
    sync: bool = False
    high_water: int = HIGH_WATER
    low_water: int = LOW_WATER
    retry_after: float = 1.0
    backpressure_interval: float = 0.5
    publish_timeout: float = 2.0
    overflow_max_records: int = MAX_OVERFLOW_RECORDS
    max_payload: int = MAX_PAYLOAD
    max_id: int = MAX_ID
    batch: int = 512
    gap_timeout: float = GAP_TIMEOUT
    max_reorder: int = MAX_REORDER
    #: per shard worker: topics whose dedup marks stay in memory (LRU; misses read the store)
    max_topics: int = MAX_TOPICS
    epoch_seconds: float = 60.0
    #: proven epochs kept (proof files, persisted volume, in-memory meter); older ones are
    #: pruned once anchored — the QS-DAG vertex is then the record of them
    keep_epochs: int = 1024
    #: Prometheus /metrics on 127.0.0.1 (None: off, 0: any free port)
    metrics_port: int | None = None
    #: governance gRPC (None: off, 0: any free port)
    grpc_host: str = "127.0.0.1"
    grpc_port: int | None = None
    grpc_tls_cert: str = ""
    grpc_tls_key: str = ""
    #: QS-DAG ledger directory (default: <data_dir>/ledger)
    ledger_dir: str = ""
    #: create a dev genesis with this node as authority when the ledger has none
    ledger_dev_genesis: bool = True

    def __post_init__(self) -> None:
        if self.backend not in ("embedded", "redis", "kafka"):
            raise ConfigError(f"backend: {self.backend!r} is not embedded, redis or kafka")
        if not 1 <= self.shards <= 4096:
            raise ConfigError("shards: must be 1..4096")
        if any(not 0 <= s < self.shards for s in self.owned_shards):
            raise ConfigError("owned_shards: every shard must be in 0..shards-1")
        if self.backend == "redis" and not self.redis_url:
            raise ConfigError("redis_url: required for backend redis")
        if self.backend == "kafka" and not self.kafka_bootstrap:
            raise ConfigError("kafka_bootstrap: required for backend kafka")
        if self.kafka_rebalance and self.owned_shards:
            raise ConfigError("kafka_rebalance: the group assigns shards; leave owned_shards empty")
        if not 0 <= self.low_water < self.high_water:
            raise ConfigError("low_water/high_water: need 0 <= low_water < high_water")
        for name in ("retry_after", "backpressure_interval", "publish_timeout", "epoch_seconds",
                     "gap_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be > 0")
        for name in ("overflow_max_records", "max_payload", "max_id", "batch", "max_reorder",
                     "max_topics", "keep_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1")
        if bool(self.grpc_tls_cert) != bool(self.grpc_tls_key):
            raise ConfigError("grpc_tls_cert/grpc_tls_key: give both or neither")

    @property
    def shards_owned(self) -> list[int]:
        """Owned shards, defaulting to all."""
        return list(self.owned_shards) or list(range(self.shards))

    @classmethod
    def from_mapping(cls, data: dict[str, Any], *, base: Path | None = None) -> RelayerConfig:
        """Build from a mapping (YAML); relative paths resolve against ``base``."""
        if not isinstance(data, dict):
            raise ConfigError("relayer config must be a mapping")
        data = dict(data.get("relayer", data))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        if "owned_shards" in data:
            data["owned_shards"] = tuple(data["owned_shards"] or ())
        if base is not None:
            for key in ("identity_dir", "data_dir", "ledger_dir", "grpc_tls_cert",
                        "grpc_tls_key"):
                if data.get(key) and not Path(data[key]).is_absolute():
                    data[key] = str(base / data[key])
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"bad relayer config: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> RelayerConfig:
        """Read and validate a YAML file."""
        p = Path(path)
        data = read_yaml_file(p, ConfigError)
        return cls.from_mapping(data or {}, base=p.parent.resolve())

    def replace(self, **changes: Any) -> RelayerConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)
