"""The alert rules (helm/pqcnet/files/alerts.yaml): valid for Prometheus, unit-tested
with ``promtool test rules`` (every alert has a case), and every alert's runbook_url
names an existing runbook page and heading."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from tests.conftest import ROOT
from tests.docs.markdown import anchors

from .conftest import metric_exported

RULES = ROOT / "helm" / "pqcnet" / "files" / "alerts.yaml"
CASES = ROOT / "tests" / "deploy" / "data" / "alerts_test.yaml"

pytestmark = pytest.mark.timeout(120)


def _alerts() -> list[dict[str, object]]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def test_promtool_check_rules(promtool: str) -> None:
    out = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in out.stdout


def test_promtool_test_rules(promtool: str) -> None:
    out = subprocess.run([promtool, "test", "rules", str(CASES)], capture_output=True,
                         text=True, timeout=60, cwd=CASES.parent)
    assert out.returncode == 0, out.stdout + out.stderr
    tested = {t["alertname"] for case in yaml.safe_load(CASES.read_text())["tests"]
              for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert {str(a["alert"]) for a in _alerts()} <= tested, "an alert without a firing case"


def test_every_alert_links_to_a_runbook_section() -> None:
    for rule in _alerts():
        url = str(rule["annotations"]["runbook_url"])  # type: ignore[index]
        page, _, anchor = url.partition("#")
        path = ROOT / page
        assert path.is_file() and path.parent == ROOT / "runbook", (rule["alert"], url)
        assert anchor in anchors(path), (rule["alert"], url)


def test_every_alert_metric_is_exported_by_the_code() -> None:
    """An alert on a metric no node exports never fires: each ``pqcnet_*`` series an
    expression names must be registered somewhere in src/pqcnet (counters without their
    ``_total`` suffix, as prometheus_client adds it)."""
    for rule in _alerts():
        for name in set(re.findall(r"\bpqcnet_[a-z0-9_]+", str(rule["expr"]))):
            assert metric_exported(name), (rule["alert"], name)
