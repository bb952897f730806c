"""The agent's configuration, shared by the agent and the parts it composes.

It lives apart from :mod:`pqcnet.mesh.agent` so that the parts
(:class:`~pqcnet.mesh.gossip.Gossip`, :class:`~pqcnet.mesh.dagsync.DagSync`) can be
handed the same typed, validated object without importing the agent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pqcnet.mesh.envelope import VerifierConfig
from pqcnet.mesh.errors import ConfigError
from pqcnet.mesh.messages import Endpoint


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Behaviour and bounds of one agent."""

    role: str = "node"
    #: separates meshes sharing one Waku network (content topic prefix)
    namespace: str = ""
    capabilities: tuple[str, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()
    software_hash: bytes = b""
    staking_address: str = ""
    announce_interval_ms: int = 10_000
    #: a peer silent this long (or 3 announce intervals) is not live
    peer_expiry_ms: int = 30_000
    #: how often the housekeeping loop runs
    tick_ms: int = 500
    #: live peers each gossip hop is forwarded to
    gossip_fanout: int = 3
    #: forwarding hops a new gossip item gets
    gossip_hops: int = 2
    #: default gossip / bundle lifetime
    gossip_ttl_ms: int = 3_600_000
    #: how often tips are published (0 = only on demand)
    dag_sync_interval_ms: int = 2_000
    #: vertices per DAG_VERTICES message (keeps messages under the Waku size limit)
    dag_chunk: int = 8
    #: whose tips start a pull: None = any sender; a tuple = only these node ids (the
    #: validators); () = nobody (anchor-only: the node keeps its ledger for
    #: anchor-before-effect and pulls from no one). Without a bound every sentry would
    #: pull every diverged ledger it hears of (simulations/README.md, finding 7).
    dag_pull_from: tuple[str, ...] | None = None
    #: directive ids remembered to apply each directive once
    max_applied_directives: int = 10_000
    #: slashing proposals kept for governance review
    max_proposals: int = 1_000
    #: while announcing keeps failing (node offline), log it at most this often
    failure_log_interval_ms: int = 60_000
    verifier: VerifierConfig = field(default_factory=VerifierConfig)

    def __post_init__(self) -> None:
        if self.announce_interval_ms <= 0 or self.tick_ms <= 0 or self.dag_chunk < 1:
            raise ConfigError("announce interval, tick and dag_chunk must be positive")
        if self.gossip_fanout < 1 or self.gossip_hops < 0:
            raise ConfigError("gossip fan-out must be >= 1 and hops >= 0")
