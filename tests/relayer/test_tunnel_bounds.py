"""The relayer's QSTP bounds are its operator's: ``max_tunnels`` refuses the one tunnel
too many (and admits again once one closes), ``tunnel_buffer_bytes`` is the connection
window a publisher or subscriber is granted (read on the client's side),
``tunnel_buffer_total_bytes`` the budget those windows share, and a buffer below QSTP's
initial window is refused at start with the key named."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from pqcnet import qstp
from pqcnet.errors import PqcnetError
from pqcnet.qstp.config import INITIAL_WINDOW
from pqcnet.relayer.config import RelayerConfig
from pqcnet.relayer.errors import ConfigError
from tests.config.schemacheck import assert_schema
from tests.relayer.e2e import identities, publisher, start_node
from tests.relayer.helpers import metrics_reach, scrape_metrics

pytestmark = pytest.mark.timeout(90)


async def test_max_tunnels_refuses_the_one_too_many(tmp_path: Path) -> None:
    """The third tunnel to a relayer configured for two is refused (counted on
    ``/metrics``); once one closes, a new one gets in."""
    node = await start_node(tmp_path, max_tunnels=2, metrics_port=0)
    assert node.metrics_port is not None
    try:
        first = await publisher(node.port)
        second = await qstp.connect("127.0.0.1", node.port, identities()[2])
        with pytest.raises((PqcnetError, OSError)):
            extra = await asyncio.wait_for(
                qstp.connect("127.0.0.1", node.port, identities()[1]), 20)
            await extra.ping()  # (if the dial itself got through, the tunnel is dead)
        scraped = await asyncio.to_thread(scrape_metrics, node.metrics_port)
        assert scraped["pqcnet_relayer_tunnels_refused_at_limit_total"] == 1
        assert scraped["pqcnet_relayer_tunnels_active"] == 2
        assert scraped['pqcnet_relayer_handshake_failures_total{refused_by="local"}'] == 0
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


async def test_tunnel_buffer_total_bytes_is_shared_by_the_tunnels(tmp_path: Path) -> None:
    """A budget of one window's extra: the first tunnel gets the full window, the second
    the initial 64 KiB (read on the clients' side), /metrics shows the budget spent and
    one reduced start, and once the first closes the budget is back for the next."""
    window = 256 * 1024
    extra = window - INITIAL_WINDOW
    node = await start_node(tmp_path, tunnel_buffer_bytes=window,
                            tunnel_buffer_total_bytes=extra, metrics_port=0)
    assert node.metrics_port is not None
    port = node.metrics_port
    tunnels = []
    try:
        for ident in (identities()[1], identities()[2]):
            t = await qstp.connect("127.0.0.1", node.port, ident)
            assert await t.ping() >= 0  # the preface and its ACK are in
            tunnels.append(t)
        assert [t.connection.connection_send_window for t in tunnels] == [window,
                                                                          INITIAL_WINDOW]
        got = await asyncio.to_thread(scrape_metrics, port)
        assert got['pqcnet_relayer_tunnel_buffer_budget_bytes{state="total"}'] == extra
        assert got['pqcnet_relayer_tunnel_buffer_budget_bytes{state="reserved"}'] == extra
        assert got["pqcnet_relayer_tunnel_reduced_windows_total"] == 1
        await tunnels.pop(0).close()
        reserved = 'pqcnet_relayer_tunnel_buffer_budget_bytes{state="reserved"}'
        async with asyncio.timeout(10):
            while (await asyncio.to_thread(scrape_metrics, port))[reserved] != 0:  # noqa: ASYNC110 - polling another process's /metrics
                await asyncio.sleep(0.05)
        t = await qstp.connect("127.0.0.1", node.port, identities()[1])
        tunnels.append(t)
        assert await t.ping() >= 0
        assert t.connection.connection_send_window == window
    finally:
        for t in tunnels:
            await t.close()
        await node.stop()


def test_a_negative_total_buffer_is_refused(tmp_path: Path) -> None:
    cfg = {"relayer": {"node_id": "r1", "tunnel_buffer_total_bytes": -1}}
    assert_schema("relayer", cfg, valid=False)
    path = tmp_path / "relayer.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="tunnel_buffer_total_bytes"):
        RelayerConfig.load(path)


async def test_handshake_failures_are_counted_by_who_refused(tmp_path: Path) -> None:
    """A client from a CA the relayer's peers do not share refuses the relayer's
    certificate (``refused_by="peer"``: what a relayer whose own certificate went bad
    sees); a scanner sending garbage is refused here (``"local"``). Neither counts as a
    tunnel, and the relayer still serves its real clients."""
    from pqcnet.identity import dev_identities

    node = await start_node(tmp_path, metrics_port=0)
    assert node.metrics_port is not None
    try:
        _, (stranger,) = dev_identities("other.test", "spiffe://other.test/x/publisher/p")
        with pytest.raises(PqcnetError):
            await asyncio.wait_for(qstp.connect("127.0.0.1", node.port, stranger), 20)
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 20) is not None  # closed on us
            writer.close()
        want = {'pqcnet_relayer_handshake_failures_total{refused_by="peer"}': 1.0,
                'pqcnet_relayer_handshake_failures_total{refused_by="local"}': 2.0,
                "pqcnet_relayer_tunnels_refused_at_limit_total": 0.0,
                "pqcnet_relayer_tunnels_active": 0.0}
        await metrics_reach(node.metrics_port, want)
        client = await publisher(node.port)
        assert (await asyncio.to_thread(scrape_metrics, node.metrics_port))[
            "pqcnet_relayer_tunnels_active"] == 1
        await client.close()
    finally:
        await node.stop()
