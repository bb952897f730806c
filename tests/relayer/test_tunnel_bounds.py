"""The relayer's QSTP bounds are its operator's: ``max_tunnels`` refuses the one tunnel
too many (and admits again once one closes), ``tunnel_buffer_bytes`` is the connection
window a publisher or subscriber is granted (read on the client's side), and a buffer
below QSTP's initial window is refused at start with the key named."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from pqcnet import qstp
from pqcnet.errors import PqcnetError
from pqcnet.relayer.config import RelayerConfig
from pqcnet.relayer.errors import ConfigError
from tests.config.schemacheck import assert_schema
from tests.relayer.e2e import identities, publisher, start_node

pytestmark = pytest.mark.timeout(90)


async def test_max_tunnels_refuses_the_one_too_many(tmp_path: Path) -> None:
    node = await start_node(tmp_path, max_tunnels=2)
    try:
        first = await publisher(node.port)
        second = await qstp.connect("127.0.0.1", node.port, identities()[2])
        with pytest.raises((PqcnetError, OSError)):
            extra = await asyncio.wait_for(
                qstp.connect("127.0.0.1", node.port, identities()[1]), 20)
            await extra.ping()  # (if the dial itself got through, the tunnel is dead)
        await first.close()
        server = node._server
        assert server is not None
        async with asyncio.timeout(10):
            while server.tunnels >= 2:  # noqa: ASYNC110 - the server forgets it on close
                await asyncio.sleep(0.05)
        again = await publisher(node.port)
        await again.close()
        await second.close()
    finally:
        await node.stop()


@pytest.mark.parametrize("window", [131_072, 8 * 1024 * 1024])
async def test_tunnel_buffer_bytes_is_the_window_a_client_gets(tmp_path: Path,
                                                                window: int) -> None:
    node = await start_node(tmp_path, tunnel_buffer_bytes=window)
    try:
        tunnel = await qstp.connect("127.0.0.1", node.port, identities()[1])
        try:
            assert await tunnel.ping() >= 0  # the preface and its ACK are in
            assert tunnel.connection.connection_send_window == window
        finally:
            await tunnel.close()
    finally:
        await node.stop()


def test_a_buffer_below_the_initial_window_is_refused(tmp_path: Path) -> None:
    cfg = {"relayer": {"node_id": "r1", "tunnel_buffer_bytes": 1024}}
    assert_schema("relayer", cfg, valid=False)  # the published schema says so too
    path = tmp_path / "relayer.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="tunnel_buffer_bytes"):
        RelayerConfig.load(path)
