"""Policy anchors and attestation events land in a real QS-DAG ledger (RocksDB)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pqcnet.crypto.pqc import SigningKey
from pqcnet.qsdag import Ledger
from pqcnet.sentry.attestation import LedgerAnchor
from pqcnet.sentry.config import load_config
from pqcnet.sentry.core import Sentry
from pqcnet.sentry.metrics import SentryMetrics

from .harness import Mesh, config_dict, write_config

pytestmark = pytest.mark.timeout(60)


async def test_policy_anchored_at_load_and_reload_and_attestation_counter(
        mesh: Mesh, tmp_path: Path) -> None:
    gov = SigningKey.from_seed(b"\x09" * 32)
    node = SigningKey.from_seed(b"\x0a" * 32)
    path = write_config(tmp_path, mesh, config_dict(1, 2, 3))
    with Ledger.open(tmp_path / "ledger") as ledger:
        ledger.init_genesis("pqcnet-test", "gov-1", gov)
        ledger.register_author("sentry-1", node.public_key, registrar="gov-1", signer=gov)
        metrics = SentryMetrics()
        anchor = LedgerAnchor(ledger, "sentry-1", node, path.read_bytes(), metrics)
        sentry = Sentry(load_config(path), ledger=anchor, metrics=metrics)
        digest = sentry.sanitizer.digests()["acme"]
        anchored = ledger.views.policy_anchors.get(digest)
        assert anchored is not None and anchored["tenant"] == "acme"
        # reload with an unchanged sanitizer anchors nothing new; a changed one anchors
        n = len(ledger)
        sentry.reload(load_config(path).policy)
        assert len(ledger) == n
        cfg = config_dict(1, 2, 3)
        cfg["sanitizer"]["acme"]["headers"]["x-new"] = "strip"
        sentry.reload(load_config(write_config(tmp_path, mesh, cfg)).policy)
        new = sentry.sanitizer.digests()["acme"]
        assert new != digest and ledger.views.policy_anchors.get(new) is not None
        assert [anchor.attest().counter for _ in range(2)] == [1, 2]
        assert metrics.value("pqcnet_sentry_attestations_total") == 2
    with Ledger.open(tmp_path / "ledger") as ledger:  # counter survives a restart
        anchor = LedgerAnchor(ledger, "sentry-1", node, b"cfg")
        assert anchor.attest().counter == 3
        assert ledger.views.attestations.latest("sentry-1")["role"] == "sentry"
    await sentry.aclose()
