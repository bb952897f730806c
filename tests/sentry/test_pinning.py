"""Issue 12 §4: the sidecar pins the peer it expects. Pointed at a relayer (a valid
node of the same mesh, but not a sentry) it refuses with a clear error instead of
sending the tenant's assertions and requests there. Real QSTP servers and sentry."""

from __future__ import annotations

import contextlib

import pytest

from pqcnet import qstp
from pqcnet.crypto.pqc import SigningKey
from pqcnet.errors import PqcnetError
from pqcnet.identity import dev_identities
from pqcnet.qstp.aio import Tunnel
from pqcnet.sentry.errors import PeerMismatch, SentryConfigError
from pqcnet.sentry.sidecar import Sidecar, default_expect_peer, pinned_dial
from pqcnet.sentry.wire import RequestHead

from .conftest import Env
from .harness import TD

pytestmark = pytest.mark.timeout(60)
STATUS = RequestHead("http", "GET", "/status")


async def test_default_pin_reaches_the_sentry(env: Env) -> None:
    assert default_expect_peer(env.mesh.acme) == f"spiffe://{TD}/*/sentry/*"
    sidecar = Sidecar(pinned_dial("127.0.0.1", env.stack.port, env.mesh.acme),
                      env.mesh.acme_issuer, subject="alice", tenant="acme")
    try:
        head, stream, _ = await sidecar.call(STATUS, b"")
        with contextlib.suppress(PqcnetError):
            await stream.read_all(1 << 20)
        assert head.status == 200
    finally:
        await sidecar.aclose()


async def test_sidecar_pointed_at_a_relayer_is_refused_clearly() -> None:
    _ca, (relayer, client) = dev_identities(TD, f"spiffe://{TD}/ops/relayer/r1",
                                            f"spiffe://{TD}/acme/sidecar/c1")

    async def handler(tunnel: Tunnel) -> None:
        await tunnel.wait_closed()

    server = await qstp.serve(handler, "127.0.0.1", 0, relayer)
    try:
        issuer = SigningKey.generate()
        sidecar = Sidecar(pinned_dial("127.0.0.1", server.port, client), issuer,
                          subject="alice", tenant="acme")
        with pytest.raises(PeerMismatch) as err:
            await sidecar.call(STATUS, b"")
        msg = str(err.value)
        assert f"spiffe://{TD}/ops/relayer/r1" in msg and "not the expected sentry" in msg
        assert f"spiffe://{TD}/*/sentry/*" in msg and err.value.outcome == "wrong_peer"
        # pinning that relayer explicitly is honoured (the pin decides, nothing else)
        tunnel = await pinned_dial("127.0.0.1", server.port, client,
                                   [f"spiffe://{TD}/ops/relayer/r1"])()
        assert str(tunnel.peer.spiffe_id) == f"spiffe://{TD}/ops/relayer/r1"
        await tunnel.close()
        with pytest.raises(SentryConfigError, match="expect-peer"):
            pinned_dial("127.0.0.1", server.port, client, ["https://not-spiffe"])
    finally:
        server.close()
        await server.wait_closed()
