"""Each committed scenario at small N: its invariants, never its timings."""

from __future__ import annotations

import pytest

from pqcnet.sim.run import run, strip_run
from tests.sim.conftest import small


def _delivery(summary: dict, kind: str) -> dict:
    return summary["relay"]["delivery_ratio"][kind]


def test_scale_delivers_everything_once_and_is_deterministic() -> None:
    sc = small("scale", nodes=40, duration_s=60, **{"workload.start_s": 15.0,
                                                     "workload.drain_s": 30.0})
    first = run(sc).summary
    data = _delivery(first, "data")
    assert data["messages"] > 0 and data["min"] == 1.0  # 100 % delivery without churn
    assert first["relay"]["duplicates_to_app"] == 0
    assert first["relay"]["duplicates_received"] > 0  # the relay saw duplicates, and hid them
    second = run(sc).summary
    assert strip_run(first) == strip_run(second)  # same seed: same summary, byte for byte
    other = run(small("scale", nodes=40, duration_s=60, seed=2,
                      **{"workload.start_s": 15.0, "workload.drain_s": 30.0})).summary
    assert strip_run(other) != strip_run(first)


def test_formation_every_node_formed_with_bounded_views() -> None:
    sc = small("formation", nodes=40, duration_s=60, **{"roles.relayers": 4,
                                                        "workload.join_window_s": 10.0})
    s = run(sc).summary
    f = s["formation"]
    assert f["formed_nodes"] == 40 and f["all_formed_at_s"] is not None
    assert f["routes_covering_all_shards"] == 40
    assert f["connections"]["max"] <= sc.gossipsub.max_peers
    assert f["mesh_degree"]["max"] <= sc.gossipsub.D_hi


def test_directive_applied_everywhere_and_slashed_relayer_refused() -> None:
    sc = small("directive", nodes=40, duration_s=150, **{"workload.rate_limit_at_s": 40.0,
                                                         "workload.slash_at_s": 70.0,
                                                         "roles.relayers": 4})
    s = run(sc).summary
    d = s["directive"]
    for label in ("rate_limit", "slash"):
        assert d[label]["applied"] == d[label]["population"] > 0
        assert d[label]["p100_s"] is not None
    slashed = d["slashed_relayer"]
    assert slashed["control_messages_after_apply"].get("accepted", 0) == 0
    assert slashed["control_messages_after_apply"].get("dropped", 0) > 0
    assert slashed["tunnel_dials_after_apply"].get("accepted", 0) == 0
    assert s["directives_applied_twice"] == 0


@pytest.mark.parametrize("name", ["churn", "churn-30"])
def test_churn_replays_every_frame_exactly_once(name: str) -> None:
    sc = small(name, nodes=40, duration_s=600, **{
        "roles.relayers": 2, "roles.publishers": 6, "roles.subscribers": 6,
        "churn.rate_per_hour": 3.0, "churn.min_down_s": 20.0, "churn.max_down_s": 90.0,
        "churn.settle_s": 150.0, "workload.drain_s": 60.0, "workload.msg_rate": 0.02})
    s = run(sc).summary
    frames = s["churn"]["frames"]
    assert s["churn"]["down_events"] > 0
    assert frames["frames_published"] > 0
    assert frames["delivery_ratio"] == 1.0  # after DTN replay, nothing lost
    assert frames["duplicates_to_app"] == 0
    assert frames["metering_accuracy"]["metered_over_delivered_min"] == 1.0
    assert frames["metering_accuracy"]["metered_over_delivered_max"] == 1.0
    assert s["relay"]["duplicates_to_app"] == 0


def test_partition_ledgers_converge_after_heal_without_false_evidence() -> None:
    sc = small("partition", nodes=30, duration_s=240, **{
        "roles.validators": 4, "roles.relayers": 2, "partition.at_s": 50.0,
        "partition.heal_s": 110.0, "workload.drain_s": 100.0, "workload.msg_rate": 0.05,
        "agent.dag_sync_interval_s": 10.0, "workload.ledger_append_s": 30.0})
    s = run(sc).summary
    p = s["partition"]
    assert p["dropped_across_partition"] > 0
    assert p["converged_after_heal_s"] is not None
    assert p["equivocation_false_positives"] == 0
    assert p["evidence_by_offender"] == {}


def test_adversaries_dropped_detected_and_only_they_slashed() -> None:
    sc = small("adversaries", nodes=40, duration_s=300, **{
        "roles.validators": 4, "roles.relayers": 3, "roles.publishers": 6,
        "roles.subscribers": 6, "adversaries.forgers": 2, "adversaries.replayers": 2,
        "adversaries.equivocators": 1, "adversaries.over_reporters": 1,
        "workload.rate_limit_at_s": 40.0, "workload.drain_s": 40.0})
    s = run(sc).summary
    a = s["adversaries"]
    attacks = a["attacks"]
    assert attacks["forged_published"] > 0 and attacks["replays_published"] > 0
    assert attacks["forged_accepted"] == 0 and attacks["forged_applied_nodes"] == 0
    assert attacks["replayed_accepted"] == 0 and attacks["replayed_dropped"] > 0
    assert attacks["directives_applied_twice"] == 0
    slashing = a["slashing"]
    assert slashing["false_positives"] == 0 and slashing["honest_slashed"] == []
    assert slashing["recall"] == 1.0 and slashing["precision"] == 1.0
    for verdict in a["detection"].values():
        assert verdict["detected"]
    for label in ("rate_limit", "rate_limit_2"):
        legit = a["legitimate_directives"][label]
        assert legit["applied"] == legit["population"]
