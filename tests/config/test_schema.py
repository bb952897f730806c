"""The JSON Schema ``pqcnet config schema`` prints: valid JSON Schema, the same as the
API deployment tooling calls, accepting every shipped example, and agreeing with the
loaders on good and mutated configs (checked with ``jsonschema``, independent of the
pydantic models that emit it)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from pqcnet.crypto.pqc import SigningKey
from pqcnet.errors import PqcnetError
from pqcnet.relayer.config import RelayerConfig
from pqcnet.runtime.config import parse_node_config
from pqcnet.runtime.schema import KINDS, json_schema
from pqcnet.sentry.config import parse_config, verify_key_pem
from tests.config.schemacheck import schema_errors
from tests.node.harness import run_cli
from tests.sentry.harness import config_dict

pytestmark = pytest.mark.timeout(120)
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def kind_of(example: Path) -> str:
    return "node" if example.name.startswith("node-") else example.stem


@pytest.mark.parametrize("kind", KINDS)
async def test_cli_prints_valid_json_schema(kind: str) -> None:
    status, out, err = await run_cli("config", "schema", kind)
    assert status == 0, err
    schema = json.loads(out)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema == json_schema(kind)
    assert schema["$schema"].endswith("/draft/2020-12/schema")


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="kind must be one of sentry, relayer, node"):
        json_schema("gateway")


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_satisfies_the_schema(example: Path) -> None:
    doc = yaml.safe_load(example.read_text())
    assert schema_errors(kind_of(example), doc) == []


def test_examples_cover_every_kind() -> None:
    assert {kind_of(p) for p in EXAMPLES.glob("*.yaml")} == set(KINDS)


# ---------------------------------------------------------------------------- agreement

def _sentry_doc(tmp: Path) -> dict[str, Any]:
    for name in ("acme-issuer.pub", "globex-issuer.pub"):
        (tmp / name).write_bytes(verify_key_pem(SigningKey.generate().public_key))
    return config_dict(8080, 50051, 7000)


def _loader(kind: str, tmp: Path) -> Any:
    if kind == "sentry":
        return lambda doc: parse_config(doc, tmp)
    if kind == "relayer":
        return lambda doc: RelayerConfig.from_mapping(doc, base=tmp)
    return lambda doc: parse_node_config(doc, tmp)


def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node: Any = out
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return out


DELETE = object()
RELAYER = {"relayer": {"node_id": "r1", "data_dir": "d", "backend": "embedded"}}
NODE = {"role": "relayer", "relayer": {"node_id": "r1", "identity_dir": "id"},
        "control_plane": {"transport": "embedded"}}

#: (kind, key path, new value, key the error names): each breaks the config in a way
#: JSON Schema can state
MUTATIONS = [
    ("sentry", "colour", "red", "colour: unknown key"),
    ("sentry", "listen", "no-port", "listen: expected host:port"),
    ("sentry", "listen", 7443, "listen: must be a valid string"),
    ("sentry", "limits.max_in_flight", 0, "limits.max_in_flight: must be greater"),
    ("sentry", "limits.default.rate", "fast", "limits.default.rate: must be a valid number"),
    ("sentry", "limits.default", DELETE, "limits.default: required"),
    ("sentry", "backends.0.kind", "ftp", "backends[0].kind: must be 'http', 'grpc' or 'tcp'"),
    ("sentry", "backends.2.target", "http://x:1", "backends[2].target: expected host:port"),
    ("sentry", "backends.0.target", "127.0.0.1:80", "backends[0].target: expected an http"),
    ("sentry", "sanitizer.acme.headers.x-ip", "encrypt", "sanitizer.acme.headers.x-ip: "),
    ("sentry", "sanitizer.acme.key_hex", "xyz", "sanitizer.acme.key_hex: expected hex"),
    ("sentry", "bounds.max_request_body", True, "bounds.max_request_body: must be a valid "),
    ("sentry", "issuers.acme", [], "issuers.acme: must have at least 1 item"),
    ("relayer", "relayer.shards", 0, "relayer.shards: must be greater than or equal to 1"),
    ("relayer", "relayer.shards", "32", "relayer.shards: must be a valid integer, got '32'"),
    ("relayer", "relayer.backend", "nats", "relayer.backend: must be 'embedded', 'redis' or"),
    ("relayer", "relayer.kafka_bootstrap", "x", "relayer.kafka_bootstrap: expected host:port"),
    ("relayer", "relayer.backend", "redis", "relayer.redis_url: required for backend redis"),
    ("relayer", "relayer.shardz", 3, "relayer.shardz: unknown key"),
    ("relayer", "relayer.metrics_port", 70000, "relayer.metrics_port: must be less than"),
    ("relayer", "relayer.epoch_seconds", 0, "relayer.epoch_seconds: must be greater than 0"),
    ("node", "role", "gateway", "role: must be 'relayer' or 'sentry', got 'gateway'"),
    ("node", "sentry", "s.yaml", "sentry: not allowed for role relayer"),
    ("node", "relayer", DELETE, "relayer: required"),
    ("node", "control_plane.transport", "carrier", "control_plane.transport: must be 'waku'"),
    ("node", "control_plane.transport", "waku", "control_plane.waku_rest_urls: required"),
    ("node", "control_plane.waku_rest_urls", ["ftp://x"],
     "control_plane.waku_rest_urls[0]: expected an http(s):// URL"),
    ("node", "control_plane.announce_interval_s", 0, "control_plane.announce_interval_s: "),
    ("node", "control_plane.governance.threshold", 0, "control_plane.governance.threshold: "),
    ("node", "control_plane.topics", ["x"], "control_plane.topics: unknown key"),
    ("node", "relayer.shards", 99999, "relayer.shards: must be less than or equal to 4096"),
]


def _base(kind: str, tmp: Path) -> dict[str, Any]:
    return {"sentry": _sentry_doc, "relayer": lambda _t: RELAYER,
            "node": lambda _t: NODE}[kind](tmp)


@pytest.mark.parametrize("kind", KINDS)
def test_schema_and_loader_accept_the_base_configs(kind: str, tmp_path: Path) -> None:
    doc = _base(kind, tmp_path)
    assert schema_errors(kind, doc) == []
    _loader(kind, tmp_path)(doc)


@pytest.mark.parametrize(("kind", "path", "value", "expect"), MUTATIONS,
                         ids=[f"{k}:{p}={v!r}" for k, p, v, _e in MUTATIONS])
def test_schema_and_loader_refuse_the_same_mutations(kind: str, path: str, value: Any,
                                                     expect: str, tmp_path: Path) -> None:
    doc = _set(_base(kind, tmp_path), path, value)
    assert schema_errors(kind, doc), "JSON Schema accepted a broken config"
    with pytest.raises(PqcnetError) as info:
        _loader(kind, tmp_path)(doc)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(expect), message


#: (kind, key path, value) the loader refuses for reasons JSON Schema cannot state
LOADER_ONLY = [
    ("sentry", "issuers.acme", ["missing.pub"]),          # key file must exist
    ("sentry", "routes.0.backend", "nowhere"),            # route names a defined backend
    ("sentry", "routes.0.backend", "tcp-echo"),           # tcp backends are not routed
    ("node", "control_plane.governance.threshold", 2),    # at most the number of keys
]


@pytest.mark.parametrize(("kind", "path", "value"), LOADER_ONLY,
                         ids=[f"{k}:{p}={v!r}" for k, p, v in LOADER_ONLY])
def test_rules_only_the_loader_states(kind: str, path: str, value: Any, tmp_path: Path) -> None:
    doc = _set(_base(kind, tmp_path), path, value)
    assert schema_errors(kind, doc) == []
    with pytest.raises(PqcnetError, match=path.split(".")[-1]):
        _loader(kind, tmp_path)(doc)
