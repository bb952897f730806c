"""Every ``pqcnet bench`` runs at a tiny size and prints JSON with its same-run
baselines and ratios.

Structure only: the numbers are timings of a shared machine and are never asserted
(benchmarks/README.md records them with their load). What is asserted besides the
shape is correctness the benchmarks check on the way — every frame delivered, the
parallel ledger identical to the serial one, the audit clean.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pqcnet.bench import mesh
from pqcnet.bench._broker import drop_kafka_group
from tests.conftest import _services_env, require_service
from tests.procs import PQCNET, descendants, running
from tests.relayer.helpers import redis_cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _bench(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = subprocess.run([PQCNET, "bench", *args], capture_output=True, text=True,
                          timeout=540, check=False,
                          env=None if env is None else {**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def _number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


def _latency(d: dict[str, Any]) -> None:
    assert _number(d["p50_ms"]) and _number(d["p99_ms"]) and d["n"] > 0


def _machine(d: dict[str, Any]) -> None:
    assert d["cpus"] >= 1 and len(d["loadavg"]) == 3 and d["utc"]


def test_qsdag_reports_serial_and_parallel_against_the_verify_floor() -> None:
    d = _bench("qsdag", "--count", "40", "--slice", "20", "--sample", "100", "--workers", "1",
               "--verify-workers", "2", "--verify-mode", "thread")
    for key in ("baseline_mldsa65_verify_per_s", "baseline_mldsa65_verify_interleaved_median_per_s",
                "verify_and_anchor_per_s", "ratio_vs_verify"):
        assert _number(d[key]), key
    par = d["parallel"]
    for key in ("import_per_s", "baseline_mldsa65_verify_interleaved_median_per_s",
                "ratio_vs_single_core_verify", "ratio_vs_serial_verify_and_anchor",
                "main_cpu_us_per_vertex"):
        assert _number(par[key]), key
    assert par["identical_anchoring_order"] is True
    assert par["ledger_verify_ok"] is True and d["ledger_verify_ok"] is True
    assert isinstance(par["target_met"], bool) and par["target_ratio"] == 1.5
    assert len(d["loadavg_before"]) == 3


def test_qstp_reports_the_in_memory_floor_and_stdlib_ratios() -> None:
    d = _bench("qstp", "--handshakes", "5", "--bulk-mib", "1", "--small-mib", "1",
               "--rounds", "1")
    for key in ("handshake_in_memory_full", "handshake_qstp_full",
                "handshake_in_memory_resumed", "handshake_qstp_resumed",
                "handshake_stdlib_classical_full"):
        _latency(d[key])
    for key in ("qstp_full_socket_vs_in_memory_p50", "qstp_resumed_socket_vs_in_memory_p50",
                "bulk_qstp_vs_stdlib", "bulk_cpu_efficiency_qstp_vs_stdlib"):
        assert _number(d["ratios"][key]), key
    assert isinstance(d["targets_met"]["socket_vs_in_memory_full"], bool)
    assert len(d["setup"]["loadavg_before"]) == 3


def _relayer(*extra: str) -> dict[str, Any]:
    d = _bench("relayer", "--frames", "400", "--publishers", "2", "--topics", "8",
               "--batch", "32", "--paced-frames", "40", "--paced-rate", "200", *extra)
    sat, paced = d["pqcnet"]["saturated"], d["pqcnet"]["paced"]
    assert sat["received"] == sat["frames"] == 400 and paced["received"] == paced["frames"]
    # the untimed warm-up ran first, on its own topics, and delivered all of it: at least
    # two rounds, more only while the rate still climbed by 1.2x, the last one reported
    rounds = sat["warmup_rounds"]
    assert 2 <= len(rounds) <= 6 and sat["warmup"] == rounds[-1], sat
    assert all(r["frames"] == 1000 and _number(r["frames_per_s"]) for r in rounds)
    assert all(b["frames_per_s"] >= 1.2 * a["frames_per_s"]
               for a, b in itertools.pairwise(rounds[:-1])), rounds
    assert len(rounds) == 6 or rounds[-1]["frames_per_s"] < 1.2 * rounds[-2]["frames_per_s"]
    _latency(sat["latency"])
    _latency(paced["latency"])
    # the relayer's CPU over the paced phase, per one-frame request (from /proc, in
    # clock ticks: 40 requests may round to 0, so only its presence and type here)
    assert _number(paced["relayer_cpu_us_per_frame"]), paced
    # the paced phase waited for the relayer to go quiet after the saturated one (at
    # most 15 s; the share is that of the last 0.5 s window, one core = 1.0)
    assert 0.5 <= paced["settled_after_s"] <= 16 and 0 <= paced["settle_cpu_share"] <= 1, paced
    assert _number(d["e2e_frames_per_s"]) and _number(d["baseline"]["raw_writes_per_s"])
    assert _number(d["ratio"]) and _number(d["ratios"]["vs_raw_backend_writes"])
    _machine(d["machine"]["before"])
    return d


def test_relayer_reports_latency_and_the_qstp_echo_ceiling() -> None:
    d = _relayer()
    echo = d["baselines"]["qstp_echo"]
    assert echo["frames"] == 400 and _number(echo["frames_per_s"])
    assert _number(d["ratios"]["vs_qstp_echo_ceiling"])
    assert set(d["ratios"]) >= {"vs_nats_go", "vs_nats_py", "paced_p99_vs_nats_py_paced_p99"}
    if "skipped" in d["baselines"]["nats_go"]:  # NATS not running: said so, no ratio
        assert d["ratios"]["vs_nats_go"] is None and d["targets"]["met_vs_nats_go"] is None


def test_relayer_against_nats_jetstream() -> None:
    # NATS is one of the services `make test` brings up: the baseline must run in CI
    # (a missing service fails there, never skips).
    require_service("PQCNET_NATS_URL", "NATS JetStream")
    d = _relayer()
    py, go = d["baselines"]["nats_py"], d["baselines"]["nats_go"]
    _latency(py["saturated"]["latency"])
    _latency(py["paced"]["latency"])
    # nats-server waited for quiet before its paced run, as the relayer did
    assert 0.5 <= py["paced"]["settled_after_s"] <= 16, py["paced"]
    assert 0 <= py["paced"]["settle_cpu_share"] <= 1, py["paced"]
    assert _number(py["saturated"]["frames_per_s"]) and _number(go["frames_per_s"])
    assert go["frames"] == 400
    for key in ("vs_nats_go", "vs_nats_py", "paced_p99_vs_nats_py_paced_p99"):
        assert _number(d["ratios"][key]), key
    assert isinstance(d["targets"]["met_vs_nats_go"], bool)


def kafka_topics(bootstrap: str) -> set[str]:
    """The broker's topic list, as its metadata answer gives it (the admin client's
    ``list_topics``, not the bench's delete path)."""
    from aiokafka.admin import AIOKafkaAdminClient

    async def listed() -> set[str]:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
        await admin.start()
        try:
            return set(await admin.list_topics())
        finally:
            await admin.close()

    return asyncio.run(listed())


def kafka_groups(bootstrap: str) -> set[str]:
    """The broker's consumer groups (the admin client's ``list_consumer_groups``)."""
    from aiokafka.admin import AIOKafkaAdminClient

    async def listed() -> set[str]:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
        await admin.start()
        try:
            return {g[0] for g in await admin.list_consumer_groups()}
        finally:
            await admin.close()

    return asyncio.run(listed())


def test_relayer_on_kafka_with_its_marks_in_redis() -> None:
    """``--marks-in-redis``: the Kafka relayer keeps marks and volume in Redis, as a Kafka
    cluster does (decision 0025). Seen from outside with ``redis-cli`` (the run keeps its
    broker state for it, ``--keep-broker-state``): one partition-owner key per partition
    (32) under one new prefix — every partition's marks went through the generation
    fence. Refused for the other backends."""
    kafka = require_service("PQCNET_KAFKA_BOOTSTRAP", "Kafka")
    redis_url = require_service("PQCNET_REDIS_URL", "Redis")

    def owner_keys() -> set[str]:
        out = redis_cli(redis_url, "--scan", "--pattern", "bench:*:kowner:*")
        return {k.strip('"') for k in out.split()}

    before, groups_before = owner_keys(), kafka_groups(kafka)
    d = _relayer("--backend", "kafka", "--marks-in-redis", "--no-baselines",
                 "--keep-broker-state")
    assert d["marks"] == "redis" and d["broker_state"] == [{"kept": True}]
    new, new_groups = owner_keys() - before, kafka_groups(kafka) - groups_before
    try:
        assert len(new) == 32 and len({k.rsplit(":kowner:", 1)[0] for k in new}) == 1, new
        assert {int(k.rsplit(":", 1)[1]) for k in new} == set(range(32))
        # kept: the relayer's consumer group (its committed offsets) is on the broker
        assert len(new_groups) == 1 and next(iter(new_groups)).startswith("bench-")
    finally:
        for group in new_groups:
            asyncio.run(drop_kafka_group(kafka, group))
        prefix = next(iter(new)).rsplit(":kowner:", 1)[0] if new else ""
        if prefix:  # the test drops what it kept
            keys = redis_cli(redis_url, "--scan", "--pattern", prefix + ":*").split()
            redis_cli(redis_url, "UNLINK", *(k.strip('"') for k in keys))
    # without the flag the run drops its prefix and its topic: neither redis-cli nor the
    # broker's own topic list has them afterwards
    d = _relayer("--backend", "kafka", "--marks-in-redis", "--no-baselines")
    (dropped,) = d["broker_state"]
    assert dropped["redis_keys"]["kowner"] == 32 and dropped["redis_keys"]["seq"] >= 1
    left = redis_cli(redis_url, "--scan", "--pattern", dropped["redis_prefix"] + ":*")
    assert left.split() == [], left
    assert dropped["kafka_topic"].startswith("bench-")
    for _ in range(20):  # the deletion reaches every broker's metadata in a moment
        if dropped["kafka_topic"] not in kafka_topics(kafka):
            break
        time.sleep(0.5)
    assert dropped["kafka_topic"] not in kafka_topics(kafka)
    # and its consumer group: the relayer left it on its clean stop, the bench deleted it
    assert dropped["kafka_group"]["result"] == "deleted", dropped
    assert dropped["kafka_group"]["name"].startswith("bench-")
    assert dropped["kafka_group"]["name"] not in kafka_groups(kafka)
    for backend in ("embedded", "redis"):
        proc = subprocess.run([PQCNET, "bench", "relayer", "--backend", backend,
                               "--marks-in-redis", "--frames", "100", "--no-baselines"],
                              capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode != 0 and "is for --backend kafka" in proc.stderr, proc.stderr


def test_relayer_cluster_quotas_against_none_in_the_same_run() -> None:
    """``--quota-scope cluster --quota-rate R``: the same relayer measured without
    quotas first, then with every customer's quota drawn from Redis (shape only: the
    cost is a benchmark figure). The quota run drew from Redis — its dropped prefix
    held the four customers' frames buckets. Refused where there is no Redis to share,
    and at a rate the run exceeds (the run would measure refusals)."""
    redis_url = require_service("PQCNET_REDIS_URL", "Redis")
    d = _relayer("--backend", "redis", "--no-baselines", "--quota-scope", "cluster",
                 "--quota-rate", "1000000")
    q = d["quotas"]
    assert q["scope"] == "cluster" and q["frames_per_s_per_customer"] == 1e6
    for side in ("without", "with"):
        assert _number(q[side]["frames_per_s"]) and _number(q[side]["paced_p99_ms"]), q
    assert _number(q["ratio_frames_per_s"]) and _number(q["ratio_cpu_per_frame"])
    without, with_quota = d["broker_state"]
    assert "quota" not in without["redis_keys"], without
    assert with_quota["redis_keys"]["quota"] == 4, with_quota  # cust0..cust3: frames
    left = redis_cli(redis_url, "--scan", "--pattern", with_quota["redis_prefix"] + ":*")
    assert left.split() == [], left
    for args, why in (
            (["--backend", "embedded", "--quota-scope", "cluster", "--quota-rate", "10"],
             "keeps the quotas in Redis"),
            (["--backend", "redis", "--quota-scope", "host"], "go together"),
            (["--backend", "redis", "--quota-scope", "host", "--quota-rate", "10",
              "--frames", "400", "--batch", "32"], "the relayer refused frames")):
        proc = subprocess.run([PQCNET, "bench", "relayer", "--no-baselines", *args],
                              capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode != 0 and why in proc.stderr, proc.stderr[-2000:]


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("sig, inherit_ignored_sigint", [
    (signal.SIGINT, True),  # as a bench started with `&` from a script gets it
    (signal.SIGTERM, False)], ids=["SIGINT-inherited-ignored", "SIGTERM"])
def test_relayer_interrupted_mid_run_drops_its_broker_state(
        sig: signal.Signals, inherit_ignored_sigint: bool) -> None:
    """Ctrl-C (or SIGTERM) while the relayer is being measured: the bench stops its
    relayer and drops the prefix it wrote to Redis as a finished run does, says so on
    stderr, and exits 128 + signal. Seen from outside: redis-cli finds the new prefix's
    streams while the run goes, and nothing under it afterwards; no process the bench
    started is left. The SIGINT case starts the bench with SIGINT ignored, as a
    background job of a script (``make test &``) does: before the bench installed its own
    handler such a bench ran on through the signal (a make test started that way hung
    here)."""
    redis_url = require_service("PQCNET_REDIS_URL", "Redis")

    def prefixes() -> set[str]:
        out = redis_cli(redis_url, "--scan", "--pattern", "bench:*:s:*")
        return {k.strip('"').rsplit(":s:", 1)[0] for k in out.split()}

    def flowing(prefix: str) -> bool:  # the clients publish: past start-up and connect
        return any(int(redis_cli(redis_url, "XLEN", f"{prefix}:s:{s}").split()[-1])
                   for s in range(32))

    before = prefixes()
    bench = subprocess.Popen(  # long enough to be interrupted while it measures
        [PQCNET, "bench", "relayer", "--backend", "redis", "--no-baselines",
         "--frames", "2000000", "--paced-frames", "100000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own group: a hung bench is killed with its relayer
        preexec_fn=_ignore_sigint if inherit_ignored_sigint else None)
    started: set[int] = set()
    try:
        new: set[str] = set()
        for _ in range(240):
            new = prefixes() - before
            if new and flowing(next(iter(new))):
                break
            time.sleep(0.25)
        assert len(new) == 1, (new, bench.poll())
        (prefix,) = new
        time.sleep(1.0)  # into the measurement
        assert bench.poll() is None, bench.communicate()
        started = descendants(bench.pid)
        assert started, "the bench's relayer process"
        bench.send_signal(sig)
        try:
            out, err = bench.communicate(timeout=120)
        except subprocess.TimeoutExpired:  # where it hangs, for whoever reads the failure
            stacks = "\n".join(_stacks(p) for p in [bench.pid, *started])
            bench.send_signal(signal.SIGUSR1)  # the bench prints its asyncio tasks
            time.sleep(2.0)
            os.killpg(bench.pid, signal.SIGKILL)
            _out, err = bench.communicate()
            pytest.fail(f"the bench hung after {sig.name}; its threads:\n{stacks}\n"
                        f"its tasks and stderr:\n{err[-12000:]}")
    finally:
        if bench.poll() is None:
            os.killpg(bench.pid, signal.SIGKILL)
            bench.communicate()
        orphans = [p for p in started if running(p)]
        with contextlib.suppress(ProcessLookupError):  # the rest of its group (an
            os.killpg(bench.pid, signal.SIGKILL)      # orphaned relayer): tests share Redis
    assert bench.returncode == 128 + sig and out == "", (bench.returncode, out[-500:])
    assert "bench relayer: the run failed; its broker state:" in err, err[-2000:]
    assert prefix in err and "'s': 32" in err, err[-2000:]
    left = redis_cli(redis_url, "--scan", "--pattern", prefix + ":*")
    assert left.split() == [], left
    assert orphans == [], started


def _stacks(pid: int) -> str:
    """``py-spy dump`` of a live process (its Python threads' stacks, idle ones too)."""
    spy = Path(sys.executable).parent / "py-spy"
    proc = subprocess.run([str(spy), "dump", "--pid", str(pid)],
                          capture_output=True, text=True, timeout=60, check=False)
    return f"-- pid {pid}\n{proc.stdout}{proc.stderr}"


def test_parking_reports_live_rates_the_replay_and_the_hold_without_it() -> None:
    d = _bench("parking", "--frames", "2000", "--hold-window", "0.5")
    base, parked, off = d["baseline"], d["parked"], d["parking_off"]
    # the benchmark checked every seq once, in order, at both subscribers
    assert base["live_frames"] == parked["live_frames"] == 2000
    assert parked["idle_frames"] == 200 and parked["park_replays"] == 1
    assert parked["parked_topics"] == 1 and parked["records_behind_park"] == 2200
    assert _number(parked["replay_s"]) and _number(parked["replayed_records_per_s"])
    assert _number(d["ratios"]["live_with_parked_vs_baseline"])
    # parking off: the shard holds after its first batch (at most 512 records)
    assert off["live_frames_in_window"] <= 512 and off["hold_window_s"] == 0.5
    _machine(d["machine"]["before"])


def test_mesh_reports_saturated_and_paced_runs_against_raw() -> None:
    d = asyncio.run(mesh.run_async([], 20, 64, 4, paced_count=10, paced_rate=50.0))
    assert d["transport"].startswith("in-process")
    for key in ("baseline_raw_rest", "pqcnet_signed_sealed", "baseline_raw_rest_paced",
                "pqcnet_signed_sealed_paced"):
        run = d[key]
        assert run["delivered"] > 0 and run["lost"] == 0 and run["dropped"] == 0, key
        assert _number(run["p50_ms"]) and _number(run["cpu_ms_per_msg"])
    assert _number(d["throughput_ratio_pqcnet_over_raw"])
    assert isinstance(d["paced_p50_over_raw_ms"], float)
    assert isinstance(d["targets"]["met_paced_p50"], bool)
    _machine(d["machine"]["before"])


def test_verify_reports_receipts_and_inclusion_against_the_verify_floor() -> None:
    d = _bench("verify", "--records", "40", "--customers", "4", "--receipts", "4")
    assert d["receipts"] == 4
    for key in ("verify_receipts_per_s", "verify_inclusion_per_s",
                "baseline_mldsa65_verify_per_s", "ratio_vs_verify_floor"):
        assert _number(d[key]), key
    _machine(d["machine_before"])


def test_enroll_reports_rate_latency_and_the_sign_floor() -> None:
    d = _bench("enroll", "--nodes", "4", "--concurrency", "2")
    assert d["enrolled"] == 4 and d["failed"] == 0, d.get("failures_sample")
    for key in ("enrollments_per_s", "baseline_mldsa65_sign_per_s", "ratio_vs_sign"):
        assert _number(d[key]), key
    _latency(d["latency"])
    _machine(d["machine"])


def test_sentry_reports_n_workers_against_nginx_and_the_limit_accuracy() -> None:
    d = _bench("sentry", "--requests", "30", "--seconds", "1", "--connections", "4",
               "--loadgen-procs", "1", "--workers", "2")
    assert _number(d["paths"]["pqcnet"]["rps"]) and d["paths"]["pqcnet"]["errors"] == 0
    assert d["settings"]["request_ids"] is False
    w = d["workers"]
    assert w["workers"] == 2 and _number(w["scaling_rps_vs_1_worker"])
    assert _number(w["pqcnet"]["sentry_cpu_ms_per_rpc"]) and w["pqcnet"]["errors"] == 0
    if "nginx" in w:
        assert _number(w["ratio_rps_pqcnet_to_nginx_same_workers"])
    acc = w["limit_accuracy"]
    assert acc["admitted"] > 0 and acc["refused"] > 0 and _number(acc["ratio"])
    half = d["paths"]["pqcnet"]["at_half_load"]
    assert half["offered_rps"] > 0 and half["achieved_rps"] > 0 and _number(half["p99_ms"])
    # CPU per RPC and busy fraction of the sidecar and sentry, sequential and at half
    # load (/proc tick resolution: a tiny run may read 0; never negative or > the cores)
    for cpu in (d["paths"]["pqcnet"]["sequential_cpu"], half["cpu"]):
        for who in ("sidecar", "sentry", "backend"):
            assert _number(cpu[f"{who}_cpu_ms_per_rpc"])
            assert _number(cpu[f"{who}_busy"]) and cpu[f"{who}_busy"] <= d["cpus"]
            # time runnable but waiting for a core (schedstat, ns resolution)
            assert _number(cpu[f"{who}_runq_ms_per_rpc"])
        assert 0 < cpu["machine_busy"] <= 1
    assert "cpu" not in d["paths"]["direct"]["at_half_load"]
    _split(half, half["sent"] + half["warm_up"])  # + one untimed request per connection
    assert "hops" not in d["paths"]["direct"]["at_half_load"]
    added = d["pqcnet_added_latency_at_half_load_ms"]
    assert "p99" in added and "p99_asyncio_client" in added
    # vegeta comes with the NATS baseline (`scripts/services install`): in CI it must run
    if _services_env().get("PQCNET_VEGETA") or os.environ.get("PQCNET_REQUIRE_SERVICES") == "1":
        assert added["driver"] == "vegeta"
        for path in d["paths"].values():
            vg = path["at_half_load_vegeta"]
            assert vg["counted"] > 0 and vg["errors"] == 0 and _number(vg["p99_ms"])
            assert vg["offered_rps"] == half["offered_rps"]
        assert _number(d["paths"]["pqcnet"]["at_half_load_vegeta"]["cpu"]["sentry_busy"])
        vg = d["paths"]["pqcnet"]["at_half_load_vegeta"]
        _split(vg, vg["sent"])


def _split(run: dict[str, Any], sent: int) -> None:
    """The sentry's own histograms counted exactly the requests the run sent, and each
    hop's mean time is inside the one before it."""
    hops = run["hops"]
    assert hops["requests"] == sent, (hops, sent)
    assert (hops["sidecar_round_trip_mean_ms"] >= hops["sentry_mean_ms"]
            >= hops["upstream_mean_ms"] > 0), hops
    assert hops["sentry_own_mean_ms"] == pytest.approx(
        hops["sentry_mean_ms"] - hops["upstream_mean_ms"], abs=0.002)
    assert hops["tunnel_and_wakeups_mean_ms"] == pytest.approx(
        hops["sidecar_round_trip_mean_ms"] - hops["sentry_mean_ms"], abs=0.002)


def test_websocket_reports_open_round_trip_and_echoes_against_direct() -> None:
    d = _bench("websocket", "--connects", "5", "--messages", "20", "--connections", "2",
               "--window", "4", "--seconds", "0.5")
    assert {"direct", "pqcnet"} <= set(d["paths"])
    for path in d["paths"].values():
        _latency(path["connect"])
        _latency(path["round_trip"])
        assert path["connect"]["n"] == 5 and path["round_trip"]["n"] == 20
        assert path["throughput"]["messages"] > 0  # every echo sent came back (else a hang)
    cpu = d["paths"]["pqcnet"]["throughput"]
    for who in ("sidecar", "sentry"):
        assert _number(cpu[f"{who}_cpu_us_per_message"]) and cpu[f"{who}_busy"] <= d["cpus"]
    assert "sidecar_busy" not in d["paths"]["direct"]["throughput"]
    assert _number(d["ratio_messages_per_s_pqcnet_to_direct"])
    if "nginx" in d["paths"]:
        assert _number(d["ratio_messages_per_s_pqcnet_to_nginx"])
    limited = d["pipe_rate"]  # the tenant held to half of what its pipe moved
    assert limited["share"] == 0.5 and limited["messages"] > 0
    assert limited["limit_bytes_per_s"] == pytest.approx(
        0.5 * limited["unlimited_bytes_per_s"], rel=0.01)
    assert _number(limited["accuracy"]) and isinstance(limited["within_10_percent"], bool)
    _machine(d["machine"]["before"])


def test_sentry_without_a_working_vegeta_says_so_and_keeps_its_own_figures() -> None:
    d = _bench("sentry", "--requests", "20", "--seconds", "0.5", "--connections", "2",
               "--loadgen-procs", "1", "--workers", "1", env={"PQCNET_VEGETA": "/bin/false"})
    added = d["pqcnet_added_latency_at_half_load_ms"]
    assert added["driver"] == "asyncio client" and added["vegeta_failed"].startswith("direct")
    assert all("at_half_load_vegeta" not in path for path in d["paths"].values())
    assert added["p99"] == added["p99_asyncio_client"]


def test_sentry_sweep_reports_the_latency_curve_and_draws_it(tmp_path: Path) -> None:
    png = tmp_path / "curve.png"
    d = _bench("sentry", "--requests", "20", "--seconds", "0.5", "--connections", "2",
               "--loadgen-procs", "1", "--workers", "1", "--sweep", "0.5,0.2,0.5",
               "--plot", str(png), "--request-ids")
    # unique x-request-ids (as traced apps send) pass the sidecar and sentry untouched
    assert d["settings"]["request_ids"] is True
    assert all(path["errors"] == 0 and path["at_half_load"]["errors"] == 0
               for path in d["paths"].values())
    sw = d["sweep"]
    points = sw["points"]
    assert [p["fraction"] for p in points] == [0.2, 0.5]  # sorted, the repeat once
    assert points[0]["offered_rps"] < points[1]["offered_rps"]
    for p in points:
        for name in ("direct", "pqcnet", *(["nginx"] if "nginx" in d["paths"] else [])):
            assert p[name]["errors"] == 0 and _number(p[name]["p99_ms"]), (name, p)
            assert p[name]["p50_ms"] <= p[name]["p99_ms"]
        assert p["pqcnet_added_p99_ms"] == round(p["pqcnet"]["p99_ms"]
                                                 - p["direct"]["p99_ms"], 3)
        assert 0 <= p["pqcnet"]["cpu"]["sentry_busy"] <= d["cpus"]
        assert _number(p["pqcnet"]["cpu"]["sidecar_cpu_ms_per_rpc"])
        assert 0 < p["pqcnet"]["cpu"]["machine_busy"] <= 1
        assert p["pqcnet"]["hops"]["requests"] > 0
        assert "cpu" not in p["direct"] and "hops" not in p["direct"]
    # the verdict follows from the points: the largest leading fraction under the target
    upto = None
    for p in points:
        if p["pqcnet_added_p99_ms"] > sw["added_p99_target_ms"]:
            break
        upto = p["fraction"]
    assert sw["target_holds_up_to_fraction"] == upto
    if _services_env().get("PQCNET_VEGETA") or os.environ.get("PQCNET_REQUIRE_SERVICES") == "1":
        assert {p[n]["driver"] for p in points for n in ("direct", "pqcnet")} == {"vegeta"}
    assert sw["plot"] == str(png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


@pytest.mark.parametrize(("args", "message"), [
    (("--sweep", "0.5,0"), "fractions must be in (0, 1]"),
    (("--sweep", "1.5"), "fractions must be in (0, 1]"),
    (("--sweep", "0.5,half"), "not a comma-separated list of numbers"),
    (("--sweep", ",".join(str(i / 100) for i in range(1, 23))), "at most 20 points"),
    (("--plot", "x.png"), "give --sweep too"),
    (("--sweep", "0.5", "--plot", "/nonexistent-pqcnet-dir/x.png"),
     "no directory '/nonexistent-pqcnet-dir'"),
])
def test_sentry_sweep_refuses_bad_settings_before_running(args: tuple[str, ...],
                                                          message: str) -> None:
    proc = subprocess.run([PQCNET, "bench", "sentry", *args], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_sentry_plot_without_matplotlib_is_refused_before_the_run(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from pqcnet.bench import _plot
    from pqcnet.bench import sentry as bench_sentry

    def must_not_run(*_a: object) -> None:
        raise AssertionError("the bench ran although --plot cannot be honoured")

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails, as uninstalled
    monkeypatch.setattr(bench_sentry, "run", must_not_run)
    assert not _plot.available()
    res = CliRunner().invoke(bench_sentry.cli, ["--sweep", "0.5", "--plot", "x.png"])
    assert res.exit_code == 2 and "pip install 'pqcnet[sim]'" in res.output


def test_memory_reports_rss_of_a_real_relayer_and_sentry_against_idle() -> None:
    d = _bench("memory", "--topics", "400", "--active", "40", "--rounds", "1",
               "--tunnels", "64", "--concurrency", "8", "--epoch-seconds", "2")
    r, s = d["relayer"], d["sentry"]
    assert r["epoch_seconds"] == 2.0
    assert r["received"] == 40  # the last send's frames all delivered
    assert r["seen"]["topics"] == 400 and _number(r["seen"]["rss_mib"])
    assert r["peak_rss_mib"] >= r["idle_rss_mib"] > 0
    assert s["tunnels"]["open"] == 64 and s["tunnels"]["failed"] == 0
    assert s["rss_mib"] > s["idle_rss_mib"] > 0  # 64 tunnels held open cost memory
    assert d["rlimit_nofile"] >= 64 and set(d["targets"]) == {"relayer_under_1gib",
                                                              "sentry_under_1gib"}
