"""The Helm chart (helm/pqcnet): its values schema agrees with the config schema the
nodes validate at start, it lints strictly, every values file renders to manifests
that kubeconform validates strictly against the Kubernetes OpenAPI schemas of the
pinned version, the rendered node config files are valid configs, the pods are
restricted, and bad values are refused with a message naming the bad key.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from pqcnet.relayer.config import RelayerFile
from pqcnet.runtime.schema import json_schema
from pqcnet.sentry.schema import SentryFile
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import helmschema

CHART = ROOT / "helm" / "pqcnet"
VALUES = {"default": None, "minimal": CHART / "ci" / "minimal-values.yaml",
          "production": CHART / "ci" / "production-values.yaml"}
#: CRD kinds (Prometheus Operator): not in the Kubernetes OpenAPI spec
CRD_KINDS = "ServiceMonitor,PrometheusRule"

pytestmark = pytest.mark.timeout(300)


def _template(helm: str, values: Path | None, *extra: str) -> subprocess.CompletedProcess[str]:
    args = [helm, "template", "t", str(CHART)]
    if values is not None:
        args += ["-f", str(values)]
    return subprocess.run([*args, *extra], capture_output=True, text=True, timeout=120)


def _docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def test_values_schema_is_generated_from_the_config_schema() -> None:
    assert helmschema.main(["--check"]) == 0, "run: python tools/helmschema.py"
    for role in ("sentry", "relayer"):
        values = helmschema.values_schema(role)
        full = json_schema(role)
        config = full["$defs"]["RelayerConfig"] if role == "relayer" else full
        props = values["properties"]["config"]["properties"]
        managed = set(helmschema.MANAGED[role])
        # every key the node accepts, except the chart-managed ones, with the same schema
        assert set(props) == set(config["properties"]) - managed
        for key, sub in props.items():
            assert sub == config["properties"][key], (role, key)
        assert values["properties"]["config"]["additionalProperties"] is False
        for name, sub in values["$defs"].items():
            assert sub == full["$defs"][name], (role, name)


def test_helm_lint_strict(helm: str) -> None:
    for name, values in VALUES.items():
        args = [helm, "lint", "--strict", str(CHART)] + (["-f", str(values)] if values else [])
        out = subprocess.run(args, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, (name, out.stdout, out.stderr)


@pytest.mark.parametrize("name", list(VALUES))
def test_rendered_manifests_pass_kubeconform_strict(
        helm: str, kubeconform: tuple[str, Path, str], name: str, tmp_path: Path) -> None:
    out = _template(helm, VALUES[name])
    assert out.returncode == 0, out.stderr
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(out.stdout)
    binary, schemas, version = kubeconform
    location = (f"{schemas}/{{{{ .NormalizedKubernetesVersion }}}}-standalone"
                "{{ .StrictSuffix }}/{{ .ResourceKind }}{{ .KindSuffix }}.json")
    res = subprocess.run([binary, "-strict", "-summary", "-kubernetes-version", version,
                          "-schema-location", location, "-skip", CRD_KINDS, str(manifest)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Invalid: 0, Errors: 0" in res.stdout, res.stdout
    docs = _docs(out.stdout)
    _check_pods_restricted(docs)
    _check_node_configs(docs)


def _check_pods_restricted(docs: list[dict[str, Any]]) -> None:
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    assert workloads
    for w in workloads:
        pod = w["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
        for c in pod["containers"]:
            assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
            assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        # keys only as mounted Secret files
        secrets = [v for v in pod["volumes"] if "secret" in v]
        assert all(v["secret"]["defaultMode"] == 0o400 for v in secrets)
        if w["kind"] == "StatefulSet":
            assert w["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


def _check_node_configs(docs: list[dict[str, Any]]) -> None:
    """The config files the chart renders validate against the nodes' own schema."""
    for cm in (d for d in docs if d["kind"] == "ConfigMap"):
        for key, text in cm["data"].items():
            if not key.endswith(".yaml"):
                continue
            doc = yaml.safe_load(text)
            kind = "relayer" if "relayer" in doc else "sentry"
            jsonschema.validate(doc, json_schema(kind))
            if kind == "relayer":
                RelayerFile.model_validate(doc)
                assert doc["relayer"]["node_id"] == key.removesuffix(".yaml")
            else:
                SentryFile.model_validate(doc)
                assert doc["metrics_host"] == "0.0.0.0"


@pytest.mark.parametrize(("values", "needle"), [
    ({"sentry": {"config": {"limits": {"default": {"rate": "fast"}}}}}, "rate"),
    ({"sentry": {"config": {"listen": "0.0.0.0:1"}}}, "listen"),
    ({"relayer": {"config": {"backend": "carrier-pigeon"}}}, "backend"),
    ({"relayer": {"existingSecret": ""}}, "existingSecret"),
    ({"sentry": {"replicaCount": 0}}, "replicaCount"),
])
def test_bad_values_are_refused_with_a_clear_message(
        helm: str, tmp_path: Path, values: dict[str, Any], needle: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(values))
    out = _template(helm, bad)
    assert out.returncode != 0
    assert "values don't meet the specifications of the schema" in out.stderr, out.stderr
    assert needle in out.stderr, out.stderr
