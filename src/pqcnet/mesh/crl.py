"""CRL updates on the control plane: the CA's CRL, gossiped, checked, then swapped in.

A certificate revocation list is self-authenticating: the mesh CA signs it with
ML-DSA, so it may travel through any node. It rides gossip (item kind ``crl``, the
payload is the PEM), which also gives it DTN store-and-forward to nodes that are
away. Authority is the CA signature, never the sender: :meth:`CrlGate.offer` applies
a CRL only when

* it verifies against a CA in this node's trust bundle (else ``crl_untrusted``), and
* its CRL number is higher than the one held (an older one is ``crl_stale``, the same
  one again ``crl_duplicate``) — an attacker replaying yesterday's CRL cannot
  un-revoke anyone.

A refused CRL is counted (:attr:`CrlGate.results`, ``pqcnet_mesh_crl_updates_total``)
and neither applied nor forwarded. An accepted one is written atomically (fsync) to
``path`` when given, so a restarted node never falls back to an older CRL, and then
handed to every listener: the TLS layers swap their CRL there (the runtime registers
them; the mesh knows nothing about TLS).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

from pqcnet.identity.crl import RevocationList, load_crl
from pqcnet.identity.errors import IdentityError
from pqcnet.identity.keystore import atomic_write
from pqcnet.mesh import metrics
from pqcnet.mesh._aio import maybe_await
from pqcnet.mesh.errors import CrlRejected

log = logging.getLogger("pqcnet.mesh.crl")

#: Gossip item kind that carries a CRL (PEM payload).
CRL_GOSSIP_KIND = "crl"
#: Called with each newly accepted CRL.
CrlListener = Callable[[RevocationList], Awaitable[None] | None]


class CrlGate:
    """Holds this node's current CRL and admits only newer, CA-signed ones."""

    def __init__(self, trust_bundle_pem: bytes, *, initial: bytes | None = None,
                 path: Path | None = None) -> None:
        #: the CA certificates a CRL must chain to (replace it when the CA rotates)
        self.trust_bundle_pem = trust_bundle_pem
        self.path = path
        self.listeners: list[CrlListener] = []
        #: offers by result: applied, crl_untrusted, crl_stale, crl_duplicate
        self.results: Counter[str] = Counter()
        #: listener calls that raised (logged; the others still ran)
        self.listener_errors = 0
        self._current: RevocationList | None = None
        for source, pem in (("stored", self._stored()), ("initial", initial)):
            if pem is None:
                continue
            try:
                crl = self.check(pem)
            except CrlRejected as exc:
                if exc.reason == "crl_untrusted":
                    log.warning("ignoring a CRL that does not verify", extra={
                        "source": source, "error": str(exc)})
                continue
            self._current = crl

    def _stored(self) -> bytes | None:
        if self.path is None or not self.path.exists():
            return None
        return self.path.read_bytes()

    @property
    def current(self) -> RevocationList | None:
        """The CRL in force here (None until one is known)."""
        return self._current

    def check(self, pem: bytes) -> RevocationList:
        """The CRL if it is the CA's and newer than ours; else :class:`CrlRejected`."""
        try:
            crl = load_crl(pem, self.trust_bundle_pem)
        except IdentityError as exc:
            raise CrlRejected(f"CRL refused: {exc}", reason="crl_untrusted") from None
        cur = self._current
        if cur is not None and not crl.is_newer_than(cur):
            same = crl.number == cur.number
            raise CrlRejected(
                f"CRL number {crl.number} is {'the one held' if same else 'older than'} "
                f"{cur.number}", reason="crl_duplicate" if same else "crl_stale")
        return crl

    async def offer(self, pem: bytes, via: str) -> RevocationList:
        """Check, persist and swap in ``pem`` (relayed by ``via``); tell the listeners."""
        try:
            crl = self.check(pem)
        except CrlRejected as exc:
            self.results[exc.reason] += 1
            metrics.CRL_UPDATES.labels(exc.reason).inc()
            raise
        if self.path is not None:
            atomic_write(self.path, pem)
        self._current = crl
        self.results["applied"] += 1
        metrics.CRL_UPDATES.labels("applied").inc()
        log.info("CRL updated", extra={"crl_number": crl.number, "revoked": len(crl.revoked),
                                       "via": via})
        for listener in self.listeners:
            try:
                await maybe_await(listener(crl))
            except Exception as exc:  # one TLS layer's bug must not stop the others
                self.listener_errors += 1
                log.exception("CRL listener failed", extra={"error": str(exc)})
        return crl
