"""Generate the Helm charts' ``values.schema.json`` from the config schema the nodes
validate at start (:func:`pqcnet.runtime.schema.json_schema`): one source of truth.

    python tools/helmschema.py          # (re)write helm/pqcnet/**/values.schema.json
    python tools/helmschema.py --check  # exit 1 if a committed file is stale

Each role subchart's ``config`` value IS the role's config file (the relayer's inner
``relayer:`` keys), less the keys the chart sets itself because they follow from the
pod (:data:`MANAGED`: listen address, identity directory mounted from the Secret, data
directories on the volume, the operations port the probes use). Setting one of those in
``config`` is refused by the schema (``additionalProperties: false``), like any unknown
key. The rest of each schema (image, replicas, secrets, probes, autoscaling, policies)
is written here.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

from pqcnet.runtime.schema import DIALECT, json_schema

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "pqcnet"

#: config keys the chart sets from the pod's layout (templates/configmap.yaml)
MANAGED: dict[str, tuple[str, ...]] = {
    "sentry": ("listen", "identity_dir", "metrics_port", "metrics_host", "ledger"),
    "relayer": ("node_id", "listen_host", "listen_port", "identity_dir", "data_dir",
                "ledger_dir", "metrics_port", "metrics_host"),
}

_STR = {"type": "string"}
_OBJ = {"type": "object"}
_BOOL = {"type": "boolean"}
_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
#: a name the chart builds object names from: an RFC 1123 label (what the API server
#: accepts), short enough for the suffixes the chart and the controllers append
#: (-headless, -<i>, the StatefulSet's -<revision hash>)
_NAME = {"type": "string", "maxLength": 40, "pattern": "^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$",
         "description": "Lower-case letters, digits and '-', starting and ending with a "
                        "letter or digit (RFC 1123 label), at most 40 characters."}


def _image(role: str) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False,
            "description": f"The pqcnet-{role} image (docker/Dockerfile --target {role}).",
            "properties": {
                "repository": {"type": "string", "minLength": 1},
                "tag": _STR,
                "digest": {"type": "string", "pattern": "^(sha256:[0-9a-f]{64})?$",
                           "description": "Pins the image and is passed to the node as "
                                          "PQCNET_IMAGE_DIGEST (measured in attestations)."},
                "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]}},
            "required": ["repository"]}


def _common(role: str) -> dict[str, Any]:
    """Values every role subchart has."""
    return {
        "global": _OBJ,
        "enabled": _BOOL,
        "nameOverride": _NAME,
        "fullnameOverride": _NAME,
        "image": _image(role),
        "existingSecret": {
            "type": "string", "minLength": 1,
            "description": "Secret holding the node identity files (key.pem, cert.pem, "
                           "bundle.pem), mounted read-only. Relayers: the name prefix, "
                           "relayer <i> mounts only Secret '<existingSecret>-<i>'. Keys "
                           "only ever as files."},
        "keyPassphraseSecret": {
            "type": "object", "additionalProperties": False,
            "description": "Optional Secret key with the node key's passphrase "
                           "(unset: the key file is unencrypted).",
            "properties": {"name": _STR, "key": _STR}},
        "enrollment": {
            "type": "object", "additionalProperties": False,
            "description": "Seam for the CA/enrollment service: an init container that "
                           "enrolls (or gathers Shamir shares) into the identity "
                           "volume before the node starts. Off: identity from "
                           "existingSecret.",
            "properties": {"enabled": _BOOL, "image": _STR,
                           "command": {"type": "array", "items": _STR}}},
        "opsPort": _PORT,
        "podAnnotations": _OBJ,
        "podLabels": _OBJ,
        "resources": _OBJ,
        "nodeSelector": _OBJ,
        "tolerations": {"type": "array"},
        "affinity": _OBJ,
        "priorityClassName": _STR,
        "podDisruptionBudget": {
            "type": "object", "additionalProperties": False,
            "properties": {"enabled": _BOOL,
                           "maxUnavailable": {"type": ["integer", "string"]}}},
        "networkPolicy": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "enabled": _BOOL,
                "ingressFrom": {"type": "array", "items": _OBJ,
                                "description": "NetworkPolicyPeers allowed to the QSTP port"},
                "metricsFrom": {"type": "array", "items": _OBJ,
                                "description": "NetworkPolicyPeers allowed to the ops port"},
                "egressTo": {"type": "array", "items": _OBJ,
                             "description": "NetworkPolicy egress rules (bus, backends, "
                                            "control plane); DNS is always allowed"}}},
        "serviceMonitor": {
            "type": "object", "additionalProperties": False,
            "properties": {"enabled": _BOOL, "interval": _STR, "labels": _OBJ}},
        "prometheusRule": {
            "type": "object", "additionalProperties": False,
            "properties": {"enabled": _BOOL, "labels": _OBJ}},
        "service": {
            "type": "object", "additionalProperties": False,
            "properties": {"type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                           "port": _PORT, "annotations": _OBJ}},
        "extraEnv": {"type": "array", "items": _OBJ},
    }


def _role_specific(role: str) -> dict[str, Any]:
    if role == "sentry":
        return {
            "replicaCount": {"type": "integer", "minimum": 1},
            "issuerKeys": {
                "type": "object", "additionalProperties": _STR,
                "description": "Assertion issuer public keys (PEM) by file name; config "
                               "'issuers' refers to these names. Public: a ConfigMap."},
            "autoscaling": {
                "type": "object", "additionalProperties": False,
                "properties": {"enabled": _BOOL,
                               "minReplicas": {"type": "integer", "minimum": 1},
                               "maxReplicas": {"type": "integer", "minimum": 1},
                               "targetCPUUtilizationPercentage": {
                                   "type": "integer", "minimum": 1, "maximum": 100}}},
            "ledger": {"type": "object", "additionalProperties": False,
                       "description": "Attestation/policy QS-DAG on an emptyDir.",
                       "properties": {"enabled": _BOOL, "sizeLimit": _STR}},
        }
    return {
        "replicaCount": {"type": "integer", "minimum": 1},
        "persistence": {
            "type": "object", "additionalProperties": False,
            "description": "The relayer's state (ledger, sequence marks, overflow "
                           "queue, proofs): one PVC per pod.",
            "properties": {"storageClass": _STR, "size": _STR,
                           "accessModes": {"type": "array", "items": _STR}}},
    }


def values_schema(role: str) -> dict[str, Any]:
    """The ``values.schema.json`` of the ``role`` subchart."""
    full = json_schema(role)
    defs = copy.deepcopy(full.get("$defs", {}))
    if role == "relayer":  # the chart holds the inner keys (RelayerConfig)
        config = defs.pop("RelayerConfig")
        defs.pop("RelayerFile", None)
    else:
        config = {k: copy.deepcopy(v) for k, v in full.items()
                  if k not in ("$schema", "title", "$defs")}
    for key in MANAGED[role]:
        config["properties"].pop(key)
    if "required" in config:
        config["required"] = [k for k in config["required"] if k not in MANAGED[role]]
    config["description"] = (f"The {role} config file (pqcnet config schema {role}), less "
                             f"the keys the chart sets: {', '.join(MANAGED[role])}.")
    props = {**_common(role), **_role_specific(role), "config": config}
    return {"$schema": DIALECT, "title": f"pqcnet {role} chart values",
            "type": "object", "additionalProperties": False, "properties": props,
            "required": ["image", "existingSecret", "config"], "$defs": defs}


def umbrella_schema() -> dict[str, Any]:
    """The umbrella's own schema: globals and the enable switches (each subchart
    validates its own values with its own schema)."""
    return {"$schema": DIALECT, "title": "pqcnet umbrella chart values", "type": "object",
            "properties": {
                "global": {"type": "object", "properties": {
                    "imageRegistry": _STR, "imageTag": _STR,
                    "imagePullSecrets": {"type": "array", "items": _OBJ}}},
                "sentry": {"type": "object", "properties": {"enabled": _BOOL}},
                "relayer": {"type": "object", "properties": {"enabled": _BOOL}},
                "prometheusRule": {"type": "object", "additionalProperties": False,
                                   "properties": {"enabled": _BOOL, "labels": _OBJ}}}}


def render() -> dict[Path, str]:
    out = {CHART / "values.schema.json": umbrella_schema()}
    for role in ("sentry", "relayer"):
        out[CHART / "charts" / role / "values.schema.json"] = values_schema(role)
    return {p: json.dumps(doc, indent=2) + "\n" for p, doc in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    stale = []
    for path, text in render().items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.relative_to(ROOT))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print("stale (run python tools/helmschema.py): " + ", ".join(map(str, stale)),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
