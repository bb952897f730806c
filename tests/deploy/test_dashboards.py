"""The Grafana dashboards as code (dashboards/build.py): the committed JSON is exactly
the generator's output; every metric a query names is one the product exports (found
in the source, f-string names included); the provisioning files point at the same
datasource uid and dashboard folder as compose.yaml mounts. Running every query against
a live Prometheus is tests/deploy/test_compose.py::test_every_dashboard_query_runs.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import ROOT

from .conftest import load_dashboards, metric_exported

dashboards = load_dashboards()

#: PromQL words that are not metric names
_PROMQL = {"sum", "by", "max", "min", "avg", "rate", "increase", "histogram_quantile", "le",
           "without", "on", "and", "or", "unless", "clamp_min"}
_KNOWN_RUNTIME = re.compile(r"^(up|process_[a-z_]+|python_[a-z_]+)$")


def committed() -> dict[str, dict[str, object]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(dashboards.OUT.glob("*.json"))}


def metric_names(expr: str) -> set[str]:
    expr = re.sub(r'\{[^}]*\}', "", expr)          # label matchers
    expr = re.sub(r"by \([^)]*\)", "", expr)       # grouping labels
    expr = re.sub(r"\[[^\]]*\]", "", expr)         # range selectors
    return {w for w in re.findall(r"[a-z_][a-z0-9_]*", expr) if w not in _PROMQL}


def test_committed_json_is_the_generator_output() -> None:
    res = subprocess.run([sys.executable, str(ROOT / "dashboards" / "build.py"), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert set(committed()) == set(dashboards.DASHBOARDS)
    for uid, doc in committed().items():
        assert doc == dashboards.build(uid)


def test_the_six_dashboards_and_money_identity() -> None:
    titles = {d["title"] for d in committed().values()}
    assert titles == {"pqcnet / money", "pqcnet / relay flow", "pqcnet / sentry edge",
                      "pqcnet / control plane", "pqcnet / ledger",
                      "pqcnet / process internals"}
    money = [e for _t, e in dashboards.queries(committed()["pqcnet-money"])]
    assert any('state="metered"' in e and 'state="proved"' in e and 'state="pending"' in e
               for e in money), "no metered = proved + pending panel"


def test_every_query_names_only_exported_metrics() -> None:
    unknown = {}
    for uid, doc in committed().items():
        for title, expr in dashboards.queries(doc):
            for name in metric_names(expr):
                if _KNOWN_RUNTIME.match(name) or metric_exported(name):
                    continue
                unknown.setdefault(f"{uid}: {title}", []).append(name)
    assert not unknown, f"metrics no node exports: {unknown}"


def test_the_checker_catches_a_made_up_metric() -> None:
    assert not metric_exported("pqcnet_relayer_made_up_money")
    assert metric_exported("pqcnet_relayer_delivered_frames_total")  # f-string name
    assert not metric_exported("pqcnet_relayer_made_up_frames")  # template, unknown value


def test_quiet_panels_exist() -> None:
    titles = {t for doc in committed().values() for t, _e in dashboards.queries(doc)}
    assert set(dashboards.QUIET) <= titles, set(dashboards.QUIET) - titles


def test_provisioning_matches_the_panels_and_compose() -> None:
    prov = ROOT / "dashboards" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text())
    assert [d["uid"] for d in ds["datasources"]] == [dashboards.DATASOURCE.uid]
    for doc in committed().values():
        for panel in doc["panels"]:  # type: ignore[attr-defined]
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] == dashboards.DATASOURCE.uid
    providers = yaml.safe_load((prov / "dashboards" / "pqcnet.yaml").read_text())["providers"]
    path = providers[0]["options"]["path"]
    grafana = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["grafana"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in grafana["volumes"]}
    assert mounts["./dashboards/json"] == path
    assert mounts["./dashboards/provisioning"] == "/etc/grafana/provisioning"


def test_generated_files_are_not_hand_edited(tmp_path: Path) -> None:
    """A hand edit of a generated file is caught by --check (so the check above cannot
    pass by comparing a file with itself)."""
    out = tmp_path / "json"
    out.mkdir()
    for p in dashboards.OUT.glob("*.json"):
        (out / p.name).write_text(p.read_text())
    check = [sys.executable, str(ROOT / "dashboards" / "build.py"), "--check", "--out", str(out)]
    assert subprocess.run(check, capture_output=True, timeout=120).returncode == 0
    victim = out / "pqcnet-money.json"
    victim.write_text(victim.read_text().replace("metered", "metred", 1))
    res = subprocess.run(check, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "pqcnet-money.json" in res.stderr
