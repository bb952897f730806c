"""The Shamir share service: custodians hand one share each to allowed nodes over QSTP.

A key split k-of-n (:mod:`pqcnet.identity.shamir`) needs k custodians to be up for a
node to start. Each custodian runs a :class:`ShareService` with its share file(s)
and an allow-list of the node SPIFFE IDs that may fetch; the node authenticates
with its own mesh certificate (mutual TLS 1.3, ML-DSA, hybrid ML-KEM) and pins each
custodian's SPIFFE ID, so neither side talks to an impostor. The starting node's
:class:`CustodianShareSource` asks all custodians at once, checks every share against
the public manifest, stops at k good ones and reports what failed otherwise. The
combine itself stays in :mod:`pqcnet.identity.shamir` (in memory; then dropped).

Wire format, one request per QSTP stream, JSON, each side bounded::

    node -> custodian   {"v": 1, "key_id": "<64 hex>"}                       + end
    custodian -> node   {"v": 1, "share": {<pqcnet-key-share/1>}}            + end
                     or {"v": 1, "error": {"code": "...", "message": "..."}} + end

Bad input gets an ``error`` answer on that stream and the service keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pqcnet import qstp
from pqcnet.errors import PqcnetError
from pqcnet.identity.errors import KeyStoreError, NotEnoughShares, ShareError
from pqcnet.identity.keyconfig import CustodianConfig, KeyStoreConfig, key_store_config
from pqcnet.identity.keyconfig import open_key_store as open_identity_key_store
from pqcnet.identity.keystore import KeyStore
from pqcnet.identity.node import NodeIdentity
from pqcnet.identity.shamir import KeyShare, ShareManifest
from pqcnet.identity.spiffe import SpiffeId, spiffe_matches
from pqcnet.qstp.errors import TunnelClosed
from pqcnet.qstp.frames import ErrorCode
from pqcnet.qstp.tls import TlsPolicy
from pqcnet.runtime.errors import ShareServiceError

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
#: A request is a key id in JSON: anything longer is refused unread past this.
MAX_REQUEST_BYTES = 1024
#: A response carries one share file (~400 bytes).
MAX_RESPONSE_BYTES = 16 * 1024
#: Requests one tunnel may make: a node needs one per key; more is probing.
MAX_REQUESTS_PER_TUNNEL = 8
#: Seconds a custodian waits for a request to arrive in full (a stalled client
#: must not hold the handler).
REQUEST_TIMEOUT_S = 5.0
#: Tunnels one custodian keeps at once (a handful of nodes start at a time).
MAX_TUNNELS = 64


# --------------------------------------------------------------------------- custodian


class ShareService:
    """A custodian's share service (see the module docstring)."""

    def __init__(self, identity: NodeIdentity, shares: Sequence[KeyShare],
                 allowed: Sequence[str], *, request_timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        if not allowed:
            raise ShareServiceError("bad_config", "the share service needs an allow-list of "
                                    "node SPIFFE IDs (it never serves a whole trust domain)")
        if not shares:
            raise ShareServiceError("bad_config", "the share service has no share to serve")
        self.identity = identity
        self.allowed = tuple(allowed)
        self.policy = TlsPolicy(allowed_peers=self.allowed)  # validates the patterns
        self._shares: dict[bytes, KeyShare] = {}
        for share in shares:
            if share.key_id in self._shares:
                raise ShareServiceError("bad_config", f"two shares for key {share.key_id.hex()}")
            self._shares[share.key_id] = share
        self.request_timeout_s = request_timeout_s
        self.released = 0
        """Shares handed out since start."""
        self.rejected = 0
        """Requests answered with an error since start."""

    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> qstp.Server:
        """Listen; the TLS policy refuses any peer outside the allow-list at handshake."""
        return await qstp.serve(self.handle, host, port, self.identity, self.policy,
                                max_tunnels=MAX_TUNNELS)

    async def handle(self, tunnel: qstp.Tunnel) -> None:
        """Answer up to :data:`MAX_REQUESTS_PER_TUNNEL` requests, one per stream."""
        peer = tunnel.peer.spiffe_id
        if not any(spiffe_matches(p, peer) for p in self.allowed):  # defence in depth
            log.warning("share request from a peer outside the allow-list",
                        extra={"peer": str(peer)})
            return
        served = 0
        async for stream in tunnel:
            if served >= MAX_REQUESTS_PER_TUNNEL:
                stream.reset(ErrorCode.CANCELLED, "too many requests on one tunnel")
                return
            served += 1
            await self._answer(stream, peer)

    async def _answer(self, stream: qstp.Stream, peer: SpiffeId) -> None:
        try:
            try:
                async with asyncio.timeout(self.request_timeout_s):
                    raw = await _read_bounded(stream, MAX_REQUEST_BYTES)
            except TimeoutError:
                reply = self._error("timeout",
                                    f"no complete request in {self.request_timeout_s}s")
            else:
                reply = (self._respond(raw, peer) if raw is not None else
                         self._error("too_large", f"request over {MAX_REQUEST_BYTES} bytes"))
            await stream.send(json.dumps(reply).encode(), end=True)
        except TunnelClosed:
            return  # the peer reset this stream or left: nothing to answer

    def _respond(self, raw: bytes, peer: SpiffeId) -> dict[str, object]:
        try:
            request = json.loads(raw)
        except ValueError:
            return self._error("bad_request", "request is not JSON")
        if not isinstance(request, dict) or request.get("v") != PROTOCOL_VERSION:
            return self._error("bad_request", f"expected a version {PROTOCOL_VERSION} request")
        key_id = request.get("key_id")
        if not isinstance(key_id, str) or len(key_id) != 64:
            return self._error("bad_request", "key_id must be 64 hex digits")
        try:
            share = self._shares.get(bytes.fromhex(key_id))
        except ValueError:
            return self._error("bad_request", "key_id must be 64 hex digits")
        if share is None:
            return self._error("not_found", f"no share held for key {key_id[:16]}")
        self.released += 1
        log.info("share released", extra={"peer": str(peer), "key_id": key_id[:16],
                                           "share_index": share.index})
        return {"v": PROTOCOL_VERSION, "share": share.to_json()}

    def _error(self, code: str, message: str) -> dict[str, object]:
        self.rejected += 1
        log.info("share request refused", extra={"code": code, "reason": message})
        return {"v": PROTOCOL_VERSION, "error": {"code": code, "message": message}}


async def _read_bounded(stream: qstp.Stream, limit: int) -> bytes | None:
    """The stream's bytes until its end, or None as soon as they pass ``limit``."""
    parts: list[bytes] = []
    total = 0
    while chunk := await stream.recv():
        total += len(chunk)
        if total > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


# --------------------------------------------------------------------------- node


@dataclass(frozen=True, slots=True)
class _Outcome:
    custodian: CustodianConfig
    share: KeyShare | None
    problem: str = ""


async def fetch_share(custodian: CustodianConfig, identity: NodeIdentity, key_id: bytes,
                      *, timeout_s: float) -> KeyShare:
    """Ask one custodian (pinned by SPIFFE ID) for its share of ``key_id``."""
    host, port = custodian.host_port
    policy = TlsPolicy(allowed_peers=(custodian.spiffe_id,))
    request = json.dumps({"v": PROTOCOL_VERSION, "key_id": key_id.hex()}).encode()
    try:
        async with asyncio.timeout(timeout_s):
            tunnel = await qstp.connect(host, port, identity, policy)
            try:
                stream = tunnel.open_stream()
                await stream.send(request, end=True)
                raw = await stream.read_all(MAX_RESPONSE_BYTES)
            finally:
                await tunnel.close()
    except TimeoutError:
        raise ShareServiceError("unavailable", f"no answer in {timeout_s}s") from None
    except PqcnetError as exc:
        if isinstance(exc, ShareServiceError):
            raise
        raise ShareServiceError("unavailable", str(exc)) from None
    return _parse_reply(raw)


def _parse_reply(raw: bytes) -> KeyShare:
    try:
        reply = json.loads(raw)
    except ValueError:
        raise ShareServiceError("bad_reply", "custodian reply is not JSON") from None
    if not isinstance(reply, dict) or reply.get("v") != PROTOCOL_VERSION:
        raise ShareServiceError("bad_reply", "custodian reply has no known version")
    error = reply.get("error")
    if isinstance(error, dict):
        raise ShareServiceError(str(error.get("code", "error")), str(error.get("message", "")))
    try:
        return KeyShare.from_json(reply.get("share"), "custodian's share")
    except ShareError as exc:
        raise ShareServiceError("bad_reply", str(exc)) from None


class CustodianShareSource:
    """Gathers k shares from custodians over QSTP (a :class:`~pqcnet.identity.shamir.ShareSource`).

    :meth:`gather` blocks (it runs its own event loop): from async code call the key
    store's ``load`` through ``asyncio.to_thread``, or use :meth:`agather`.
    """

    def __init__(self, custodians: Sequence[CustodianConfig], identity: NodeIdentity, *,
                 timeout_s: float = 10.0) -> None:
        if not custodians:
            raise ShareServiceError("bad_config", "no custodians configured")
        self.custodians = tuple(custodians)
        self.identity = identity
        self.timeout_s = timeout_s

    def gather(self, manifest: ShareManifest) -> list[KeyShare]:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.agather(manifest))
        raise KeyStoreError("gathering shares blocks: from async code use "
                            "`await asyncio.to_thread(store.load)` or agather()")

    async def agather(self, manifest: ShareManifest) -> list[KeyShare]:
        """Ask every custodian at once; return as soon as ``threshold`` good shares arrived."""
        tasks = [asyncio.create_task(self._one(c, manifest)) for c in self.custodians]
        good: dict[int, KeyShare] = {}
        problems: list[str] = []
        try:
            for next_done in asyncio.as_completed(tasks):
                outcome = await next_done
                if outcome.share is None:
                    problems.append(f"{outcome.custodian.spiffe_id}: {outcome.problem}")
                    log.warning("custodian gave no share", extra={
                        "custodian": outcome.custodian.spiffe_id, "reason": outcome.problem})
                else:
                    good.setdefault(outcome.share.index, outcome.share)
                if len(good) >= manifest.threshold:
                    break
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if len(good) < manifest.threshold:
            raise NotEnoughShares(
                f"{len(good)} of {manifest.threshold} shares gathered from "
                f"{len(self.custodians)} custodians; " + "; ".join(problems))
        return list(good.values())

    async def _one(self, custodian: CustodianConfig, manifest: ShareManifest) -> _Outcome:
        try:
            share = await fetch_share(custodian, self.identity, manifest.key_id,
                                      timeout_s=self.timeout_s)
            manifest.check(share)
        except PqcnetError as exc:
            return _Outcome(custodian, None, str(exc))
        return _Outcome(custodian, share)


def open_key_store(
    config: KeyStoreConfig,
    *,
    passphrase: bytes | None = None,
    pin: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> KeyStore:
    """:func:`pqcnet.identity.keyconfig.open_key_store`, plus custodians over QSTP.

    For a Shamir store with custodians the client identity (its own key store, file
    or PKCS#11) is loaded now; shares are gathered when the store's ``load`` runs."""
    env = os.environ if environ is None else environ
    if config.kind != "shamir" or not config.custodians:
        return open_identity_key_store(config, passphrase=passphrase, pin=pin, environ=env)
    assert config.client_identity is not None  # KeyStoreConfig guarantees it
    client_cfg = config.client_key_store or key_store_config(
        None, default_dir=config.client_identity)
    client = NodeIdentity.load(config.client_identity,
                               key_store=open_identity_key_store(client_cfg, environ=env))
    source = CustodianShareSource(config.custodians, client, timeout_s=config.timeout_s)
    return open_identity_key_store(config, share_source=source, environ=env)
