"""The Helm chart against a REAL Kubernetes control plane (tools/kcluster.py: etcd,
kube-apiserver, controller-manager, scheduler and kwok's fake node, built by
``scripts/deploy-tools install``), started once for this module on 127.0.0.1.

- ``helm install --dry-run=server`` of default, minimal and production-like values
  (rendered with the server's capabilities, validated against its OpenAPI schema), and
  the manifest it renders through ``kubectl apply --dry-run=server``: the API server's
  own validation and admission, Pod Security "restricted" enforced and warned on the
  namespace (helm 3's server dry run sends no object to the server by itself);
- ``helm install --wait`` then ``helm upgrade --wait``: the Deployment and StatefulSet
  controllers roll the pods out (kwok reports them Running/Ready, its volume stages bind
  the relayers' PVCs), and the upgrade completes a new ReplicaSet / StatefulSet revision;
- each relayer pod mounts only its own identity Secret;
- bad values: refused by ``values.schema.json`` before anything reaches the server;
  what only the server knows (requests above limits) refused by the server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT
from tests.deploy.conftest import require_tool

sys.path.insert(0, str(ROOT / "tools"))
from kcluster import Cluster

CHART = ROOT / "helm" / "pqcnet"
VALUES = {"default": None, "minimal": CHART / "ci" / "minimal-values.yaml",
          "production": CHART / "ci" / "production-values.yaml"}
#: the namespaces' Pod Security level: the chart's pods must pass "restricted"
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted",
              "pod-security.kubernetes.io/enforce-version": "latest",
              # enforce checks pods only; warn also checks workloads' pod templates
              "pod-security.kubernetes.io/warn": "restricted",
              "pod-security.kubernetes.io/warn-version": "latest"}

pytestmark = pytest.mark.timeout(600)


class Kube:
    """helm and kubectl bound to the test cluster (helm's state in the temp dir)."""

    def __init__(self, cluster: Cluster, helm: str, home: Path) -> None:
        self.cluster = cluster
        self.helm_bin = helm
        self.env = dict(os.environ, KUBECONFIG=str(cluster.kubeconfig),
                        HELM_CACHE_HOME=str(home / "cache"),
                        HELM_CONFIG_HOME=str(home / "config"),
                        HELM_DATA_HOME=str(home / "data"))

    def helm(self, *args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.helm_bin, *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def kubectl(self, *args: str, input: str | None = None,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.cluster.kubectl(*args, input=input, check=check)

    def server_dry_run(self, ns: str, release: str,
                       values: Path | None) -> tuple[subprocess.CompletedProcess[str],
                                                     subprocess.CompletedProcess[str] | None]:
        """``helm install --dry-run=server``, then its manifest through the API server's
        validation and admission (``kubectl apply --dry-run=server``)."""
        out = self.helm("install", release, str(CHART), "-n", ns, "--dry-run=server",
                        "-o", "json", *_values_args(values))
        if out.returncode != 0:
            return out, None
        manifest = json.loads(out.stdout)["manifest"]
        return out, self.kubectl("apply", "--dry-run=server", "-n", ns, "-f", "-",
                                 input=manifest, check=False)

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def namespace(self, name: str) -> str:
        doc = {"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": name, "labels": RESTRICTED}}
        self.kubectl("apply", "-f", "-", input=json.dumps(doc))
        return name

    def identity_secret(self, ns: str, name: str) -> None:
        """A Secret of the layout the chart mounts (contents: stand-ins — kwok's pods
        run no container, so nothing reads them)."""
        data = {f: f"stand-in {f} of {name}\n" for f in ("key.pem", "cert.pem", "bundle.pem")}
        doc = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
               "metadata": {"name": name, "namespace": ns}, "stringData": data}
        self.kubectl("apply", "-f", "-", input=json.dumps(doc))


@pytest.fixture(scope="module")
def kube(helm: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    bin_dir = Path(require_tool("PQCNET_K8S_BIN", "kube-apiserver/etcd/kwok (k8s tools)"))
    stages = Path(require_tool("PQCNET_KWOK_STAGES", "kwok stages"))
    root = tmp_path_factory.mktemp("kcluster")
    cluster = Cluster(root, bin_dir, stages, die_with_parent=True)
    cluster.up()
    try:
        k = Kube(cluster, helm, root / "helm")
        # Stand-ins for the Prometheus Operator CRDs the production values use (open
        # schemas: the operator's own schemas are not checked here).
        k.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(
            [_crd("ServiceMonitor", "servicemonitors"), _crd("PrometheusRule", "prometheusrules")]))
        k.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                  "crd/servicemonitors.monitoring.coreos.com",
                  "crd/prometheusrules.monitoring.coreos.com")
        yield k
    finally:
        cluster.down()


def _crd(kind: str, plural: str) -> dict[str, Any]:
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.monitoring.coreos.com"},
            "spec": {"group": "monitoring.coreos.com", "scope": "Namespaced",
                     "names": {"kind": kind, "plural": plural, "singular": kind.lower(),
                               "listKind": f"{kind}List"},
                     "versions": [{"name": "v1", "served": True, "storage": True, "schema": {
                         "openAPIV3Schema": {"type": "object",
                                             "x-kubernetes-preserve-unknown-fields": True}}}]}}


def _values_args(values: Path | None) -> list[str]:
    return ["-f", str(values)] if values is not None else []


@pytest.mark.parametrize("name", list(VALUES))
def test_dry_run_server_accepts_every_values_file(kube: Kube, name: str) -> None:
    ns = kube.namespace(f"dry-{name}")
    out, applied = kube.server_dry_run(ns, f"p-{name}", VALUES[name])
    assert out.returncode == 0, out.stderr
    assert applied is not None and applied.returncode == 0, applied.stderr
    assert "PodSecurity" not in applied.stderr, applied.stderr  # restricted: no warning
    kinds = {d["kind"] for d in yaml.safe_load_all(json.loads(out.stdout)["manifest"]) if d}
    assert {"Deployment", "Service", "ConfigMap"} <= kinds
    if name != "minimal":
        assert {"StatefulSet", "PodDisruptionBudget", "NetworkPolicy"} <= kinds
    if name == "production":
        assert {"ServiceMonitor", "PrometheusRule", "HorizontalPodAutoscaler"} <= kinds
    # the namespace's restricted level is really enforced: a plain pod is refused
    plain = kube.kubectl("run", "plain", "-n", ns, "--image=pqcnet-sentry:0.1.0",
                         "--dry-run=server", check=False)
    assert plain.returncode != 0 and "violates PodSecurity" in plain.stderr, plain.stderr
    # every object went through the server ("... created (server dry run)"), none stayed
    lines = [ln for ln in applied.stdout.splitlines() if ln.strip()]
    assert lines and all(ln.endswith("(server dry run)") for ln in lines), applied.stdout
    assert len(lines) == sum(1 for d in yaml.safe_load_all(json.loads(out.stdout)["manifest"])
                             if d)
    assert kube.get("all", "-n", ns)["items"] == []


def test_server_refuses_what_only_it_can_check(kube: Kube, tmp_path: Path) -> None:
    """requests above limits: no values schema can know it (two free-form quantities),
    kubeconform's per-field schemas neither — the API server refuses it."""
    ns = kube.namespace("refuse")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"relayer": {"enabled": False}, "sentry": {
        "resources": {"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}}}}))
    out, applied = kube.server_dry_run(ns, "x", bad)
    assert out.returncode == 0, out.stderr  # the chart and the OpenAPI schema let it through
    assert applied is not None and applied.returncode != 0
    assert "must be less than or equal to memory limit" in applied.stderr, applied.stderr
    # and a real install is refused by the server the same way
    out = kube.helm("install", "x", str(CHART), "-n", ns, "-f", str(bad))
    assert out.returncode != 0
    assert "must be less than or equal to memory limit" in out.stderr, out.stderr
    status = json.loads(kube.helm("status", "x", "-n", ns, "-o", "json").stdout)
    assert status["info"]["status"] == "failed"
    assert kube.get("deployments", "-n", ns)["items"] == []


@pytest.mark.parametrize(("values", "needle"), [
    ({"sentry": {"fullnameOverride": "Pqcnet_Sentry"}}, "fullnameOverride"),
    ({"relayer": {"nameOverride": "relayer.v2"}}, "nameOverride"),
    ({"relayer": {"config": {"shards": "many"}}}, "shards"),
])
def test_schema_refuses_bad_values_before_the_server(
        kube: Kube, tmp_path: Path, values: dict[str, Any], needle: str) -> None:
    """An invalid resource name would reach the API server as an object it refuses
    (RFC 1123); the values schema catches it first, and nothing is created."""
    ns = kube.namespace("schema")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(values))
    out = kube.helm("install", "bad", str(CHART), "-n", ns, "-f", str(bad))
    assert out.returncode != 0
    assert "values don't meet the specifications of the schema" in out.stderr, out.stderr
    assert needle in out.stderr, out.stderr
    assert kube.helm("list", "-n", ns, "-a", "-q").stdout.strip() == ""
    assert kube.get("secrets", "-n", ns)["items"] == []


def _rollout_values(tmp_path: Path) -> Path:
    path = tmp_path / "rollout.yaml"
    path.write_text(yaml.safe_dump({
        "sentry": {"replicaCount": 2, "autoscaling": {"enabled": False},
                   "existingSecret": "sentry-identity"},
        "relayer": {"replicaCount": 2, "existingSecret": "relayer-identity"},
    }))
    return path


def _relayer_state(kube: Kube, ns: str, name: str) -> dict[str, Any]:
    sts = kube.get("statefulset", name, "-n", ns)
    status: dict[str, Any] = sts["status"]
    return status


def test_install_and_upgrade_roll_out_with_wait(kube: Kube, tmp_path: Path) -> None:
    ns = kube.namespace("rollout")
    kube.identity_secret(ns, "sentry-identity")
    relayers = ["r-relayer-0", "r-relayer-1"]
    for i in range(len(relayers)):
        kube.identity_secret(ns, f"relayer-identity-{i}")
    values = _rollout_values(tmp_path)

    out = kube.helm("install", "r", str(CHART), "-n", ns, "-f", str(values),
                    "--wait", "--timeout", "5m")
    assert out.returncode == 0, out.stderr
    dep = kube.get("deployment", "r-sentry", "-n", ns)
    assert dep["status"]["readyReplicas"] == 2
    rs_before = _replicasets(kube, ns)
    sts_before = {}
    for name in relayers:
        st = _relayer_state(kube, ns, name)
        assert st["readyReplicas"] == 1, st
        sts_before[name] = st["updateRevision"]
    pvcs = kube.get("pvc", "-n", ns)["items"]
    assert sorted(p["metadata"]["name"] for p in pvcs) == [f"data-{r}-0" for r in relayers]
    assert all(p["status"]["phase"] == "Bound" for p in pvcs)
    _check_relayer_secrets(kube, ns, relayers)

    # Upgrade: a new image tag and a relayer config value.
    out = kube.helm("upgrade", "r", str(CHART), "-n", ns, "-f", str(values),
                    "--set", "global.imageTag=0.1.1", "--set", "relayer.config.shards=64",
                    "--wait", "--timeout", "5m")
    assert out.returncode == 0, out.stderr
    status = json.loads(kube.helm("status", "r", "-n", ns, "-o", "json").stdout)
    assert status["version"] == 2 and status["info"]["status"] == "deployed"

    dep = kube.get("deployment", "r-sentry", "-n", ns)
    assert dep["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "2"
    assert dep["status"]["updatedReplicas"] == dep["status"]["readyReplicas"] == 2
    rs_after = _replicasets(kube, ns)
    new_rs = set(rs_after) - set(rs_before)
    assert len(new_rs) == 1, (rs_before, rs_after)
    assert rs_after[new_rs.pop()] == ("pqcnet-sentry:0.1.1", 2)
    assert all(rs_after[name][1] == 0 for name in rs_before)  # the old one scaled down
    for name in relayers:
        st = _relayer_state(kube, ns, name)
        assert st["updateRevision"] != sts_before[name]
        assert st["currentRevision"] == st["updateRevision"] and st["readyReplicas"] == 1, st
    pods = kube.get("pods", "-n", ns, "-l", "app.kubernetes.io/component=relayer")["items"]
    assert sorted(p["metadata"]["name"] for p in pods) == [f"{r}-0" for r in relayers]
    for p in pods:
        assert p["spec"]["containers"][0]["image"] == "pqcnet-relayer:0.1.1"
        assert p["status"]["phase"] == "Running"
    cm = kube.get("configmap", "r-relayer", "-n", ns)
    for name in relayers:
        conf = yaml.safe_load(cm["data"][f"{name}.yaml"])["relayer"]
        assert conf["shards"] == 64 and conf["node_id"] == name


def _replicasets(kube: Kube, ns: str) -> dict[str, tuple[str, int]]:
    items = kube.get("rs", "-n", ns, "-l", "app.kubernetes.io/component=sentry")["items"]
    return {rs["metadata"]["name"]: (rs["spec"]["template"]["spec"]["containers"][0]["image"],
                                     rs["status"].get("readyReplicas", 0)) for rs in items}


def _check_relayer_secrets(kube: Kube, ns: str, relayers: list[str]) -> None:
    """Each relayer pod's only Secret is its own, mounted read-only as files."""
    for i, name in enumerate(relayers):
        pod = kube.get("pod", f"{name}-0", "-n", ns)
        spec = pod["spec"]
        secrets = [v["secret"] for v in spec["volumes"] if "secret" in v]
        assert secrets == [{"secretName": f"relayer-identity-{i}", "defaultMode": 0o400}]
        env_refs = [e for c in spec["containers"] for e in c.get("env", [])
                    if "secretKeyRef" in e.get("valueFrom", {})]
        assert env_refs == []
        mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
        assert mounts["identity"]["readOnly"] is True
        conf = yaml.safe_load(kube.get("configmap", "r-relayer", "-n", ns)["data"][f"{name}.yaml"])
        assert conf["relayer"]["identity_dir"] == mounts["identity"]["mountPath"]


def test_failed_upgrade_keeps_the_sentries_serving_and_rolls_back(
        kube: Kube, tmp_path: Path) -> None:
    """The health gate: an upgrade whose new pods never get ready (here: a node
    selector no node matches) fails `--wait`, the old sentries keep serving all along
    (maxUnavailable 0), and `helm rollback` restores the previous revision."""
    ns = kube.namespace("gate")
    kube.identity_secret(ns, "sentry-identity")
    values = tmp_path / "gate.yaml"
    values.write_text(yaml.safe_dump({
        "relayer": {"enabled": False},
        "sentry": {"replicaCount": 2, "autoscaling": {"enabled": False},
                   "existingSecret": "sentry-identity"}}))
    out = kube.helm("install", "g", str(CHART), "-n", ns, "-f", str(values),
                    "--wait", "--timeout", "5m")
    assert out.returncode == 0, out.stderr
    before = _replicasets(kube, ns)
    assert list(before.values()) == [("pqcnet-sentry:0.1.0", 2)]

    out = kube.helm("upgrade", "g", str(CHART), "-n", ns, "-f", str(values),
                    "--set", "global.imageTag=0.2.0",
                    "--set", "sentry.nodeSelector.pqcnet\\.io/pool=nowhere",
                    "--wait", "--timeout", "20s")
    assert out.returncode != 0
    assert "context deadline exceeded" in out.stderr or "timed out" in out.stderr, out.stderr
    status = json.loads(kube.helm("status", "g", "-n", ns, "-o", "json").stdout)
    assert status["version"] == 2 and status["info"]["status"] == "failed"
    during = _replicasets(kube, ns)
    assert during[next(iter(before))] == ("pqcnet-sentry:0.1.0", 2)  # still serving
    stuck = [rs for name, rs in during.items() if name not in before]
    assert stuck == [("pqcnet-sentry:0.2.0", 0)]  # the surge pod never got ready
    pending = kube.get("pods", "-n", ns, "--field-selector=status.phase=Pending")["items"]
    assert len(pending) == 1

    out = kube.helm("rollback", "g", "1", "-n", ns, "--wait", "--timeout", "5m")
    assert out.returncode == 0, out.stderr
    status = json.loads(kube.helm("status", "g", "-n", ns, "-o", "json").stdout)
    assert status["version"] == 3 and status["info"]["status"] == "deployed"
    after = _replicasets(kube, ns)
    assert after[next(iter(before))] == ("pqcnet-sentry:0.1.0", 2)
    assert all(after[name][1] == 0 for name in after if name not in before)
    assert kube.get("pods", "-n", ns, "--field-selector=status.phase=Pending")["items"] == []
