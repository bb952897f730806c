"""``pqcnet node run`` for a sentry over real go-waku nodes (a real subprocess).

Live traffic through a sidecar gets 200s; governance lowers the ``acme`` rate limit
with ``pqcnet mesh directive --rate`` and the running sentry starts answering 429.
The directive is anchored in the sentry's QS-DAG (``ledger`` in its config).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from pqcnet.crypto.pqc import SigningKey
from pqcnet.errors import PqcnetError
from pqcnet.qsdag import Ledger, VertexKind
from pqcnet.sentry.config import verify_key_pem
from pqcnet.sentry.sidecar import Sidecar
from pqcnet.sentry.wire import RequestHead

from ..sentry.harness import HttpBackend, config_dict, make_mesh, sidecar_to, write_config
from .harness import NodeProcess, namespace, run_cli, write_yaml

pytestmark = [pytest.mark.services, pytest.mark.timeout(150)]
STATUS = RequestHead("http", "GET", "/status")


async def _status(sidecar: Sidecar) -> int:
    head, stream, _rest = await sidecar.call(STATUS, b"")
    with contextlib.suppress(PqcnetError):
        await stream.read_all(1 << 20)
    return head.status


async def test_sentry_node_applies_rate_limit_directive(
        waku_rest_urls: list[str], tmp_path: Path) -> None:
    mesh = make_mesh()
    mesh.sentry.save(tmp_path / "sentry-id", None)
    gov = SigningKey.generate()
    (tmp_path / "gov.pem").write_bytes(gov.to_pem())
    (tmp_path / "gov.pub").write_bytes(verify_key_pem(gov.public_key))
    ns = namespace()
    with HttpBackend() as http:
        write_config(tmp_path, mesh, {**config_dict(http.port, 1, 1),
                                      "identity_dir": "sentry-id", "ledger": "ledger"})
        config = write_yaml(tmp_path / "node.yaml", {
            "role": "sentry", "sentry": "sentry.yaml",
            "control_plane": {"transport": "waku", "waku_rest_urls": waku_rest_urls[:1],
                              "namespace": ns, "governance": {"keys": ["gov.pub"]},
                              "announce_interval_s": 1.0},
        })
        async with NodeProcess(config) as node:
            sidecar = sidecar_to(node.ready["port"], mesh.acme, mesh.acme_issuer)
            try:
                assert [await _status(sidecar) for _ in range(6)] == [200] * 6
                limited = False
                for _attempt in range(5):  # re-issue if published before the mesh grafted
                    status, out, err = await run_cli(
                        "mesh", "directive", "--waku", waku_rest_urls[-1], "--namespace", ns,
                        "--key", str(tmp_path / "gov.pem"), "--rate", "0.2", "--burst", "2",
                        "--scope", "acme")
                    assert status == 0, err
                    assert json.loads(out)["action"] == "rate_limit"
                    for _ in range(15):
                        if await _status(sidecar) == 429:
                            limited = True
                            break
                    if limited:
                        break
                assert limited, "rate-limit directive never took effect on the sentry"
                after = [await _status(sidecar) for _ in range(8)]
                assert set(after) <= {200, 429} and after.count(429) >= 6, after
            finally:
                await sidecar.aclose()
            status = await node.stop()
        assert status == 0, node.stderr.decode()[-2000:]
    ledger = Ledger.open(tmp_path / "ledger")
    try:
        kinds = [ledger.get(v).kind for v in ledger.ids()]
        assert VertexKind.GOVERNANCE_DIRECTIVE in kinds
    finally:
        ledger.close()
