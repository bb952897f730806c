"""The Shamir share service over real QSTP sockets, from the node's and the attacker's chair.

Five custodians each serve one share of a node's long-term key (3-of-5) to an
allow-list holding only the node's SPIFFE ID. The node authenticates with its
bootstrap mesh certificate, pins each custodian's SPIFFE ID, gathers 3 shares,
combines them in memory and starts a real QSTP server with the rebuilt key.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import shamir_mnemonic

from pqcnet import qstp
from pqcnet.identity import NodeIdentity, dev_identities
from pqcnet.identity.errors import KeyStoreError, NotEnoughShares
from pqcnet.identity.keyconfig import CustodianConfig, KeyStoreConfig, key_store_config
from pqcnet.identity.shamir import (
    KeyShare,
    ShamirKeyStore,
    ShareManifest,
    read_manifest,
    read_share,
)
from pqcnet.qstp.errors import TunnelClosed
from pqcnet.runtime.errors import ShareServiceError
from pqcnet.runtime.shares import (
    MAX_REQUEST_BYTES,
    MAX_REQUESTS_PER_TUNNEL,
    ShareService,
    fetch_share,
    open_key_store,
)

pytestmark = pytest.mark.timeout(120)

TD = "mesh.test"
NODE = f"spiffe://{TD}/acme/relayer/n1"
ATTACKER = f"spiffe://{TD}/acme/relayer/evil"
CUSTODIANS = [f"spiffe://{TD}/ops/custodian/c{i}" for i in range(1, 6)]


@dataclass
class World:
    node_dir: Path  # cert.pem + bundle.pem + key.shares.json of the long-term identity
    boot_dir: Path  # the bootstrap identity that authenticates the node to custodians
    boot: NodeIdentity
    main: NodeIdentity
    manifest: ShareManifest
    shares: list[KeyShare]
    custodians: list[NodeIdentity]
    attacker: NodeIdentity
    peer: NodeIdentity


@pytest.fixture
def world(tmp_path: Path) -> World:
    ca, ids = dev_identities(TD, NODE, ATTACKER, *CUSTODIANS)
    boot, attacker, custodians = ids[0], ids[1], ids[2:]
    main = ca.issue(NODE)  # the long-term key: same SPIFFE ID, its own key
    handover = tmp_path / "handover"
    main.save(tmp_path / "node", key_store=ShamirKeyStore(
        tmp_path / "node" / "key.shares.json", None, share_dir=handover, shares=5, threshold=3))
    boot.save(tmp_path / "boot", None)
    shares = [read_share(handover / f"share-{i}.json") for i in range(1, 6)]
    return World(tmp_path / "node", tmp_path / "boot", boot, main,
                 read_manifest(tmp_path / "node" / "key.shares.json"), shares,
                 custodians, attacker, ca.issue(f"spiffe://{TD}/acme/publisher/p1"))


@dataclass
class Running:
    services: list[ShareService]
    servers: list[qstp.Server]
    config: list[CustodianConfig]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def custodians(world: World, up: Sequence[int] = range(5), *,
                     tampered: Sequence[int] = (), **service_kw: float) -> AsyncIterator[Running]:
    """Start share services for custodians ``up`` (0-based); the others' ports are closed."""
    services, servers, config = [], [], []
    try:
        for i, (ident, share) in enumerate(zip(world.custodians, world.shares)):
            if i not in up:
                config.append(CustodianConfig(f"127.0.0.1:{_closed_port()}", CUSTODIANS[i]))
                continue
            served = _forge(share) if i in tampered else share
            service = ShareService(ident, [served], [NODE], **service_kw)
            server = await service.serve()
            services.append(service)
            servers.append(server)
            config.append(CustodianConfig(f"127.0.0.1:{server.port}", CUSTODIANS[i]))
        yield Running(services, servers, config)
    finally:
        for server in servers:
            server.close()
        for server in servers:
            await server.wait_closed()


def _forge(share: KeyShare) -> KeyShare:
    parsed = shamir_mnemonic.Share.from_mnemonic(share.mnemonic)
    value = bytes([parsed.value[0] ^ 0x80]) + parsed.value[1:]
    return dataclasses.replace(share, mnemonic=dataclasses.replace(parsed, value=value).mnemonic())


def _config(world: World, custodians_: Sequence[CustodianConfig]) -> KeyStoreConfig:
    return key_store_config({
        "kind": "shamir", "client_identity": str(world.boot_dir),
        "client_key_store": {"kind": "file", "passphrase_env": None}, "timeout_s": 5,
        "custodians": [{"address": c.address, "spiffe_id": c.spiffe_id} for c in custodians_],
    }, default_dir=world.node_dir)


async def _load(world: World, running: Running) -> NodeIdentity:
    store = open_key_store(_config(world, running.config))
    return await asyncio.to_thread(NodeIdentity.load, world.node_dir, key_store=store)


async def test_node_gathers_k_shares_over_qstp_and_starts(world: World) -> None:
    async with custodians(world) as running:
        node = await _load(world, running)
        assert node.key.key_id == world.main.key.key_id
        assert 3 <= sum(s.released for s in running.services) <= 5

        async def echo(tunnel: qstp.Tunnel) -> None:
            async for stream in tunnel:
                await stream.send(await stream.read_all(64), end=True)

        async with await qstp.serve(echo, "127.0.0.1", 0, node) as server:
            tunnel = await qstp.connect("127.0.0.1", server.port, world.peer)
            stream = tunnel.open_stream()
            await stream.send(b"hello", end=True)
            assert await stream.read_all(64) == b"hello"
            assert str(tunnel.peer.spiffe_id) == NODE
            await tunnel.close()


async def test_custodians_down_others_suffice_until_fewer_than_k(world: World) -> None:
    async with custodians(world, up=(1, 3, 4)) as running:
        node = await _load(world, running)
        assert node.key.key_id == world.main.key.key_id
        assert sum(s.released for s in running.services) == 3
    async with custodians(world, up=(0, 4)) as running:
        with pytest.raises(NotEnoughShares) as err:
            await _load(world, running)
    message = str(err.value)
    assert "2 of 3 shares gathered from 5 custodians" in message
    for down in (1, 2, 3):
        assert f"{CUSTODIANS[down]}: unavailable" in message


async def test_unauthorised_spiffe_ids_get_nothing(world: World) -> None:
    # a valid certificate of the same trust domain, but not on the allow-list
    _, (impostor,) = dev_identities(TD, NODE)  # the node's ID, another CA
    async with custodians(world, up=(0,)) as running:
        target = running.config[0]
        for who in (world.attacker, world.custodians[1], impostor):
            with pytest.raises(ShareServiceError) as err:
                await fetch_share(target, who, world.manifest.key_id, timeout_s=5)
            assert err.value.code == "unavailable"
        service, server = running.services[0], running.servers[0]
        assert service.released == 0 and service.rejected == 0
        assert server.handshake_failures >= 3
        # the node itself still gets its share
        share = await fetch_share(target, world.boot, world.manifest.key_id, timeout_s=5)
        assert share == world.shares[0] and service.released == 1


async def test_node_talks_only_to_the_pinned_custodian(world: World) -> None:
    async with custodians(world, up=(1,)) as running:
        # c2's service answers on the address configured for c1: the node must refuse it
        wrong = CustodianConfig(running.config[1].address, CUSTODIANS[0])
        with pytest.raises(ShareServiceError, match="unavailable"):
            await fetch_share(wrong, world.boot, world.manifest.key_id, timeout_s=5)
        assert running.services[0].released == 0 and running.services[0].rejected == 0


async def test_a_tampered_share_is_skipped_or_fails_clearly(world: World) -> None:
    async with custodians(world, tampered=(0,)) as running:
        node = await _load(world, running)
        assert node.key.key_id == world.main.key.key_id
    async with custodians(world, up=(0, 1, 2), tampered=(0,)) as running:
        with pytest.raises(NotEnoughShares) as err:
            await _load(world, running)
    assert f"{CUSTODIANS[0]}: share 1 does not match the manifest digest" in str(err.value)


async def _ask(stream: qstp.Stream, payload: bytes) -> dict[str, object]:
    await stream.send(payload, end=True)
    reply = json.loads(await stream.read_all(16 * 1024))
    assert isinstance(reply, dict)
    return reply


def _parse_reply_ok(reply: dict[str, object]) -> KeyShare:
    assert "error" not in reply, reply
    return KeyShare.from_json(reply["share"])


async def test_bad_input_gets_a_typed_answer_and_the_service_keeps_serving(world: World) -> None:
    async with custodians(world, up=(0,), request_timeout_s=0.5) as running:
        host, port = running.config[0].host_port
        service = running.services[0]
        tunnel = await qstp.connect(host, port, world.boot)
        cases = [
            (b"\xff not json", "bad_request"),
            (b'{"v": 2, "key_id": "00"}', "bad_request"),
            (b'["v", 1]', "bad_request"),
            (json.dumps({"v": 1, "key_id": "zz" * 32}).encode(), "bad_request"),
            (json.dumps({"v": 1, "key_id": "00" * 32}).encode(), "not_found"),
            (b"x" * (MAX_REQUEST_BYTES + 1), "too_large"),
        ]
        for payload, code in cases:
            reply = await _ask(tunnel.open_stream(), payload)
            error = reply["error"]
            assert isinstance(error, dict) and error["code"] == code, (payload[:20], reply)
        # a stalled request (no end of stream) times out instead of holding the handler
        stalled = tunnel.open_stream()
        await stalled.send(b'{"v": 1')
        reply = json.loads(await stalled.read_all(16 * 1024))
        assert reply["error"]["code"] == "timeout"
        assert service.rejected == len(cases) + 1 and service.released == 0
        # one tunnel may ask only so often; the service still serves a new tunnel
        for _ in range(MAX_REQUESTS_PER_TUNNEL - len(cases) - 1):
            assert (await _ask(tunnel.open_stream(), b"{}"))["error"] == {
                "code": "bad_request", "message": "expected a version 1 request"}
        more = tunnel.open_stream()
        await more.send(b"{}", end=True)
        with pytest.raises(TunnelClosed):
            await more.read_all(1024)
        await tunnel.close()
        # a request the client aborts half-way gets no answer; the tunnel keeps working
        tunnel = await qstp.connect(host, port, world.boot)
        aborted = tunnel.open_stream()
        await aborted.send(b'{"v": 1, "key')
        aborted.reset()
        share = _parse_reply_ok(await _ask(tunnel.open_stream(), json.dumps(
            {"v": 1, "key_id": world.manifest.key_id.hex()}).encode()))
        assert share == world.shares[0] and service.released == 1
        await tunnel.close()
        share = await fetch_share(running.config[0], world.boot, world.manifest.key_id,
                                  timeout_s=5)
        assert share == world.shares[0] and service.released == 2
        with pytest.raises(ShareServiceError) as err:
            await fetch_share(running.config[0], world.boot, b"\x01" * 32, timeout_s=5)
        assert err.value.code == "not_found" and not err.value.retriable


async def test_blocking_gather_from_the_event_loop_is_refused(world: World) -> None:
    async with custodians(world, up=(0, 1, 2)) as running:
        store = open_key_store(_config(world, running.config))
        with pytest.raises(KeyStoreError, match=r"asyncio\.to_thread"):
            store.load()


def test_service_configuration_errors(world: World) -> None:
    with pytest.raises(ShareServiceError, match="needs an allow-list"):
        ShareService(world.custodians[0], world.shares[:1], [])
    with pytest.raises(ShareServiceError, match="no share"):
        ShareService(world.custodians[0], [], [NODE])
    with pytest.raises(ShareServiceError, match="two shares for key"):
        ShareService(world.custodians[0], world.shares[:2], [NODE])
