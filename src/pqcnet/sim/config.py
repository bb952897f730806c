"""Scenario files: typed, validated at load, one clear line on any mistake.

A scenario YAML maps onto :class:`Scenario` section by section; unknown keys, wrong
types and out-of-range values raise :class:`~pqcnet.sim.errors.ScenarioError` naming the
field (``network.latency.ms: must be >= 0``). CLI overrides (``--nodes``, ``--seed``,
``--set gossipsub.D=8``) go through the same checks. The reader is the project's
bounded YAML reader, so a scenario file cannot make the loader allocate without limit.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pqcnet._util.yamlfile import read_yaml_file
from pqcnet.sim.errors import ScenarioError

#: Largest scenario file read (they are a few hundred bytes; bounds a mistaken path).
MAX_SCENARIO_BYTES = 256 * 1024
#: Largest network simulated in one process (memory: ~50-100 KB per node with real keys).
MAX_NODES = 50_000

WORKLOADS = ("formation", "directive", "churn", "partition", "adversaries", "scale")
LATENCY_KINDS = ("constant", "uniform", "normal", "lognormal", "regions")


@dataclass(frozen=True)
class Latency:
    """One-way link latency. ``regions``: nodes are placed by ``weights`` and a link takes
    ``matrix_ms[region_a][region_b]``; other kinds draw one value per link."""

    kind: str = "constant"
    ms: float = 100.0
    low_ms: float = 50.0
    high_ms: float = 150.0
    mean_ms: float = 100.0
    sd_ms: float = 20.0
    median_ms: float = 100.0
    sigma: float = 0.5
    #: per-message jitter on top of the link's latency (normal, sd), clamped at 0
    jitter_ms: float = 0.0
    weights: dict[str, float] = field(default_factory=dict)
    matrix_ms: dict[str, dict[str, float]] = field(default_factory=dict)

    def check(self) -> None:
        _one_of("network.latency.kind", self.kind, LATENCY_KINDS)
        for name in ("ms", "low_ms", "high_ms", "mean_ms", "sd_ms", "median_ms", "sigma",
                     "jitter_ms"):
            _at_least(f"network.latency.{name}", getattr(self, name), 0)
        if self.kind == "uniform" and self.high_ms < self.low_ms:
            raise ScenarioError("network.latency: high_ms must be >= low_ms")
        if self.kind == "regions":
            if not self.weights or set(self.matrix_ms) != set(self.weights):
                raise ScenarioError("network.latency: regions need weights and a matrix_ms "
                                    "row for every region")
            for a, row in self.matrix_ms.items():
                if set(row) != set(self.weights):
                    raise ScenarioError(f"network.latency.matrix_ms.{a}: needs every region")


@dataclass(frozen=True)
class NetworkSpec:
    latency: Latency = field(default_factory=Latency)
    #: per-node uplink and downlink, Mbit/s (each message is serialized on both)
    bandwidth_mbps: float = 50.0
    #: probability a transmission is lost; over TCP (``tcp: true``) it is retransmitted
    #: after ``rto_ms`` instead of dropped
    loss: float = 0.0
    tcp: bool = True
    rto_ms: float = 200.0
    #: how long until peers notice a crashed node or a cut link (libp2p ping/keepalive)
    conn_timeout_s: float = 10.0

    def check(self) -> None:
        self.latency.check()
        _at_least("network.bandwidth_mbps", self.bandwidth_mbps, 0.001)
        if not 0 <= self.loss < 1:
            raise ScenarioError("network.loss: must be in [0, 1)")
        _at_least("network.rto_ms", self.rto_ms, 0)
        _at_least("network.conn_timeout_s", self.conn_timeout_s, 0)


@dataclass(frozen=True)
class GossipSubSpec:
    """GossipSub v1.1 parameters (names as in the spec); defaults are Waku's."""

    D: int = 6
    D_lo: int = 4
    D_hi: int = 12
    D_lazy: int = 6
    heartbeat_s: float = 1.0
    history_length: int = 5
    history_gossip: int = 3
    gossip_factor: float = 0.25
    seen_ttl_s: float = 120.0
    prune_backoff_s: float = 60.0
    flood_publish: bool = True
    #: IDs per IHAVE (v1.1 ``MaxIHaveLength``)
    max_ihave_length: int = 5000
    #: bounded peer table: connections a node keeps at most
    max_peers: int = 50
    #: connections a node aims for (dials more from the bootstrap list while below)
    target_peers: int = 12
    #: peers dialled at join from the bootstrap list
    bootstrap_peers: int = 8
    #: seen-cache entries kept at most (TTL expiry aside); bounds memory under floods
    max_seen: int = 100_000
    #: RPC framing overhead per message on the wire (protobuf RPC + topic), bytes
    rpc_overhead: int = 64
    #: bytes of one message id in IHAVE/IWANT (Waku: 32-byte hash)
    id_bytes: int = 32
    #: per-hop processing before a relay forwards and delivers (decode + validation, e.g.
    #: RLN proof checks in Waku); 0 = instantaneous relays
    validation_ms: float = 0.0

    def check(self) -> None:
        if not 0 < self.D_lo <= self.D <= self.D_hi:
            raise ScenarioError("gossipsub: need 0 < D_lo <= D <= D_hi")
        if not 0 < self.history_gossip <= self.history_length:
            raise ScenarioError("gossipsub: need 0 < history_gossip <= history_length")
        _at_least("gossipsub.heartbeat_s", self.heartbeat_s, 0.01)
        _at_least("gossipsub.max_peers", self.max_peers, self.D_hi)
        _at_least("gossipsub.target_peers", self.target_peers, self.D)
        _at_least("gossipsub.bootstrap_peers", self.bootstrap_peers, 1)
        _at_least("gossipsub.max_seen", self.max_seen, 1)
        _at_least("gossipsub.max_ihave_length", self.max_ihave_length, 1)
        _at_least("gossipsub.validation_ms", self.validation_ms, 0)


@dataclass(frozen=True)
class Roles:
    """How many nodes play each role; the rest are sentries."""

    relayers: int = 10
    governance: int = 1
    #: ledger holders that DAG-sync (validators)
    validators: int = 0
    publishers: int = 0
    subscribers: int = 0

    def check(self) -> None:
        for name in ("relayers", "validators", "publishers", "subscribers"):
            _at_least(f"roles.{name}", getattr(self, name), 0)
        _at_least("roles.governance", self.governance, 1)


@dataclass(frozen=True)
class AgentSpec:
    """How the real ``ControlPlaneAgent`` of each node is driven."""

    #: ``topic``: announcements on the announce topic (what the agent does: every node
    #: hears every node); ``peers``: sent to GossipSub-connected peers only (a partial
    #: view); ``none``: no announcements
    announce: str = "none"
    announce_interval_s: float = 300.0
    #: routes advertised by each relayer (its shards) at join, and re-advertised
    route_interval_s: float = 0.0
    dag_sync_interval_s: float = 0.0
    #: agent housekeeping (tick) period for nodes that tick
    tick_s: float = 5.0

    def check(self) -> None:
        _one_of("agent.announce", self.announce, ("topic", "peers", "none"))
        _at_least("agent.announce_interval_s", self.announce_interval_s, 1)
        _at_least("agent.tick_s", self.tick_s, 0.1)
        _at_least("agent.route_interval_s", self.route_interval_s, 0)
        _at_least("agent.dag_sync_interval_s", self.dag_sync_interval_s, 0)


@dataclass(frozen=True)
class ChurnSpec:
    #: fraction of nodes that go down per simulated hour
    rate_per_hour: float = 0.0
    #: of those, the share that crash (the rest leave gracefully)
    crash_share: float = 0.5
    min_down_s: float = 30.0
    max_down_s: float = 600.0
    #: churn stops this long before the end so DTN replay can finish
    settle_s: float = 120.0
    #: roles exempt from churn (governance keeps issuing, relayers keep relaying)
    exempt: tuple[str, ...] = ("governance", "relayer")

    def check(self) -> None:
        if not 0 <= self.rate_per_hour <= 10:
            raise ScenarioError("churn.rate_per_hour: must be in [0, 10]")
        if not 0 <= self.crash_share <= 1:
            raise ScenarioError("churn.crash_share: must be in [0, 1]")
        if not 0 < self.min_down_s <= self.max_down_s:
            raise ScenarioError("churn: need 0 < min_down_s <= max_down_s")
        _at_least("churn.settle_s", self.settle_s, 0)


@dataclass(frozen=True)
class PartitionSpec:
    at_s: float = 0.0
    heal_s: float = 0.0
    #: share of nodes on the minority side
    fraction: float = 0.5

    def check(self) -> None:
        if self.heal_s and self.heal_s <= self.at_s:
            raise ScenarioError("partition.heal_s: must be after at_s")
        if not 0 < self.fraction < 1:
            raise ScenarioError("partition.fraction: must be in (0, 1)")


@dataclass(frozen=True)
class AdversarySpec:
    forgers: int = 0
    replayers: int = 0
    equivocators: int = 0
    over_reporters: int = 0
    #: how much an over-reporting relayer inflates its claimed bytes
    over_report_factor: float = 1.5

    def check(self) -> None:
        for name in ("forgers", "replayers", "equivocators", "over_reporters"):
            _at_least(f"adversaries.{name}", getattr(self, name), 0)
        _at_least("adversaries.over_report_factor", self.over_report_factor, 1.0)


@dataclass(frozen=True)
class Workload:
    kind: str = "scale"
    #: when the workload starts (mesh warm-up before it)
    start_s: float = 30.0
    #: nodes join over this window at the start (0: all at t=0)
    join_window_s: float = 0.0
    #: relay-layer messages published per simulated second (network-wide)
    msg_rate: float = 0.0
    msg_bytes: int = 10_000
    #: stop publishing this long before the end (so the last messages can arrive)
    drain_s: float = 30.0
    #: data-plane frames per publisher per second (relayer traffic)
    frame_rate: float = 0.0
    frame_bytes: int = 1024
    #: governance directive times (seconds): a rate-limit update, then a slash
    rate_limit_at_s: float = 60.0
    slash_at_s: float = 120.0
    #: validators append one ledger record this often
    ledger_append_s: float = 10.0
    #: relayer volume epochs (proofs + client acks), seconds
    epoch_s: float = 60.0

    def check(self) -> None:
        _one_of("workload.kind", self.kind, WORKLOADS)
        for name in ("start_s", "join_window_s", "msg_rate", "drain_s", "frame_rate",
                     "rate_limit_at_s", "slash_at_s"):
            _at_least(f"workload.{name}", getattr(self, name), 0)
        _at_least("workload.msg_bytes", self.msg_bytes, 1)
        _at_least("workload.frame_bytes", self.frame_bytes, 1)
        _at_least("workload.ledger_append_s", self.ledger_append_s, 0.1)
        _at_least("workload.epoch_s", self.epoch_s, 1)


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str = ""
    nodes: int = 100
    duration_s: float = 120.0
    seed: int = 1
    #: verify-once cache for ML-DSA verification (same digest, same key → one verify)
    verify_cache: bool = True
    network: NetworkSpec = field(default_factory=NetworkSpec)
    gossipsub: GossipSubSpec = field(default_factory=GossipSubSpec)
    roles: Roles = field(default_factory=Roles)
    agent: AgentSpec = field(default_factory=AgentSpec)
    workload: Workload = field(default_factory=Workload)
    churn: ChurnSpec = field(default_factory=ChurnSpec)
    partition: PartitionSpec = field(default_factory=PartitionSpec)
    adversaries: AdversarySpec = field(default_factory=AdversarySpec)
    #: per-message records written at most (the summary always covers all)
    max_records: int = 200_000

    def check(self) -> None:
        if not 2 <= self.nodes <= MAX_NODES:
            raise ScenarioError(f"nodes: must be in [2, {MAX_NODES}]")
        _at_least("duration_s", self.duration_s, 1)
        for part in (self.network, self.gossipsub, self.roles, self.agent, self.workload,
                     self.churn, self.partition, self.adversaries):
            part.check()
        r, a = self.roles, self.adversaries
        special = (r.relayers + r.governance + r.validators + r.publishers + r.subscribers
                   + a.forgers + a.replayers)
        if special > self.nodes:
            raise ScenarioError(f"roles and adversaries need {special} nodes; have {self.nodes}")
        if a.equivocators > r.validators:
            raise ScenarioError("adversaries.equivocators: must be <= roles.validators")
        if a.over_reporters > r.relayers:
            raise ScenarioError("adversaries.over_reporters: must be <= roles.relayers")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_T = TypeVar("_T")


def _at_least(name: str, value: float, low: float) -> None:
    if value < low:
        raise ScenarioError(f"{name}: must be >= {low}, got {value}")


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ScenarioError(f"{name}: must be one of {', '.join(allowed)}; got {value!r}")


def _coerce(path: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ScenarioError(f"{path}: must be a mapping")
        return _build(tp, value, path)  # type: ignore[arg-type]
    if tp is bool:
        if not isinstance(value, bool):
            raise ScenarioError(f"{path}: must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ScenarioError(f"{path}: must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ScenarioError(f"{path}: must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ScenarioError(f"{path}: must be a string")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ScenarioError(f"{path}: must be a list of strings")
        return tuple(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ScenarioError(f"{path}: must be a mapping")
        _, vt = typing.get_args(tp)
        return {str(k): _coerce(f"{path}.{k}", vt, v) for k, v in value.items()}
    if isinstance(tp, types.UnionType):  # pragma: no cover - no unions in the schema
        raise ScenarioError(f"{path}: unsupported type")
    raise ScenarioError(f"{path}: unsupported type {tp!r}")


def _build(cls: type[_T], data: dict[str, Any], prefix: str = "") -> _T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ScenarioError(f"unknown key {where}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(f"{prefix}.{k}" if prefix else k, hints[k], v) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ScenarioError(f"{prefix or 'scenario'}: {exc}") from None


def from_dict(data: dict[str, Any]) -> Scenario:
    """Build and check a :class:`Scenario` from parsed YAML."""
    if not isinstance(data, dict) or "name" not in data:
        raise ScenarioError("scenario must be a mapping with at least a name")
    scenario = _build(Scenario, data)
    scenario.check()
    return scenario


def load(path: str | Path) -> Scenario:
    """Read and validate a scenario YAML file."""
    data = read_yaml_file(Path(path), ScenarioError, what="scenario",
                          max_bytes=MAX_SCENARIO_BYTES)
    return from_dict(data)


def override(scenario: Scenario, assignments: dict[str, Any]) -> Scenario:
    """``{"nodes": 1000, "gossipsub.D": 8}`` applied and re-checked."""
    data = scenario.to_dict()
    for dotted, value in assignments.items():
        node = data
        *parents, last = dotted.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                raise ScenarioError(f"unknown key {dotted}")
            node = node[p]
        if last not in node:
            raise ScenarioError(f"unknown key {dotted}")
        node[last] = value
    for key in ("exempt",):  # asdict turns tuples into lists; the schema accepts both
        data["churn"][key] = list(data["churn"][key])
    return from_dict(data)
