"""qstp.tls.PeerGate: run-time denials refuse full and resumed handshakes on loopback."""

from __future__ import annotations

import pytest

from pqcnet import qstp
from pqcnet.identity import dev_identities
from pqcnet.qstp.errors import HandshakeError
from pqcnet.qstp.tls import PeerGate, TlsPolicy

from ..qstp.qstputil import echo_handler

pytestmark = pytest.mark.timeout(60)

TD = "gate.test"
SERVER = f"spiffe://{TD}/ops/sentry/s1"
CLIENT = f"spiffe://{TD}/acme/sidecar/c1"
OTHER = f"spiffe://{TD}/acme/sidecar/c2"


async def test_gate_refuses_new_and_resumed_handshakes_and_can_lift() -> None:
    _ca, (server_id, client_id, other_id) = dev_identities(TD, SERVER, CLIENT, OTHER)
    gate = PeerGate()
    server = await qstp.serve(echo_handler, "127.0.0.1", 0, server_id, TlsPolicy(gate=gate))
    try:
        first = await qstp.connect("127.0.0.1", server.port, client_id)
        session = first.session
        await first.close()
        assert session is not None
        gate.deny("c1", "slashed: test")
        with pytest.raises(HandshakeError):
            await qstp.connect("127.0.0.1", server.port, client_id)
        # resumption skips certificates; verify_peer still consults the gate
        with pytest.raises(HandshakeError):
            await qstp.connect("127.0.0.1", server.port, client_id, session=session)
        assert server.handshake_failures == 2
        # others are unaffected; a full SPIFFE ID works as a key too
        ok = await qstp.connect("127.0.0.1", server.port, other_id)
        await ok.close()
        gate.deny(OTHER)
        with pytest.raises(HandshakeError):
            await qstp.connect("127.0.0.1", server.port, other_id)
        gate.allow("c1")
        back = await qstp.connect("127.0.0.1", server.port, client_id)
        assert back.peer.spiffe_id.node_id == "s1"
        await back.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_client_side_gate_refuses_a_denied_server() -> None:
    _ca, (server_id, client_id) = dev_identities(TD, SERVER, CLIENT)
    server = await qstp.serve(echo_handler, "127.0.0.1", 0, server_id)
    try:
        with pytest.raises(HandshakeError, match=r"\[denied\]"):
            await qstp.connect("127.0.0.1", server.port, client_id,
                               TlsPolicy(gate=PeerGate(("s1",))))
    finally:
        server.close()
        await server.wait_closed()


def test_gate_bounds_and_bad_input() -> None:
    gate = PeerGate(max_entries=2)
    gate.deny("a")
    gate.deny("a")  # idempotent
    gate.deny("b")
    assert len(gate) == 2
    with pytest.raises(HandshakeError):
        gate.deny("c")
    with pytest.raises(HandshakeError):
        gate.deny("")
