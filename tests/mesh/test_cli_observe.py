"""``pqcnet mesh listen`` / ``peers`` against real go-waku: verified-only output."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from pqcnet.cli import app as cli
from pqcnet.crypto.pqc import SigningKey
from pqcnet.mesh.envelope import EnvelopeSigner, MessageType, NodeKeys, now_ms
from pqcnet.mesh.messages import Announcement
from pqcnet.mesh.transport import topic_map
from pqcnet.mesh.waku import WakuRestClient

pytestmark = [pytest.mark.services, pytest.mark.timeout(90)]


async def _announce_while(runner_task: asyncio.Future[object], url: str, ns: str,
                          keys: list[NodeKeys]) -> None:
    client = WakuRestClient(url)
    signers = [EnvelopeSigner(k) for k in keys]
    try:
        while not runner_task.done():
            for k, s in zip(keys, signers):
                ann = Announcement(k.node_id, "sentry", key_version=1,
                                   seal_key=k.recipient_key.public)
                await client.publish(topic_map(ns)["announce"],
                                     s.wire(MessageType.NODE_ANNOUNCEMENT, ann.encode(),
                                            now_ms=now_ms()))
            await asyncio.sleep(0.3)
    finally:
        await client.aclose()


@pytest.mark.parametrize("command", ["listen", "peers"])
async def test_observer_shows_verified_only_unless_asked(waku_rest_urls: list[str],
                                                         tmp_path: Path, command: str) -> None:
    runner = CliRunner()
    key_path = tmp_path / "trusted.pem"
    assert runner.invoke(cli, ["mesh", "keygen", str(key_path)]).exit_code == 0
    trusted = NodeKeys("trusted-1", SigningKey.from_pem(key_path.read_bytes()))
    stranger = NodeKeys("stranger-1", SigningKey.generate())
    ns = "o" + uuid.uuid4().hex[:10]
    pub, sub = waku_rest_urls[0], waku_rest_urls[-1]
    outputs = []
    for extra in ([], ["--unverified"]):
        args = ["mesh", command, "--waku", sub, "--namespace", ns, "--seconds", "4",
                "--trust", f"trusted-1={key_path}", *extra]
        task = asyncio.ensure_future(asyncio.to_thread(runner.invoke, cli, args))
        await _announce_while(task, pub, ns, [trusted, stranger])
        result = await task
        assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
        outputs.append(result.output)  # type: ignore[attr-defined]
    plain, labelled = outputs
    if command == "listen":
        rows = [json.loads(line) for line in plain.splitlines()]
        assert rows and all(r["verified"] and r["sender"] == "trusted-1" for r in rows)
        rows = [json.loads(line) for line in labelled.splitlines()]
        bad = [r for r in rows if not r["verified"]]
        # (the previous run's messages, still cached by the node, show up as "replay")
        assert {r["reason"] for r in bad if r["sender"] == "stranger-1"} == {"unknown_sender"}
        assert any(r["verified"] and r["sender"] == "trusted-1" for r in rows)
    else:
        assert set(json.loads(plain)["peers"]) == {"trusted-1"}
        table = json.loads(labelled)
        assert set(table["peers"]) == {"trusted-1"}
        assert table["unverified"]["stranger-1"]["reason"] == "unknown_sender"


def test_bad_trust_spec_is_one_clear_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["mesh", "listen", "--waku", "http://127.0.0.1:9",
                                      "--trust", "no-equals-sign", "--seconds", "0"])
    assert result.exit_code == 2
    assert "NODE[@VERSION]=PEM" in result.output
