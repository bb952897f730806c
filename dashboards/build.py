"""pqcnet's Grafana dashboards as code (grafana-foundation-sdk): the one source of
``dashboards/json/*.json``.

    python dashboards/build.py           # write dashboards/json/
    python dashboards/build.py --check   # exit 1 when the committed JSON is stale

Six dashboards: money ("did anyone lose money": metered = proved + pending per relayer
and customer), relay flow, sentry edge, control plane (Waku mesh, directives, CA),
ledger (QS-DAG anchoring) and process internals. Every query uses only metrics the
nodes export on their ops port (tests/deploy/test_dashboards.py checks each name against
the source; tests/deploy/test_compose.py runs each query against the compose network's
Prometheus). Queries carry no Grafana template variables, so the very same text runs in
Prometheus, in Grafana and in the tests.

:data:`QUIET` names the panels that may legitimately be empty after the compose test's
traffic (they count faults that did not happen); every other panel must return data.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders.dashboard import Dashboard, Row
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.builders.stat import Panel as Stat
from grafana_foundation_sdk.builders.timeseries import Panel as Timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef

OUT = Path(__file__).resolve().parent / "json"
#: the datasource every panel uses; provisioning/datasources.yaml defines it (uid fixed)
DATASOURCE = DataSourceRef(type_val="prometheus", uid="pqcnet-prometheus")


@dataclass(frozen=True)
class P:
    """One panel: title, unit, queries as (PromQL, legend), optional stat display."""

    title: str
    unit: str
    queries: tuple[tuple[str, str], ...]
    description: str = ""
    stat: bool = False


def _money(state: str) -> str:
    return f'sum by (instance) (pqcnet_relayer_settlement_frames{{state="{state}"}})'


MONEY = {
    "Did anyone lose money": [
        P("Unaccounted frames per relayer: metered - proved - pending (must be 0)", "short",
          ((f"{_money('metered')} - {_money('proved')} - {_money('pending')}",
            "{{instance}}"),),
          "Above 0: delivered but never proved (the operator is not paid); below 0: "
          "proved without delivery (the customer overpays).", stat=True),
        P("Proved, not yet anchored (frames)", "short",
          ((f"{_money('proved')} - {_money('anchored')}", "{{instance}}"),),
          "Signed proofs whose QS-DAG vertex is not in the ledger yet; 0 once caught up.",
          stat=True),
        P("Metered vs proved vs anchored vs pending per relayer (frames)", "short",
          (("sum by (instance, state) (pqcnet_relayer_settlement_frames)",
            "{{instance}} {{state}}"),),
          "Over the epochs each relayer holds (keep_epochs); pending = the open epoch "
          "and closed ones not yet proven."),
    ],
    "Per customer": [
        P("Metered vs proved vs anchored per customer (frames)", "short",
          (("sum by (customer, state) (pqcnet_relayer_settlement_frames)",
            "{{customer}} {{state}}"),)),
        P("Metered vs proved per customer (bytes)", "bytes",
          (('sum by (customer, state) (pqcnet_relayer_settlement_bytes'
            '{state=~"metered|proved"})', "{{customer}} {{state}}"),)),
        P("Delivered bytes/s per customer", "Bps",
          (("sum by (customer) (rate(pqcnet_relayer_volume_bytes_total[1m]))",
            "{{customer}}"),)),
        P("Proven records vs client-signed counters", "short",
          (("sum by (status) (pqcnet_relayer_claims_records_total)", "{{status}}"),),
          "overclaimed: a proof above what the customer's clients signed."),
        P("Client-signed ack counters held", "short",
          (("sum by (instance) (pqcnet_relayer_signed_counters)", "{{instance}}"),)),
    ],
}

RELAY = {
    "Frames": [
        P("Ingress frames/s by result", "short",
          (("sum by (instance, result) (rate(pqcnet_relayer_ingress_frames_total[1m]))",
            "{{instance}} {{result}}"),)),
        P("Delivered frames/s", "short",
          (("sum by (instance) (rate(pqcnet_relayer_delivered_frames_total[1m]))",
            "{{instance}}"),)),
        P("Duplicates suppressed and gaps skipped", "short",
          (("sum by (instance) (pqcnet_relayer_duplicates_frames_total)",
            "{{instance}} duplicates"),
           ("sum by (instance) (pqcnet_relayer_gaps_frames_total)", "{{instance}} gaps"))),
        P("Gap fence: late frames and the cluster's agreement on skips", "short",
          (("sum by (instance, event) (rate(pqcnet_relayer_gap_fence_events_total"
            '{event=~"refused|late_on_bus|marked|reserved|held_elsewhere|refused_on_bus|'
            'held_catching_up"}[1m]))', "{{instance}} {{event}}"),
           ("sum by (instance) (pqcnet_relayer_shards_catching_up)",
            "{{instance}} shards catching up")),
          "late_on_bus must stay 0 (an acknowledged frame dropped). In a cluster: marked = "
          "frames confirmed for another relayer's shard, reserved = skips agreed first, "
          "held_elsewhere = skips waiting for a frame another relayer acknowledged, "
          "refused_on_bus = copies of refused frames dropped (decision 0020). "
          "held_catching_up and shards catching up: after a start or a takeover, no skip "
          "until the backlog there at that moment is read (decision 0023)."),
        P("Cluster hand-overs: entries taken over, stale entries, fenced reads", "short",
          (("sum by (instance) (pqcnet_relayer_taken_over_entries_total)",
            "{{instance}} taken over"),
           ("sum by (instance) (pqcnet_relayer_stale_claimed_entries_total)",
            "{{instance}} stale entries taken"),
           ("sum by (instance) (pqcnet_relayer_fenced_reads_total)",
            "{{instance}} fenced out")),
          "taken over: what a departed owner read and never acknowledged, redelivered "
          "here. stale entries: read by a reader that does not fence (an older version, "
          "a foreign client). fenced out: this relayer stalled past its Redis lease or "
          "Kafka session and was refused (decisions 0024, 0025; alert "
          "PqcnetRelayerFencedOut)."),
        P("Refused: authorization and quota", "short",
          (("sum by (instance, op) (pqcnet_relayer_authz_refusals_total)",
            "{{instance}} authz {{op}}"),
           ("sum by (instance) (pqcnet_relayer_quota_refused_frames_total)",
            "{{instance}} quota"),
           ("sum by (instance, outcome) (pqcnet_relayer_quota_cluster_calls_total)",
            "{{instance}} cluster quota draws {{outcome}}"),
           ("max by (instance) (pqcnet_relayer_quota_cluster_fallback)",
            "{{instance}} cluster quotas on host buckets")),
          "quota_scope cluster: draws from the cluster's buckets in Redis, and 1 while "
          "Redis fails them and this relayer checks with its own buckets (decision 0028; "
          "alert PqcnetRelayerQuotaFallback)."),
    ],
    "Backpressure": [
        P("Shard backlog (records not yet acked)", "short",
          (("max by (instance) (pqcnet_relayer_shard_backlog_records)", "{{instance}}"),)),
        P("Overflow queue, paused shards, degraded", "short",
          (("sum by (instance) (pqcnet_relayer_overflow_records)", "{{instance}} overflow"),
           ("sum by (instance) (pqcnet_relayer_paused_shards)", "{{instance}} paused"),
           ("sum by (instance) (pqcnet_relayer_degraded)", "{{instance}} degraded"))),
        P("Subscriber streams", "short",
          (("sum by (instance) (pqcnet_relayer_subscribers)", "{{instance}}"),)),
        P("Topics with no subscriber: parked, then held", "short",
          (("sum by (instance) (pqcnet_relayer_parked_topics)", "{{instance}} parked topics"),
           ("sum by (instance) (pqcnet_relayer_records_behind_park)",
            "{{instance}} records behind a park"),
           ("sum by (instance) (pqcnet_relayer_held_frames)", "{{instance}} held frames")),
          "Held frames > 0 means a shard waits for a subscriber (parking off or full)."),
        P("Parking replays and overflows; subscriber evictions and quarantine", "short",
          (("sum by (instance) (pqcnet_relayer_park_replays_total)", "{{instance}} replays"),
           ("sum by (instance) (pqcnet_relayer_park_overflows_total)",
            "{{instance}} parking full"),
           ("sum by (instance) (pqcnet_relayer_subscriber_ack_timeouts_total)",
            "{{instance}} evicted"),
           ("sum by (instance) (pqcnet_relayer_subscriber_quarantine_refusals_total)",
            "{{instance}} quarantine refusals"))),
        P("Topic-mark LRU: evictions and loads/s", "short",
          (("sum by (instance) (rate(pqcnet_relayer_mark_evictions_topics_total[5m]))",
            "{{instance}} evictions"),
           ("sum by (instance) (rate(pqcnet_relayer_mark_loads_topics_total[5m]))",
            "{{instance}} loads"))),
    ],
}

SENTRY = {
    "Requests": [
        P("Requests/s by outcome", "reqps",
          (("sum by (instance, outcome) (rate(pqcnet_sentry_requests_total[1m]))",
            "{{instance}} {{outcome}}"),)),
        P("Rejections by reason", "short",
          (("sum by (instance, reason) (pqcnet_sentry_rejections_total)",
            "{{instance}} {{reason}}"),),
          "rate_limited after a rate-limit directive; acl / assertion refusals."),
        P("Added latency p50 / p99", "s",
          (("histogram_quantile(0.5, sum by (le, kind) "
            "(rate(pqcnet_sentry_request_duration_seconds_bucket[5m])))", "p50 {{kind}}"),
           ("histogram_quantile(0.99, sum by (le, kind) "
            "(rate(pqcnet_sentry_request_duration_seconds_bucket[5m])))", "p99 {{kind}}"))),
        P("Backend latency p50 / p99", "s",
          (("histogram_quantile(0.5, sum by (le, backend) "
            "(rate(pqcnet_sentry_upstream_duration_seconds_bucket[5m])))", "p50 {{backend}}"),
           ("histogram_quantile(0.99, sum by (le, backend) "
            "(rate(pqcnet_sentry_upstream_duration_seconds_bucket[5m])))",
            "p99 {{backend}}")),
          "The backend's share of the latency above: pool checkout and write to the "
          "response head in. What is left is the sentry's own."),
    ],
    "Sidecars": [
        P("Round trip p50 / p99 by sentry", "s",
          (("histogram_quantile(0.5, sum by (le, sentry) "
            "(rate(pqcnet_sidecar_sentry_round_trip_seconds_bucket[5m])))", "p50 {{sentry}}"),
           ("histogram_quantile(0.99, sum by (le, sentry) "
            "(rate(pqcnet_sidecar_sentry_round_trip_seconds_bucket[5m])))",
            "p99 {{sentry}}")),
          "From the sidecar handing a request to its pool until the response head is in: "
          "tunnel, sentry and backend. Minus the sentry's own latency: the tunnel."),
        P("Sentries in rotation, per sidecar", "short",
          (("sum by (instance) (pqcnet_sidecar_sentry_up)", "{{instance}} up"),
           ("count by (instance) (pqcnet_sidecar_sentry_up)", "{{instance}} configured")),
          "A sidecar with none up answers its app 502 and is not ready (/readyz)."),
        P("Failovers and sentries marked down /s", "short",
          (("sum by (instance) (rate(pqcnet_sidecar_failovers_total[5m]))",
            "{{instance}} failovers"),
           ("sum by (sentry) (rate(pqcnet_sidecar_sentry_marked_down_total[5m]))",
            "{{sentry}} marked down"))),
    ],
    "Usage by tenant": [
        P("Admitted requests/s by tenant and kind", "reqps",
          (("sum by (tenant, kind) (rate(pqcnet_sentry_tenant_requests_total[1m]))",
            "{{tenant}} {{kind}}"),),
          "A TCP pipe, WebSocket or streaming gRPC call counts once, when it starts."),
        P("Payload bytes/s by tenant", "Bps",
          (("sum by (tenant, direction) (rate(pqcnet_sentry_tenant_bytes_total[1m]))",
            "{{tenant}} {{direction}}"),),
          "up = to backends (after the sanitizer), down = to clients; no heads, no tunnel "
          "framing."),
    ],
    "Capacity": [
        P("Tunnels open and requests in flight", "short",
          (("sum by (instance) (pqcnet_sentry_tunnels_active)", "{{instance}} tunnels"),
           ("sum by (instance) (pqcnet_sentry_in_flight_requests)",
            "{{instance}} in flight"))),
        P("Gate slots held by tenant", "short",
          (("sum by (tenant) (pqcnet_sentry_tenant_in_flight_requests)", "{{tenant}}"),),
          "Summed over workers and hosts; a tenant's cap (limits.tenant_share) holds per "
          "host."),
        P("Token bucket level by tenant", "short",
          (("min by (instance, tenant) (pqcnet_sentry_token_bucket_level_tokens)",
            "{{instance}} {{tenant}}"),)),
        P("Assertion cache hit ratio", "percentunit",
          (("avg by (instance) (pqcnet_sentry_assertion_cache_hit_ratio)",
            "{{instance}}"),)),
        P("Flow-control pauses and attestations", "short",
          (("sum by (instance) (pqcnet_sentry_flow_pauses_total)", "{{instance}} pauses"),
           ("sum by (instance) (pqcnet_sentry_attestations_total)",
            "{{instance}} attestations"))),
    ],
}

CONTROL = {
    "Mesh": [
        P("Live peers per node", "short",
          (("max by (instance) (pqcnet_mesh_live_peers)", "{{instance}}"),)),
        P("Control messages accepted / published by type", "short",
          (("sum by (type) (pqcnet_mesh_accepted_messages_total)", "accepted {{type}}"),
           ("sum by (type) (pqcnet_mesh_published_messages_total)", "published {{type}}"))),
        P("Dropped control messages by reason", "short",
          (("sum by (reason) (pqcnet_mesh_dropped_messages_total)", "{{reason}}"),)),
        P("Waku REST errors by operation", "short",
          (("sum by (instance, op) (pqcnet_mesh_waku_errors_total)", "{{instance}} {{op}}"),)),
        P("Waku failovers and moved subscription legs", "short",
          (("sum by (instance) (pqcnet_mesh_waku_failovers_total)", "{{instance}} failovers"),
           ("sum by (instance) (pqcnet_mesh_waku_leg_moves_total)", "{{instance}} legs moved"))),
        P("Delivery latency p99 (sender → accepted)", "s",
          (("histogram_quantile(0.99, sum by (le) "
            "(rate(pqcnet_mesh_delivery_latency_seconds_bucket[5m])))", "p99"),)),
        P("DTN bundles held", "short",
          (("sum by (instance) (pqcnet_mesh_dtn_bundles)", "{{instance}}"),)),
    ],
    "Governance": [
        P("Directives applied by action", "short",
          (("sum by (instance, action) (pqcnet_mesh_directives_applied_total)",
            "{{instance}} {{action}}"),)),
        P("Directive outcomes per part", "short",
          (("sum by (action, handler, outcome) (pqcnet_mesh_directive_outcomes_total)",
            "{{action}} {{handler}} {{outcome}}"),)),
        P("Directives rejected by reason", "short",
          (("sum by (instance, reason) (pqcnet_mesh_directives_rejected_total)",
            "{{instance}} {{reason}}"),)),
    ],
    "CA service": [
        P("Enrolled nodes (live SPIFFE IDs)", "short",
          (("sum(pqcnet_ca_enrolled_nodes)", "enrolled"),), stat=True),
        P("CA requests by endpoint and status", "short",
          (("sum by (endpoint, status) (pqcnet_ca_requests_total)",
            "{{endpoint}} {{status}}"),)),
        P("Certificates issued / revoked, token replays", "short",
          (("sum by (path) (pqcnet_ca_certificates_issued_total)", "issued {{path}}"),
           ("sum(pqcnet_ca_certificates_revoked_total)", "revoked"),
           ("sum(pqcnet_ca_token_replays_total)", "token replays"))),
        P("Enrollment tokens by state (live: may still be redeemed)", "short",
          (("sum by (state) (pqcnet_ca_tokens)", "{{state}}"),)),
    ],
}

LEDGER = {
    "QS-DAG": [
        P("Vertices each relayer appended", "short",
          (("max by (instance) (pqcnet_relayer_ledger_own_vertices)", "{{instance}}"),),
          "Volume proofs, performance reports and anchored directives."),
        P("Epochs with an anchored proof held", "short",
          (("max by (instance) (pqcnet_relayer_proven_epochs)", "{{instance}}"),)),
        P("Orphan pool (vertices missing parents)", "short",
          (("max by (instance) (pqcnet_relayer_ledger_orphans)", "{{instance}}"),)),
        P("Anchored frames per relayer", "short",
          ((_money("anchored"), "{{instance}}"),)),
        P("Sentry attestations anchored (last 5 m)", "short",
          (("sum by (instance) (increase(pqcnet_sentry_attestations_total[5m]))",
            "{{instance}}"),)),
    ],
}

PROCESS = {
    "Process": [
        P("Targets up", "short", (("up", "{{job}} {{instance}}"),), stat=True),
        P("Resident memory", "bytes",
          (("process_resident_memory_bytes", "{{instance}}"),)),
        P("CPU seconds/s", "short",
          (("rate(process_cpu_seconds_total[1m])", "{{instance}}"),)),
        P("Open file descriptors", "short", (("process_open_fds", "{{instance}}"),)),
        P("Python GC collections/s by generation", "short",
          (("sum by (instance, generation) (rate(python_gc_collections_total[5m]))",
            "{{instance}} gen {{generation}}"),)),
    ],
    "Identity and TLS": [
        P("Certificate expires in", "s",
          (("min by (instance) (pqcnet_identity_cert_expiry_seconds)", "{{instance}}"),)),
        P("Identity reloads and renewals", "short",
          (("sum by (instance, source) (pqcnet_identity_reloads_total)",
            "{{instance}} reload {{source}}"),
           ("sum by (instance, result) (pqcnet_identity_renewals_total)",
            "{{instance}} renewal {{result}}"))),
        P("OpenSSL features in use", "short",
          (("max by (instance, feature) (pqcnet_qstp_openssl_feature_enabled)",
            "{{instance}} {{feature}}"),)),
        P("Classical (non-PQ) handshakes", "short",
          (("sum by (instance, group) (pqcnet_qstp_classical_handshakes_total)",
            "{{instance}} {{group}}"),), "Any value here is a policy exception."),
    ],
}

DASHBOARDS: dict[str, tuple[str, dict[str, list[P]]]] = {
    "pqcnet-money": ("pqcnet / money", MONEY),
    "pqcnet-relay": ("pqcnet / relay flow", RELAY),
    "pqcnet-sentry": ("pqcnet / sentry edge", SENTRY),
    "pqcnet-control-plane": ("pqcnet / control plane", CONTROL),
    "pqcnet-ledger": ("pqcnet / ledger", LEDGER),
    "pqcnet-process": ("pqcnet / process internals", PROCESS),
}

#: panels that count faults or operator actions the compose test does not cause, so
#: they may be empty there (title -> why)
QUIET = {
    "Refused: authorization and quota": "no frame is refused in the compose run",
    "Dropped control messages by reason": "only forged, stale or replayed messages",
    "Waku REST errors by operation": "only while a go-waku node is unreachable",
    "Waku failovers and moved subscription legs": "no go-waku node fails in the compose run",
    "Directives rejected by reason": "only forged, expired or replayed directives",
    "Orphan pool (vertices missing parents)": "orphans only while syncing a peer's DAG",
    "Identity reloads and renewals": "no certificate is renewed in a short run",
    "Classical (non-PQ) handshakes": "the compose network is PQ-only",
    "Topic-mark LRU: evictions and loads/s": "the LRU holds every topic of a short run",
    "Delivery latency p99 (sender → accepted)": "rate() over announcements may be empty",
    "Added latency p50 / p99": "rate() window may hold no request at query time",
}


def build(uid: str) -> dict[str, object]:
    """One dashboard as the JSON model Grafana imports."""
    title, rows = DASHBOARDS[uid]
    d = (Dashboard(title).uid(uid).tags(["pqcnet"]).refresh("10s").time("now-30m", "now")
         .timezone("utc").readonly())
    pid = 1
    for row, panels in rows.items():
        d = d.with_row(Row(row).id(pid))
        pid += 1
        for p in panels:
            panel = (Stat() if p.stat else Timeseries()).id(pid).title(p.title)
            panel = panel.datasource(DATASOURCE).unit(p.unit).span(8 if p.stat else 12)
            if p.description:
                panel = panel.description(p.description)
            for i, (expr, legend) in enumerate(p.queries):
                panel = panel.with_target(Dataquery().expr(expr).legend_format(legend)
                                          .ref_id(chr(ord("A") + i)).datasource(DATASOURCE))
            d = d.with_panel(panel)
            pid += 1
    doc: dict[str, object] = json.loads(JSONEncoder(sort_keys=True).encode(d.build()))
    return doc


def render(uid: str) -> str:
    return json.dumps(build(uid), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def queries(doc: dict[str, object]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of a dashboard JSON."""
    out = []
    for panel in doc.get("panels", []):  # type: ignore[attr-defined]
        for t in panel.get("targets") or []:
            out.append((panel["title"], t["expr"]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="Compare with the committed files instead of writing them.")
    ap.add_argument("--out", type=Path, default=OUT, help="Directory of the JSON files.")
    args = ap.parse_args(argv)
    out: Path = args.out
    stale = []
    for uid in DASHBOARDS:
        path = out / f"{uid}.json"
        text = render(uid)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    extra = sorted(p.name for p in out.glob("*.json") if p.stem not in DASHBOARDS)
    if args.check and (stale or extra):
        print(f"dashboards out of date: {stale + extra}; run python dashboards/build.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
