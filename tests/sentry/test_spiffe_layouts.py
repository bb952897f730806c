"""Issue 12 §4: a sidecar whose SPIFFE ID has another path shape
(``spiffe://pqcnet.test/ns/acme/sa/web``) is tenant acme only when the sentry's config
names a layout for it; without one it has no tenant and its assertions are refused
(fail closed). Real sentry, real sidecar, real tunnels."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from pqcnet.crypto.pqc import SigningKey
from pqcnet.errors import PqcnetError
from pqcnet.identity import dev_identities
from pqcnet.sentry.config import load_config
from pqcnet.sentry.errors import SentryConfigError
from pqcnet.sentry.wire import RequestHead

from .harness import TD, HttpBackend, Mesh, config_dict, sentry_stack, write_config

pytestmark = pytest.mark.timeout(60)
STATUS = RequestHead("http", "GET", "/status")
K8S = f"spiffe://{TD}/ns/acme/sa/web"


async def test_other_shape_sidecar_needs_a_layout(tmp_path: Path) -> None:
    _ca, (sentry_id, web, globex) = dev_identities(
        TD, f"spiffe://{TD}/ops/sentry/s1", K8S, f"spiffe://{TD}/globex/sidecar/g1")
    mesh = Mesh(sentry_id, web, globex, globex, SigningKey.from_seed(b"\x01" * 32),
                SigningKey.from_seed(b"\x02" * 32))
    with HttpBackend() as http:
        for layouts, status in (([], 401), ([{"template": f"spiffe://{TD}/ns/{{tenant}}/sa/{{node}}",
                                             "role": "sidecar"}], 200)):
            cfg = config_dict(http.port, 1, 1)
            cfg["acl"] = {"rules": {"acme": [{"from": [f"spiffe://{TD}/ns/acme/sa/*"],
                                              "methods": ["GET /status"]}]}}
            cfg["spiffe_layouts"] = layouts
            path = write_config(tmp_path, mesh, cfg)
            async with sentry_stack(mesh, path) as stack:
                sidecar = stack.sidecar(web, mesh.acme_issuer, "acme")
                try:
                    head, stream, _ = await sidecar.call(STATUS, b"")
                    with contextlib.suppress(PqcnetError):
                        await stream.read_all(1 << 20)
                finally:
                    await sidecar.aclose()
            assert head.status == status, (layouts, head)
    cfg["spiffe_layouts"] = [{"template": f"spiffe://{TD}/ns/{{node}}"}]  # no tenant
    with pytest.raises(SentryConfigError, match="spiffe_layouts"):
        load_config(write_config(tmp_path, mesh, cfg))
