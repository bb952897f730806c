"""Prometheus metrics of the control plane (role ``mesh``), defined once per process.

Instances also keep their own plain counters (``.drops`` and friends) so tests and
CLI output can read exact numbers without scraping the global registry.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

DROPPED = Counter(
    "pqcnet_mesh_dropped_messages_total",
    "Control messages received and dropped, by reason.",
    ["reason"],
)
ACCEPTED = Counter(
    "pqcnet_mesh_accepted_messages_total",
    "Control messages received, verified and accepted, by type.",
    ["type"],
)
PUBLISHED = Counter(
    "pqcnet_mesh_published_messages_total",
    "Control messages signed and published, by type.",
    ["type"],
)
ENVELOPE_JOBS = Counter(
    "pqcnet_mesh_envelope_jobs_total",
    "Envelopes signed (and sealed) for publishing, by where the work ran: pool (a "
    "crypto thread, off the event loop) or loop (inline, stalling it meanwhile).",
    ["where"],
)
WAKU_ERRORS = Counter(
    "pqcnet_mesh_waku_errors_total",
    "Failed Waku REST calls (after retries), by operation.",
    ["op"],
)
WAKU_FAILOVERS = Counter(
    "pqcnet_mesh_waku_failovers_total",
    "Times the active Waku node (publishes, the first subscription leg) moved to another "
    "of waku_rest_urls because it failed.",
)
WAKU_LEG_MOVES = Counter(
    "pqcnet_mesh_waku_leg_moves_total",
    "Subscription legs re-placed on another Waku node after theirs failed.",
)
WAKU_DUPLICATES = Counter(
    "pqcnet_mesh_waku_duplicates_suppressed_total",
    "Messages seen through two subscription legs (active and standby node), dropped "
    "once.",
)
WAKU_CLEANUPS = Counter(
    "pqcnet_mesh_waku_stale_subscriptions_deleted_total",
    "Subscriptions left on a failed Waku node, deleted when it answered again (one "
    "nobody drains blocks go-waku's broadcaster).",
)
BUNDLES = Gauge(
    "pqcnet_mesh_dtn_bundles",
    "Bundles held in the DTN store awaiting an unreachable peer.",
)
BUNDLE_EVENTS = Counter(
    "pqcnet_mesh_dtn_bundle_events_total",
    "DTN bundle lifecycle events (stored, forwarded, expired, rejected).",
    ["event"],
)
PEERS = Gauge("pqcnet_mesh_live_peers", "Peers whose announcements are current.")
DIRECTIVES = Counter(
    "pqcnet_mesh_directives_applied_total",
    "Governance directives anchored here and applied by at least one part of this node "
    "(a directive every part ignored is not counted), by action.",
    ["action"],
)
DIRECTIVE_OUTCOMES = Counter(
    "pqcnet_mesh_directive_outcomes_total",
    "What each part of this node did with each anchored directive, by action, part "
    "(``mesh`` = the agent's own effect, else the handler's class) and outcome "
    "(applied, ignored, failed).",
    ["action", "handler", "outcome"],
)
DIRECTIVES_REJECTED = Counter(
    "pqcnet_mesh_directives_rejected_total",
    "Governance directives refused before any effect, by reason (under_threshold, "
    "expired, replay, no_ledger, ...).",
    ["reason"],
)
CRL_UPDATES = Counter(
    "pqcnet_mesh_crl_updates_total",
    "CRLs offered to this node, by result (applied, crl_untrusted, crl_stale, "
    "crl_duplicate).",
    ["result"],
)
ADVISORIES = Counter(
    "pqcnet_mesh_advisories_total",
    "Peer gossip that claims an authority it does not carry (e.g. a revocation): "
    "recorded, never applied, by kind.",
    ["kind"],
)
DAG_SYNC = Counter(
    "pqcnet_mesh_dag_sync_events_total",
    "QS-DAG sync events by kind: vertices imported, rounds finished, tips not pulled "
    "(sender not in dag_pull_from; dag_tips_foreign_genesis: a ledger of another genesis), "
    "no route to the peer, publish failed.",
    ["event"],
)
DAG_REFUSED = Counter(
    "pqcnet_mesh_dag_refused_vertices_total",
    "QS-DAG vertices from peers' DAG sync refused by this node's ledger, by reason "
    "(malformed, slashed_author, or the ledger error class: a bad signature, an unknown "
    "author, a conflicting vertex ...).",
    ["reason"],
)
DELIVERY_LATENCY = Histogram(
    "pqcnet_mesh_delivery_latency_seconds",
    "Sender timestamp to local acceptance.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
