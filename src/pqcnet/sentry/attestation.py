"""What the sentry writes into the QS-DAG: policy anchors and attestation events.

:class:`LedgerAnchor` is the sentry's one seam to :mod:`qsdag`: it anchors each
sanitizer policy digest as a ``POLICY_ANCHOR`` vertex when the policy is loaded (so
an auditor can prove which policy was in force from when), and emits ``ATTESTATION``
vertices built by :func:`pqcnet.qsdag.build_attestation` with a counter that continues from
the ledger's last one for this node, so it stays monotonic across restarts.
:func:`attestation_loop` emits one at start and then every ``interval`` seconds.

The ledger is synchronous RocksDB; appends are small and rare (start, reload,
every minute), so they run inline rather than in a thread.
"""

from __future__ import annotations

import asyncio
import logging
import time

from pqcnet.crypto.pqc import SigningKey
from pqcnet.qsdag import AttestationEvent, Ledger, PolicyAnchor, VertexKind, build_attestation
from pqcnet.qsdag.ledger import AnchorReceipt
from pqcnet.sentry.metrics import SentryMetrics

log = logging.getLogger("pqcnet.sentry")
ROLE = "sentry"


class LedgerAnchor:
    """Anchors policies and attestations of one sentry node into a ledger."""

    def __init__(self, ledger: Ledger, node_id: str, signer: SigningKey,
                 config_bytes: bytes, metrics: SentryMetrics | None = None) -> None:
        self.ledger = ledger
        self.node_id = node_id
        self.signer = signer
        self.config_bytes = config_bytes
        self.metrics = metrics
        self.receipts: list[AnchorReceipt] = []

    def anchor_policy(self, tenant: str, digest: bytes, description: str) -> None:
        """One POLICY_ANCHOR vertex for ``tenant``'s policy ``digest``."""
        payload = PolicyAnchor(digest, tenant, int(time.time() * 1000), description)
        receipt = self.ledger.append(VertexKind.POLICY_ANCHOR, payload, self.node_id, self.signer)
        self.receipts.append(receipt)
        log.info("policy anchored", extra={"tenant": tenant, "policy": digest.hex()[:16],
                                           "vertex": receipt.id.hex()[:16]})

    def attest(self) -> AttestationEvent:
        """Measure, sign and anchor the next attestation event."""
        last = self.ledger.views.attestations.last_counter(self.node_id)
        counter = 1 if last is None else last + 1
        key_version = self.ledger.views.key_versions.current(self.node_id) or 1
        event = build_attestation(self.node_id, ROLE, self.signer, counter, self.config_bytes,
                                  key_version=key_version)
        self.receipts.append(
            self.ledger.append(VertexKind.ATTESTATION, event, self.node_id, self.signer))
        if self.metrics is not None:
            self.metrics.attestations.inc()
        return event


async def attestation_loop(anchor: LedgerAnchor, interval: float) -> None:
    """Attest now and every ``interval`` seconds until cancelled; failures are logged."""
    while True:
        try:
            anchor.attest()
        except Exception as exc:  # a ledger hiccup must not stop the sentry
            log.warning("attestation failed", extra={"error": repr(exc)})
        await asyncio.sleep(interval)
