"""A wrong key, a wrong type and a bad value: one ``error:`` line naming the file and the
key, exit status 1 — through ``pqcnet config check`` and through each role's own
``check`` and ``run``, which must agree on what is valid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from pqcnet.crypto.pqc import SigningKey
from pqcnet.identity import dev_identities
from pqcnet.sentry.config import verify_key_pem
from tests.node.harness import run_cli
from tests.sentry.harness import config_dict

pytestmark = pytest.mark.timeout(120)


def _write(path: Path, doc: Any) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def _sentry(tmp: Path, **changes: Any) -> dict[str, Any]:
    for name in ("acme-issuer.pub", "globex-issuer.pub"):
        (tmp / name).write_bytes(verify_key_pem(SigningKey.generate().public_key))
    return {**config_dict(8080, 50051, 7000), "identity_dir": "sentry-id", **changes}


CASES = [
    ("sentry", {"colour": "red"}, "colour: unknown key"),
    ("sentry", {"limits": {"max_in_flight": "many", "default": {"rate": 1, "burst": 1}}},
     "limits.max_in_flight: must be a valid integer, got 'many'"),
    ("sentry", {"listen": "127.0.0.1:99999"}, "listen: expected host:port, got '127.0.0.1:99999'"),
    ("relayer", {"relayer": {"shardz": 3}}, "relayer.shardz: unknown key"),
    ("relayer", {"relayer": {"sync": "yes"}}, "relayer.sync: must be a valid boolean, got 'yes'"),
    ("relayer", {"relayer": {"backend": "kafka", "kafka_bootstrap": "x"}},
     "relayer.kafka_bootstrap: expected host:port[,host:port...], got 'x'"),
    ("node", {"role": "relayer", "relayer": {"identity_dir": "id"}, "extra": 1},
     "extra: unknown key"),
    ("node", {"role": "relayer", "relayer": {"identity_dir": "id"},
              "control_plane": {"tick_s": "fast"}},
     "control_plane.tick_s: must be a valid number, got 'fast'"),
    ("node", {"role": "relayer", "relayer": {"identity_dir": "id", "shards": 0}},
     "relayer.shards: must be greater than or equal to 1, got 0"),
]


@pytest.mark.parametrize(("kind", "doc", "expect"), CASES,
                         ids=[f"{k}-{e.split(':')[0]}" for k, _d, e in CASES])
async def test_config_check_names_file_and_key(kind: str, doc: dict[str, Any], expect: str,
                                               tmp_path: Path) -> None:
    if kind == "sentry":
        doc = _sentry(tmp_path, **doc)
    path = _write(tmp_path / f"{kind}.yaml", doc)
    status, out, err = await run_cli("config", "check", str(path), "--kind", kind)
    assert (status, out) == (1, "")
    assert err == f"error: {path}: {expect}\n", err


async def test_sentry_check_and_run_agree(tmp_path: Path) -> None:
    """``sentry check`` used to accept a file ``sentry run`` refused (no identity)."""
    doc = _sentry(tmp_path)
    del doc["identity_dir"]
    path = _write(tmp_path / "sentry.yaml", doc)
    want = f"error: {path}: identity_dir: required to run a sentry"
    for args in (("sentry", "check", "--config", str(path)),
                 ("sentry", "run", "--config", str(path), "--no-passphrase"),
                 ("config", "check", str(path), "--kind", "sentry")):
        status, out, err = await run_cli(*args)
        assert status == 1 and out == "" and err.startswith(want), (args, err)
        assert err.count("\n") == 1, err
    _ca, (sid,) = dev_identities("pqcnet.test", "spiffe://pqcnet.test/ops/sentry/s1")
    sid.save(tmp_path / "sentry-id", None)
    path = _write(tmp_path / "sentry.yaml", {**doc, "identity_dir": "sentry-id"})
    for args in (("sentry", "check", "--config", str(path)),
                 ("config", "check", str(path), "--kind", "sentry")):
        status, out, err = await run_cli(*args)
        assert status == 0 and '"acme"' in out, (args, err)


async def test_node_check_refuses_a_sentry_without_identity(tmp_path: Path) -> None:
    doc = _sentry(tmp_path)
    del doc["identity_dir"]
    _write(tmp_path / "sentry.yaml", doc)
    node = _write(tmp_path / "node.yaml", {"role": "sentry", "sentry": "sentry.yaml"})
    for cmd in (("node", "check", "--config", str(node)),
                ("config", "check", str(node), "--kind", "node")):
        status, _out, err = await run_cli(*cmd)
        assert status == 1, err
        assert err.startswith(f"error: {tmp_path / 'sentry.yaml'}: identity_dir: required"), err
