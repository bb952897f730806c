"""Edge cases of the directive bindings: global rate-limit scope, a failing CA on rekey,
rekeys and slashes aimed at other nodes."""

from __future__ import annotations

from pathlib import Path

import pytest

from pqcnet import qstp
from pqcnet.crypto.pqc import SigningKey
from pqcnet.identity import MeshCA, NodeIdentity
from pqcnet.identity.spiffe import SpiffeId
from pqcnet.mesh.directives import ForceRekey, RateLimitUpdate, SlashNotice
from pqcnet.mesh.envelope import NodeKeys
from pqcnet.mesh.errors import DirectiveError
from pqcnet.runtime.governance import QstpEndpoint, SentryDirectives, peer_key
from pqcnet.sentry.config import load_config
from pqcnet.sentry.core import Sentry
from pqcnet.sentry.limiter import Plan

from ..sentry.harness import TD, Mesh, config_dict, write_config

pytestmark = pytest.mark.timeout(60)


async def test_global_scope_replaces_default_and_every_tenant_plan(tmp_path: Path) -> None:
    # (async: the sentry's backends bind to the running loop)
    issuer = SigningKey.from_seed(b"\x01" * 32)
    mesh = Mesh(None, None, None, None, issuer, SigningKey.from_seed(b"\x02" * 32))  # type: ignore[arg-type]
    sentry = Sentry(load_config(write_config(tmp_path, mesh, config_dict(1, 2, 3))))
    binding = SentryDirectives(sentry)
    binding.on_rate_limit(RateLimitUpdate("globex", 3.0, 4))
    assert sentry.limiter.plan_for("globex") == Plan(3.0, 4)
    assert sentry.limiter.plan_for("acme") == Plan(1000, 1000)
    binding.on_rate_limit(RateLimitUpdate("*", 2.0, 2))
    for tenant in ("acme", "globex", "never-configured"):
        assert sentry.limiter.plan_for(tenant) == Plan(2.0, 2)
    assert binding.applied["rate_limit"] == 2
    await sentry.aclose()


async def test_rekey_with_a_failing_ca_keeps_the_old_identity_serving() -> None:
    ca = MeshCA.create(TD)
    key = SigningKey.generate()
    server_id = ca.issue(f"spiffe://{TD}/ops/sentry/s1", key=key)
    client_id = ca.issue(f"spiffe://{TD}/acme/sidecar/c1")
    keys = NodeKeys("s1", key)
    other = SigningKey.generate()

    def wrong_key(sid: SpiffeId, k: SigningKey) -> NodeIdentity:
        return ca.issue(sid, key=other)  # not the key we asked for

    endpoint = QstpEndpoint(server_id, keys, wrong_key)
    port = await endpoint.serve()
    try:
        await endpoint.on_force_rekey(ForceRekey("someone-else", 2))  # not for us
        keys.signing_key, keys.key_version = SigningKey.generate(), 2  # the agent rotated
        with pytest.raises(DirectiveError):
            await endpoint.on_force_rekey(ForceRekey("s1", 2))
        assert endpoint.identity is server_id and endpoint.rekeys == 0
        t = await qstp.connect("127.0.0.1", port, client_id)
        assert peer_key(t).key_id == key.public_key.key_id
        await t.close()
        # a slash of ourselves is logged, not applied to our own gate
        await endpoint.on_slash(SlashNotice("s1", "test"))
        assert len(endpoint.gate) == 0
    finally:
        await endpoint.aclose()
