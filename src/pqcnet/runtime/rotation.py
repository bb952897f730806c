"""Identities that live: renewal before expiry, hot reload from disk, CRL refresh.

An :class:`IdentityManager` owns a node's :class:`~pqcnet.identity.NodeIdentity` while
a long-running role runs. Every ``poll_s`` it:

1. **watches the identity directory** (``cert.pem``, ``bundle.pem``, ``crl.pem``,
   ``key.pem``): when any of them changed (cert-manager or a Vault agent updating a
   mounted Secret, ``pqcnet ca issue`` into the same directory) it loads the whole
   identity again. :meth:`NodeIdentity.load` checks that key and certificate match,
   so a half-written pair is never taken: the load fails, the old identity stays, and
   the next poll tries again;
2. **renews** once ``renew_at`` (default 1/2, as Linkerd and SPIRE do) of the
   lifetime has passed, through a :class:`Renewer` (the CA service's ``/v1/rotate``
   or an on-disk CA), writes the result to the directory and applies it. A failed
   renewal is retried with exponential backoff; once less than a quarter of the
   lifetime is left it raises an alarm (metric + error log) — long before expiry;
3. **refreshes the CRL** from ``crl_url`` (``GET /v1/crl`` with ETag) when one is
   configured (else the ``crl.pem`` file is watched as part of 1), verified against
   the trust bundle; only a newer CRL replaces the held one. It is written to the
   directory when that is writable, else held in memory (read-only mounts).

Changes reach the role through callbacks. :class:`ServerBinding` is the one for a
QSTP server: new handshakes use the new identity at once; tunnels made under the
previous certificate get a GOAWAY ("certificate renewed") well before that
certificate expires, tunnels of a peer that became revoked one ("peer certificate
revoked") at the next poll, and tunnels of a peer whose own certificate is about
to expire one ("peer certificate expires") — so no tunnel outlives either side's
certificate, and peers reconnect on the new one.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import Counter, Gauge

from pqcnet._util.tasks import cancel_and_wait
from pqcnet.errors import PqcnetError
from pqcnet.identity.certs import utcnow
from pqcnet.identity.crl import RevocationList, load_crl
from pqcnet.identity.node import BUNDLE_FILE, CERT_FILE, CRL_FILE, KEY_FILE, NodeIdentity
from pqcnet.qstp.aio.server import Server
from pqcnet.qstp.tls import PeerInfo

log = logging.getLogger(__name__)

CERT_EXPIRY = Gauge("pqcnet_identity_cert_expiry_seconds",
                    "Seconds until this node's certificate expires", ["spiffe_id"])
RENEWALS = Counter("pqcnet_identity_renewals", "Certificate renewals by result", ["result"])
RELOADS = Counter("pqcnet_identity_reloads", "Identity changes applied, by source", ["source"])
CRL_AGE = Gauge("pqcnet_identity_crl_age_seconds",
                "Seconds since the held CRL was issued (its thisUpdate)", ["spiffe_id"])
RENEWAL_ALARM = Gauge("pqcnet_identity_renewal_alarm",
                      "1 while renewal keeps failing with under a quarter of the lifetime left",
                      ["spiffe_id"])

#: Files whose change triggers a reload.
WATCHED = (CERT_FILE, BUNDLE_FILE, CRL_FILE, KEY_FILE)


class Renewer(Protocol):
    """Where a renewed identity comes from."""

    async def renew(self, current: NodeIdentity, *, rotate_key: bool = True) -> NodeIdentity:
        """A new certificate for ``current``'s SPIFFE ID (and a new key unless
        ``rotate_key`` is false: roles whose key is registered in the QS-DAG keep it)."""
        ...


class CaServiceRenewer:
    """Renew through ``pqcnet ca serve``'s ``POST /v1/rotate`` (mutual TLS), with an
    attestation of this installation signed by the key being certified: a CA that
    requires one for the node's role (``attest_roles``) refuses a renewal without it,
    and the node would go dark when its certificate expires. IDs of another shape than
    ``tenant/role/node`` name no role here and renew without one."""

    def __init__(self, url: str, *, timeout_s: float = 15.0) -> None:
        self.url = url
        self.timeout_s = timeout_s

    async def renew(self, current: NodeIdentity, *, rotate_key: bool = True) -> NodeIdentity:
        from pqcnet.runtime.enroll import rotate

        return await rotate(self.url, current, None if rotate_key else current.key,
                            attest=bool(current.spiffe_id.role), timeout_s=self.timeout_s)


class LocalCaRenewer:
    """Renew with a CA directory on this machine (``load_ca`` opens it with its key).
    ``hold`` is the directory's writer lock (:func:`pqcnet.identity.ca_lock.ca_writer`),
    held from the load to the save: refused while ``pqcnet ca serve`` serves the
    directory (renew through it, ``--renew-ca-url``), so its next write cannot drop
    the record of this certificate."""

    def __init__(self, load_ca: Callable[[], object], save_ca: Callable[[object], None],
                 ttl: dt.timedelta | None = None, *,
                 hold: Callable[[], AbstractContextManager[None]] = nullcontext) -> None:
        self._load_ca = load_ca
        self._save_ca = save_ca
        self._hold = hold
        self.ttl = ttl

    async def renew(self, current: NodeIdentity, *, rotate_key: bool = True) -> NodeIdentity:
        def work() -> NodeIdentity:
            from pqcnet.identity.ca import MeshCA

            with self._hold():
                ca = self._load_ca()
                assert isinstance(ca, MeshCA)
                ttl = self.ttl or (current.not_after - current.issued_at)
                new = ca.renew(current, min(ttl, ca.policy.max_ttl), rotate_key=rotate_key)
                self._save_ca(ca)
            return new

        return await asyncio.to_thread(work)


@dataclass(frozen=True)
class RotationConfig:
    """How an :class:`IdentityManager` keeps its identity alive."""

    #: renew once this fraction of the certificate's lifetime has passed
    renew_at: float = 0.5
    #: seconds between looks at the directory, the clock and the CRL schedule
    poll_s: float = 2.0
    #: ``https://ca:port`` or ``http://ca:crlport`` serving ``/v1/crl`` ("" = watch crl.pem)
    crl_url: str = ""
    #: seconds between CRL fetches
    crl_refresh_s: float = 30.0
    #: first retry delay after a failed renewal, doubling up to ``retry_max_s``
    retry_min_s: float = 1.0
    retry_max_s: float = 60.0
    #: a new key with every renewal (false for a relayer: its key signs QS-DAG proofs)
    rotate_key: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.renew_at < 1.0:
            raise PqcnetError("renew_at must be between 0 and 1 (exclusive)")
        if self.poll_s <= 0 or self.crl_refresh_s <= 0 or self.retry_min_s <= 0:
            raise PqcnetError("rotation intervals must be positive")


#: ``callback(identity, certificate_changed)``: the role applies the identity.
OnChange = Callable[[NodeIdentity, bool], Awaitable[None]]


class IdentityManager:
    """Keeps one node identity current (see the module docstring)."""

    def __init__(self, directory: Path, load: Callable[[], NodeIdentity],
                 save: Callable[[NodeIdentity], None], *, renewer: Renewer | None = None,
                 config: RotationConfig | None = None, initial: NodeIdentity | None = None
                 ) -> None:
        self.directory = Path(directory)
        self._load = load
        self._save = save
        self.renewer = renewer
        self.config = config or RotationConfig()
        self.identity = initial or load()
        self._stamp = self._files_stamp()
        self._callbacks: list[OnChange] = []
        self._stoppers: list[Callable[[], Awaitable[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self._next_renew_try = 0.0
        self._retry_s = self.config.retry_min_s
        self._next_crl = 0.0
        self._crl_etag = ""
        #: the directory refused a CRL write once: later CRLs are held in memory quietly
        self._crl_in_memory = False
        self.renewals_ok = 0
        self.renewals_failed = 0
        self.reloads = 0
        self._observe()

    def on_change(self, callback: OnChange) -> None:
        """Call ``callback(identity, certificate_changed)`` after every applied change."""
        self._callbacks.append(callback)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def on_stop(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` first when :meth:`stop` is called (bindings stop with us)."""
        self._stoppers.append(callback)

    async def stop(self) -> None:
        for stopper in self._stoppers:
            await stopper()
        await cancel_and_wait(self._task)

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except PqcnetError as exc:  # a bad tick never ends the loop
                log.warning("identity manager tick failed", extra={"reason": str(exc)})
            await asyncio.sleep(self.config.poll_s)

    # ------------------------------------------------------------------ one step

    async def tick(self) -> None:
        """One poll: disk, renewal, CRL (tests call this directly)."""
        await self._check_disk()
        await self._maybe_renew()
        await self._maybe_fetch_crl()
        self._observe()

    def _files_stamp(self) -> tuple[tuple[int, int] | None, ...]:
        out: list[tuple[int, int] | None] = []
        for name in WATCHED:
            try:
                st = os.stat(self.directory / name)
            except OSError:
                out.append(None)
            else:
                out.append((st.st_mtime_ns, st.st_size))
        return tuple(out)

    async def _check_disk(self) -> None:
        stamp = self._files_stamp()
        if stamp == self._stamp:
            return
        try:
            new = await asyncio.to_thread(self._load)
        except PqcnetError as exc:
            # half-written or mismatched pair: keep serving, look again next poll
            log.info("identity files changed but do not load yet",
                     extra={"dir": str(self.directory), "reason": str(exc)})
            return
        self._stamp = stamp
        if (new.cert_chain_pem == self.identity.cert_chain_pem
                and new.trust_bundle_pem == self.identity.trust_bundle_pem
                and new.crl_pem == self.identity.crl_pem):
            return
        if new.crl_pem is not None and self.identity.crl_pem is not None and (
                new.trust_bundle_pem == self.identity.trust_bundle_pem):
            try:
                if not load_crl(new.crl_pem, new.trust_bundle_pem).is_newer_than(
                        load_crl(self.identity.crl_pem, self.identity.trust_bundle_pem)):
                    new = new.with_crl(self.identity.crl_pem)  # never step back
            except PqcnetError:
                new = new.with_crl(self.identity.crl_pem)
        await self._apply(new, "disk")

    async def _maybe_renew(self) -> None:
        if self.renewer is None:
            return
        now = utcnow()
        if not self.identity.needs_renewal(now, self.config.renew_at):
            return
        loop_now = asyncio.get_running_loop().time()
        if loop_now < self._next_renew_try:
            return
        current = self.identity
        try:
            new = await self.renewer.renew(current, rotate_key=self.config.rotate_key)
            if current.crl_pem is not None and new.crl_pem is None:
                new = new.with_crl(current.crl_pem)
            await asyncio.to_thread(self._save, new)
        except PqcnetError as exc:
            self.renewals_failed += 1
            RENEWALS.labels(result="failed").inc()
            self._next_renew_try = loop_now + self._retry_s
            self._retry_s = min(self._retry_s * 2, self.config.retry_max_s)
            left = (current.not_after - now).total_seconds()
            life = (current.not_after - current.not_before).total_seconds()
            alarm = left < life / 4
            RENEWAL_ALARM.labels(spiffe_id=str(current.spiffe_id)).set(1 if alarm else 0)
            (log.error if alarm else log.warning)(
                "certificate renewal failed" + ("; certificate expires soon" if alarm else ""),
                extra={"spiffe_id": str(current.spiffe_id), "reason": str(exc),
                       "seconds_left": round(left, 1), "retry_in_s": self._retry_s})
            return
        self.renewals_ok += 1
        RENEWALS.labels(result="ok").inc()
        RENEWAL_ALARM.labels(spiffe_id=str(current.spiffe_id)).set(0)
        self._retry_s = self.config.retry_min_s
        self._stamp = self._files_stamp()  # our own write is not a foreign change
        log.info("certificate renewed", extra={"spiffe_id": str(new.spiffe_id),
                                               "serial": format(new.serial, "x"),
                                               "not_after": new.not_after.isoformat()})
        await self._apply(new, "renewal")

    async def _maybe_fetch_crl(self) -> None:
        if not self.config.crl_url:
            return
        loop_now = asyncio.get_running_loop().time()
        if loop_now < self._next_crl:
            return
        self._next_crl = loop_now + self.config.crl_refresh_s
        from pqcnet.runtime.enroll import fetch_crl

        ident = self.identity
        try:
            pem, etag = await fetch_crl(self.config.crl_url, ident.trust_bundle_pem,
                                        ident.spiffe_id.trust_domain, etag=self._crl_etag)
            if pem is None:
                return
            fresh = load_crl(pem, ident.trust_bundle_pem)
            held = self._held_crl(ident)
        except PqcnetError as exc:
            log.warning("CRL refresh failed", extra={"url": self.config.crl_url,
                                                     "reason": str(exc)})
            return
        self._crl_etag = etag
        if not fresh.is_newer_than(held):
            return
        new = ident.with_crl(pem)
        try:
            await asyncio.to_thread(self._write_crl, pem)
        except OSError as exc:
            # a read-only identity directory (a mounted Secret, a compose ``:ro`` bind):
            # the CRL still applies, held in memory and fetched again after a restart;
            # said once (the CA re-signs every max-age: a line per refresh is noise)
            (log.debug if self._crl_in_memory else log.warning)(
                "CRL applied in memory only: cannot write it to the identity directory",
                extra={"dir": str(self.directory), "error": str(exc)})
            self._crl_in_memory = True
        await self._apply(new, "crl")

    def _write_crl(self, pem: bytes) -> None:
        from pqcnet.identity.keystore import atomic_write

        atomic_write(self.directory / CRL_FILE, pem)
        self._stamp = self._files_stamp()

    @staticmethod
    def _held_crl(ident: NodeIdentity) -> RevocationList | None:
        if ident.crl_pem is None:
            return None
        try:
            return load_crl(ident.crl_pem, ident.trust_bundle_pem)
        except PqcnetError:
            return None

    async def _apply(self, new: NodeIdentity, source: str) -> None:
        changed = new.cert_chain_pem != self.identity.cert_chain_pem
        self.identity = new
        self.reloads += 1
        RELOADS.labels(source=source).inc()
        log.info("identity applied", extra={"source": source, "certificate_changed": changed,
                                            "serial": format(new.serial, "x")})
        for callback in self._callbacks:
            try:
                await callback(new, changed)
            except PqcnetError as exc:
                log.error("applying the new identity failed", extra={"reason": str(exc)})

    def _observe(self) -> None:
        ident = self.identity
        sid = str(ident.spiffe_id)
        CERT_EXPIRY.labels(spiffe_id=sid).set((ident.not_after - utcnow()).total_seconds())
        crl = self._held_crl(ident)
        if crl is not None:
            CRL_AGE.labels(spiffe_id=sid).set((utcnow() - crl.last_update).total_seconds())


class ServerBinding:
    """Applies an :class:`IdentityManager`'s changes to a QSTP :class:`Server`."""

    #: end tunnels of the previous certificate this long before it expires (seconds),
    #: and tunnels of a peer whose certificate expires within it
    def __init__(self, server: Server, manager: IdentityManager, *,
                 expiry_margin_s: float = 3.0) -> None:
        self.server = server
        self.manager = manager
        self.expiry_margin_s = expiry_margin_s
        self._retire: list[tuple[dt.datetime, list[object]]] = []
        self._task: asyncio.Task[None] | None = None
        manager.on_change(self.apply)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def apply(self, identity: NodeIdentity, certificate_changed: bool) -> None:
        old = self.server.identity
        self.server.update_identity(identity)
        if certificate_changed:
            # tunnels made under the old certificate: GOAWAY before it expires
            self._retire.append((old.not_after, list(self.server.open_tunnels())))
        await self.sweep()

    async def sweep(self) -> None:
        """End what must not live on: revoked peers, expiring peers, retired tunnels."""
        now = utcnow()
        margin = dt.timedelta(seconds=self.expiry_margin_s)
        revoked = IdentityManager._held_crl(self.manager.identity)

        def is_revoked(peer: PeerInfo) -> str | None:
            if revoked is not None and revoked.is_revoked(peer.cert_serial):
                return "peer certificate revoked"
            return None

        def expires(peer: PeerInfo) -> str | None:
            return "peer certificate expires" if peer.cert_not_after - now <= margin else None

        await self.server.end_tunnels(is_revoked)  # at once: not one more request
        await self.server.end_tunnels(expires, grace_s=self.expiry_margin_s / 2)
        due = [(t, ts) for t, ts in self._retire if t - now <= margin * 2]
        self._retire = [(t, ts) for t, ts in self._retire if t - now > margin * 2]
        for _, tunnels in due:
            # graceful: in-flight streams finish, the peer reconnects for new ones
            await self.server.end_tunnels(lambda _p: "certificate renewed; reconnect",
                                          among=tunnels,  # type: ignore[arg-type]
                                          grace_s=self.expiry_margin_s / 2)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.manager.config.poll_s))
            try:
                await self.sweep()
            except PqcnetError as exc:
                log.warning("tunnel sweep failed", extra={"reason": str(exc)})


async def bind_server(server: Server, manager: IdentityManager,
                      follow: OnChange | None = None) -> ServerBinding:
    """Start ``manager`` with ``server`` following it (and ``follow`` called first on
    every change, to update whatever else holds the identity)."""
    if follow is not None:
        manager.on_change(follow)
    binding = ServerBinding(server, manager)
    manager.on_stop(binding.stop)
    await manager.start()
    await binding.start()
    return binding


async def bind_sentry(service: Any, manager: IdentityManager) -> ServerBinding:
    """Bind a running sentry (``pqcnet sentry run``; a
    :class:`~pqcnet.runtime.sentry.SentryService`, typed loosely so this module does not
    pull the sentry role into the core install): its endpoint's server and the
    identity it dials with follow the manager."""
    endpoint = service.endpoint
    if endpoint is None or endpoint.server is None:
        raise PqcnetError("sentry is not serving")

    async def follow(identity: NodeIdentity, _changed: bool) -> None:
        service.identity = identity
        endpoint.identity = identity

    return await bind_server(endpoint.server, manager, follow)


async def bind_relayer(node: Any, manager: IdentityManager) -> ServerBinding:
    """Bind a running relayer (a :class:`~pqcnet.relayer.node.RelayerNode`, typed loosely
    so the core install — ``qstp serve`` uses this module — does not need the relayer's
    bus clients): its server follows the manager, and ``node.identity``
    too (the key stays with ``rotate_key=False``; the proof signer follows the key)."""
    if node.server is None:
        raise PqcnetError("relayer is not running")

    async def follow(identity: NodeIdentity, _changed: bool) -> None:
        node.identity = identity
        node.anchor.signer = identity.key

    return await bind_server(node.server, manager, follow)


def file_identity(directory: Path, passphrase: bytes | None
                  ) -> tuple[Callable[[], NodeIdentity], Callable[[NodeIdentity], None]]:
    """(load, save) for a plain identity directory with a file key under ``passphrase``."""

    def load() -> NodeIdentity:
        return NodeIdentity.load(directory, passphrase)

    def save(identity: NodeIdentity) -> None:
        identity.save(directory, passphrase)

    return load, save


__all__ = [
    "CaServiceRenewer",
    "IdentityManager",
    "LocalCaRenewer",
    "Renewer",
    "RotationConfig",
    "ServerBinding",
    "bind_relayer",
    "bind_sentry",
    "bind_server",
    "file_identity",
]
