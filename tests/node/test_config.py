"""Node file validation: a bad file is one clear ``error:`` line and exit status 1,
through the real ``pqcnet node check`` / ``pqcnet node run`` commands; a good file
loads with the role's config parsed by the role's own loader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pqcnet.crypto.pqc import SigningKey
from pqcnet.runtime.config import load_node_config, parse_node_config
from pqcnet.runtime.errors import NodeConfigError
from pqcnet.runtime.node import agent_config
from pqcnet.sentry.config import verify_key_pem

from .harness import run_cli, write_yaml

pytestmark = pytest.mark.timeout(120)

RELAYER = {"node_id": "relayer-1", "listen_port": 0, "identity_dir": "id", "data_dir": "d"}


@pytest.fixture()
def gov_pub(tmp_path: Path) -> str:
    (tmp_path / "gov.pub").write_bytes(verify_key_pem(SigningKey.generate().public_key))
    return "gov.pub"


def test_good_relayer_file_loads(tmp_path: Path, gov_pub: str) -> None:
    cfg = load_node_config(write_yaml(tmp_path / "n.yaml", {
        "role": "relayer", "relayer": RELAYER,
        "control_plane": {"transport": "waku", "waku_rest_urls": ["http://127.0.0.1:1"],
                          "namespace": "x", "governance": {"keys": [gov_pub]},
                          "trust": {"peer-1": gov_pub}}}))
    assert cfg.relayer is not None and cfg.relayer.node_id == "relayer-1"
    assert cfg.relayer.identity_dir == str(tmp_path / "id")  # relative to the node file
    assert len(cfg.control_plane.governance_keys) == 1 and "peer-1" in cfg.control_plane.trust
    agent = agent_config("relayer", cfg.control_plane.spec)  # defaults: pull from anyone
    assert (agent.dag_pull_from, agent.dag_sync_interval_ms) == (None, 2000)


@pytest.mark.parametrize(("pull_from", "expected"), [([], ()), (["v1", "v2"], ("v1", "v2"))])
def test_dag_sync_settings_reach_the_agent(tmp_path: Path, pull_from: list[str],
                                           expected: tuple[str, ...]) -> None:
    cfg = parse_node_config({"role": "relayer", "relayer": RELAYER, "control_plane": {
        "dag_pull_from": pull_from, "dag_sync_interval_s": 0}}, tmp_path)
    agent = agent_config("relayer", cfg.control_plane.spec)
    assert (agent.dag_pull_from, agent.dag_sync_interval_ms) == (expected, 0)


@pytest.mark.parametrize(("doc", "needle"), [
    ({"role": "relayer", "relayer": RELAYER, "colour": 1}, "colour: unknown key"),
    ({"role": "gateway"}, "role: must be 'relayer' or 'sentry', got 'gateway'"),
    ({"role": "sentry"}, "sentry: required"),
    ({"role": "relayer", "relayer": RELAYER, "sentry": "s.yaml"}, "sentry: not allowed"),
    ({"role": "relayer", "relayer": {**RELAYER, "shardz": 3}}, "relayer.shardz: unknown key"),
    ({"role": "relayer", "relayer": RELAYER, "control_plane": {"transport": "carrier"}},
     "control_plane.transport"),
    ({"role": "relayer", "relayer": RELAYER, "control_plane": {"transport": "waku"}},
     "waku_rest_urls: required"),
    ({"role": "relayer", "relayer": RELAYER, "control_plane": {"topics": ["x"]}},
     "control_plane.topics: unknown key"),
    ({"role": "relayer", "relayer": RELAYER,
      "control_plane": {"governance": {"keys": ["missing.pub"]}}}, "cannot read key"),
    ({"role": "relayer", "relayer": RELAYER,
      "control_plane": {"governance": {"keys": [], "threshold": 2}}}, "threshold"),
    ({"role": "relayer", "relayer": RELAYER, "control_plane": {"announce_interval_s": 0}},
     "announce_interval_s"),
    ({"role": "sentry", "sentry": "nope.yaml"}, "cannot read config"),
    ({"role": "relayer", "relayer": RELAYER, "control_plane": {"dag_sync_interval_s": -1}},
     "dag_sync_interval_s"),
    ({"role": "relayer", "relayer": RELAYER, "control_plane": {"dag_pull_from": "v1"}},
     "dag_pull_from"),
    ({"role": "relayer", "relayer": RELAYER, "control_plane": {"dag_pull_from": [""]}},
     "dag_pull_from"),
])
def test_bad_files_name_the_key(tmp_path: Path, doc: dict[str, Any], needle: str) -> None:
    with pytest.raises(NodeConfigError) as info:
        parse_node_config(doc, tmp_path)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_key_file_that_is_not_a_key(tmp_path: Path) -> None:
    (tmp_path / "junk.pub").write_text("not a key")
    with pytest.raises(NodeConfigError, match="not an ML-DSA key PEM"):
        parse_node_config({"role": "relayer", "relayer": RELAYER,
                           "control_plane": {"trust": {"x": "junk.pub"}}}, tmp_path)


async def test_cli_bad_file_is_one_line_and_exit_1(tmp_path: Path) -> None:
    bad = write_yaml(tmp_path / "bad.yaml", {"role": "relayer", "relayer": RELAYER,
                                             "control_plane": {"transport": "carrier"}},
                     valid=False)
    for cmd in ("check", "run"):
        status, out, err = await run_cli("node", cmd, "--config", str(bad))
        assert status == 1 and out == ""
        assert err.strip().count("\n") == 0, err
        assert err.startswith(f"error: {bad}: control_plane.transport: must be 'waku' or "
                              "'embedded', got 'carrier'"), err
    (tmp_path / "broken.yaml").write_text("role: [unclosed")
    status, _out, err = await run_cli("node", "run", "--config", str(tmp_path / "broken.yaml"))
    assert status == 1 and err.startswith("error: node config") and "not valid YAML" in err
    assert err.strip().count("\n") == 0, err


async def test_cli_unreachable_waku_is_one_line(tmp_path: Path) -> None:
    """Start-up failures after validation (no Waku node answers) are one line too, and
    the relayer that had already started is stopped again (the process exits)."""
    from pqcnet.identity import dev_identities

    _ca, (rid,) = dev_identities("pqcnet.test", "spiffe://pqcnet.test/ops/relayer/relayer-1")
    rid.save(tmp_path / "id", None)
    cfg = write_yaml(tmp_path / "n.yaml", {
        "role": "relayer", "relayer": RELAYER,
        "control_plane": {"transport": "waku", "waku_rest_urls": ["http://127.0.0.1:9"]}})
    status, out, err = await run_cli("node", "run", "--config", str(cfg))
    assert status == 1 and out == ""
    assert err.startswith("error: no Waku node reachable"), err
    assert err.strip().count("\n") == 0, err
