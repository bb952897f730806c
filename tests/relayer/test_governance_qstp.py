"""Governance pull and Ledger queries reachable post-quantum: through the relayer's QSTP
governance listener (TCP over QSTP to its loopback gRPC), with the same answers as the
loopback pull, and refused for identities the listener does not allow."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import pytest

from pqcnet.identity import dev_identities
from pqcnet.relayer import ledger_api as api
from pqcnet.relayer.errors import GovernanceError
from pqcnet.relayer.frame import Frame
from pqcnet.relayer.governance import VolumeFilter, open_channel, pull_report, pull_volume
from tests.procs import PQCNET
from tests.relayer.e2e import TD, identities, publisher, start_node, subscriber


def _node_kw() -> dict[str, object]:
    # the subscriber identity plays the governance indexer; the publisher is not allowed
    return {"grpc_port": 0, "governance_qstp_port": 0,
            "governance_allowed_peers": [f"spiffe://{TD}/acme/subscriber/*"]}


async def test_pull_and_ledger_queries_over_qstp_match_loopback(tmp_path: Path) -> None:
    node = await start_node(tmp_path, **_node_kw())
    try:
        sub = await subscriber(node.port, "cust1")
        pub = await publisher(node.port)
        await pub.publish([Frame("cust1", "ch1", i, b"x" * 10) for i in range(1, 21)])
        await pub.close()
        await sub.wait_for(20)
        await sub.close()
        loop_target = f"127.0.0.1:{node.grpc_port}"
        pq_target = f"127.0.0.1:{node.governance_qstp_port}"
        indexer = identities()[2]
        plain = await pull_volume(loop_target, VolumeFilter())
        over_qstp = await pull_volume(pq_target, VolumeFilter(), identity=indexer,
                                      expect_peer=f"spiffe://{TD}/acme/relayer/*")
        assert plain.total_frames == 20
        assert over_qstp == plain
        report = await pull_report(pq_target, identity=indexer)
        assert report.relayer_id == node.cfg.node_id

        async with open_channel(pq_target, identity=indexer) as channel:
            everything = await api.query_vertices(channel, api.VertexFilter())
            assert everything, "the dev genesis ledger is not empty"
            first = everything[0]
            assert await api.get_vertex(channel, bytes.fromhex(first["id"])) == first
            mine = await api.query_vertices(channel, api.VertexFilter(author=node.cfg.node_id))
            assert mine and all(v["author"] == node.cfg.node_id for v in mine)
            genesis = await api.query_vertices(channel, api.VertexFilter(kind="GENESIS"))
            assert [v["kind"] for v in genesis] == ["GENESIS"]
            assert await api.query_vertices(channel, api.VertexFilter(author="nobody")) == []
            assert (await api.get_slashes(channel))["slashed"] == []
            with pytest.raises(api.LedgerQueryError, match="NOT_FOUND"):
                await api.get_vertex(channel, b"\x00" * 32)
            with pytest.raises(api.LedgerQueryError, match="NOT_FOUND"):
                await api.get_anchor(channel, bytes.fromhex(first["id"]))
        # the listener keeps serving after those refusals
        assert (await pull_volume(pq_target, VolumeFilter(), identity=indexer)) == plain
    finally:
        await node.stop()


async def test_governance_listener_refuses_who_it_does_not_allow(tmp_path: Path) -> None:
    node = await start_node(tmp_path, **_node_kw())
    try:
        pq_target = f"127.0.0.1:{node.governance_qstp_port}"
        # same CA, but not in governance_allowed_peers
        with pytest.raises(GovernanceError):
            await pull_volume(pq_target, VolumeFilter(), identity=identities()[1], deadline=5)
        # another mesh CA altogether
        _, (stranger,) = dev_identities(TD, f"spiffe://{TD}/acme/subscriber/s9")
        with pytest.raises(GovernanceError):
            await pull_volume(pq_target, VolumeFilter(), identity=stranger, deadline=5)
        # the client pins the server: an indexer expecting a sentry refuses the relayer
        with pytest.raises(GovernanceError):
            await pull_volume(pq_target, VolumeFilter(), identity=identities()[2],
                              expect_peer=f"spiffe://{TD}/acme/sentry/*", deadline=5)
        # and the allowed one still gets through afterwards
        got = await pull_volume(pq_target, VolumeFilter(), identity=identities()[2])
        assert got.total_frames == 0
    finally:
        await node.stop()


async def test_plaintext_to_a_remote_target_is_refused_before_dialling() -> None:
    with pytest.raises(GovernanceError, match="loopback only"):
        await pull_volume("192.0.2.1:50051", VolumeFilter(), deadline=1)
    with pytest.raises(GovernanceError, match="host:port"):
        await pull_volume("no-port", VolumeFilter(), deadline=1)


def test_config_needs_a_plaintext_grpc_port_to_forward_to(tmp_path: Path) -> None:
    from pqcnet.relayer.config import RelayerConfig

    with pytest.raises(ValueError, match="governance_qstp_port"):
        RelayerConfig(listen_port=0, data_dir=str(tmp_path), governance_qstp_port=0)


async def test_cli_pull_over_qstp_and_local_ledger_query(tmp_path: Path) -> None:
    node = await start_node(tmp_path, **_node_kw())
    indexer_dir = tmp_path / "indexer"
    identities()[2].save(indexer_dir)
    env = {**os.environ, "PQCNET_LOG_FORMAT": "json"}
    try:
        pull = await asyncio.create_subprocess_exec(
            PQCNET, "governance", "pull",
            "--target", f"127.0.0.1:{node.governance_qstp_port}",
            "--identity", str(indexer_dir), "--report",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        out, err = await asyncio.wait_for(pull.communicate(), 120)
        assert pull.returncode == 0, err.decode()
        got = json.loads(out)
        assert got["total_frames"] == 0 and got["report"]["relayer"] == node.cfg.node_id
        refused = await asyncio.create_subprocess_exec(
            PQCNET, "governance", "pull",
            "--target", "192.0.2.1:1", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=env)
        _, err = await asyncio.wait_for(refused.communicate(), 120)
        assert refused.returncode != 0 and b"loopback only" in err
    finally:
        await node.stop()
    # a local ledger query takes the same service path (the node is stopped: ledger free)
    ledger_dir = tmp_path / "relayer" / "ledger"
    q = await asyncio.create_subprocess_exec(
        PQCNET, "ledger", "--path", str(ledger_dir), "query",
        "--kind", "GENESIS", stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out, err = await asyncio.wait_for(q.communicate(), 120)
    assert q.returncode == 0, err.decode()
    assert [v["kind"] for v in json.loads(out)] == ["GENESIS"]
