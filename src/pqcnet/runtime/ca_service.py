"""The mesh CA as a long-running service: the HTTP API of seed 001 §7.

``pqcnet ca serve`` runs a :class:`CaService` behind :class:`~pqcnet.runtime.https.HttpsServer`
(TLS 1.3, X25519MLKEM768, the CA's ML-DSA server certificate, h11)::

    POST /v1/enroll      token + CSR (+ attestation)  -> leaf, CA bundle, mesh config
    POST /v1/rotate      CSR, client cert = current mesh cert -> new leaf
    GET  /v1/crl         signed CRL (PEM), ETag / Cache-Control; also on plain HTTP
    POST /v1/revoke      serial / spiffe_id (+ reason), client cert = an admin -> 204
    GET  /v1/mesh/peers  enrolled nodes and their status; client cert = a mesh cert

Errors are JSON ``{"error": {"code", "message"}}`` with the status of seed 001: 400
bad input (CSR, token format, JSON), 401 unknown/used/expired token or missing
client certificate, 403 policy or attestation, 404/405, 413, 429 rate limit. A
refused request writes nothing; the service keeps serving.

Every issuance and revocation is appended to the CA's QS-DAG ledger as a
``GOVERNANCE_DIRECTIVE`` vertex with content type ``pqcnet.ca.Issued`` /
``pqcnet.ca.Revoked`` (JSON body), signed by the CA key, before the answer is sent.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import ipaddress
import json
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from prometheus_client import Counter, Gauge

from pqcnet._util.tasks import cancel_and_wait
from pqcnet.crypto.errors import CryptoError
from pqcnet.crypto.pqc import SigningKey, VerifyKey
from pqcnet.errors import PqcnetError
from pqcnet.identity.ca import IssuancePolicy, MeshCA, write_state
from pqcnet.identity.certs import MAX_PEM_BYTES, load_certs, utcnow
from pqcnet.identity.csr import build_csr
from pqcnet.identity.errors import IdentityError, PolicyViolation
from pqcnet.identity.node import NodeIdentity
from pqcnet.identity.spiffe import SpiffeId, spiffe_matches, validate_pattern
from pqcnet.identity.tokens import (
    TokenError,
    TokenStore,
    ca_service_id,
    check_token_binding,
)
from pqcnet.proto import qsdag_pb2
from pqcnet.qsdag.attestation import AttestationEvent, MeasurementPolicy, verify_attestation
from pqcnet.qsdag.errors import LedgerError
from pqcnet.qsdag.ledger import Ledger
from pqcnet.qsdag.payloads import OpaqueRecord
from pqcnet.qsdag.vertex import VertexKind
from pqcnet.runtime.errors import CaServiceError
from pqcnet.runtime.https import HttpsServer, Request, Response

log = logging.getLogger(__name__)

#: QS-DAG author id of the CA (registered in the CA ledger's genesis).
CA_AUTHOR = "mesh-ca"
ISSUED_CONTENT_TYPE = "pqcnet.ca.Issued"
REVOKED_CONTENT_TYPE = "pqcnet.ca.Revoked"
#: Bound on the per-client rate-limit table (distinct client addresses kept).
MAX_RATE_KEYS = 10_000
#: Most queued vertices appended per trip to a worker thread.
MAX_ANCHOR_BATCH = 64
#: Bound on an attestation payload (a signed AttestationEvent plus a quote).
MAX_ATTESTATION_BYTES = 32 * 1024

REQUESTS = Counter("pqcnet_ca_requests", "CA service requests by endpoint and status",
                   ["endpoint", "status"])
TOKEN_REPLAYS = Counter("pqcnet_ca_token_replays",
                        "Enrollments refused because the token was already used")
ISSUED = Counter("pqcnet_ca_certificates_issued", "Certificates issued by the CA service",
                 ["path"])
REVOKED = Counter("pqcnet_ca_certificates_revoked", "Certificates revoked through the CA service")
ENROLLED_NODES = Gauge("pqcnet_ca_enrolled_nodes",
                       "SPIFFE IDs holding an unexpired, unrevoked certificate")
TOKENS = Gauge("pqcnet_ca_tokens", "Enrollment tokens in the CA's store by state (live: "
               "may still be redeemed), counted at start and every maintenance pass",
               ["state"])


@dataclass(frozen=True)
class CaServiceConfig:
    """What ``pqcnet ca serve`` enforces beyond the CA's :class:`IssuancePolicy`."""

    #: most distinct SPIFFE IDs with a live certificate per tenant (0 = no limit)
    max_nodes_per_tenant: int = 0
    #: tenants that may enroll (empty = any the CA policy allows)
    allowed_tenants: tuple[str, ...] = ()
    #: roles whose enrollment and rotation must carry an attestation
    attest_roles: tuple[str, ...] = ()
    #: accepted measurements for attested roles (``None`` = signature only)
    measurements: MeasurementPolicy | None = None
    #: SPIFFE patterns of callers allowed to POST /v1/revoke (empty = ``<td>/*/admin/*``)
    admin_patterns: tuple[str, ...] = ()
    #: enrollments per second per client address, and the burst above it
    enroll_rate: float = 20.0
    enroll_burst: int = 40
    #: certificate lifetime handed out (``None`` = the CA policy's default)
    cert_ttl: dt.timedelta | None = None
    #: mesh config returned on enroll
    bootstrap_peers: tuple[str, ...] = ()
    gossip_fanout: int = 3
    #: where enrolling nodes fetch the CRL (returned in the enroll answer's config): a
    #: name or address *clients* reach, never the bind address (``0.0.0.0`` would send
    #: every node to itself); empty = none advertised
    crl_url: str = ""
    #: Cache-Control max-age for GET /v1/crl, and how often the CRL is re-signed
    crl_max_age_s: int = 30

    def __post_init__(self) -> None:
        if self.max_nodes_per_tenant < 0 or self.enroll_rate <= 0 or self.enroll_burst < 1:
            raise CaServiceError(400, "bad_config", "limits must be positive")
        for pattern in self.admin_patterns:
            validate_pattern(pattern)
        if self.crl_url:
            check_advertised_url(self.crl_url, "crl_url")


def check_advertised_url(url: str, what: str) -> None:
    """Refuse a URL handed to other nodes that they cannot use: not http(s), no host,
    or a wildcard bind address (``0.0.0.0``, ``::``) instead of the service's name."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:
        port = 0
    if parts.scheme not in ("http", "https") or not host or port == 0:
        raise CaServiceError(400, "bad_config", f"{what} {url!r}: not an http(s) URL with a "
                             "host (and a port other than 0)")
    try:
        wildcard = ipaddress.ip_address(host).is_unspecified
    except ValueError:  # a name
        wildcard = False
    if wildcard:
        raise CaServiceError(400, "bad_config", (
            f"{what} {url!r}: {host} is a bind address, not one other nodes can reach; "
            "advertise the service's name (pqcnet ca serve --advertise-host)"))


class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, burst: float, now: float) -> None:
        self.tokens = burst
        self.stamp = now


class RateLimiter:
    """Token buckets keyed by client address (bounded table)."""

    def __init__(self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.rate, self.burst, self.clock = rate, float(burst), clock
        self._buckets: dict[str, _Bucket] = {}

    def allow(self, key: str) -> bool:
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_RATE_KEYS:
                self._buckets.pop(next(iter(self._buckets)))
            bucket = self._buckets[key] = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
        bucket.stamp = now
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True


@dataclass
class _PeerState:
    spiffe_id: str
    serial: int
    not_after: dt.datetime
    last_seen: dt.datetime


def _json_body(req: Request) -> dict[str, Any]:
    try:
        body = json.loads(req.body)
    except ValueError:
        raise CaServiceError(400, "bad_json", "request body is not JSON") from None
    if not isinstance(body, dict):
        raise CaServiceError(400, "bad_json", "request body must be a JSON object")
    return body


def _field(body: dict[str, Any], name: str, *, required: bool = True, limit: int = 64 * 1024
           ) -> str:
    value = body.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or not value:
        raise CaServiceError(400, f"bad_{name}", f"{name!r} must be a non-empty string")
    if len(value) > limit:
        raise CaServiceError(400, f"bad_{name}", f"{name!r} is longer than {limit} characters")
    return value


def _ok(payload: dict[str, Any], status: int = 200,
        headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(status, json.dumps(payload).encode(), headers=headers)


def _error_response(exc: CaServiceError) -> Response:
    return Response(exc.status, json.dumps(
        {"error": {"code": exc.code, "message": exc.detail}}).encode())


class CaService:
    """The CA service's request handling (transport: :class:`HttpsServer`)."""

    def __init__(self, ca: MeshCA, ca_dir: Path, tokens: TokenStore,
                 config: CaServiceConfig | None = None, *, ledger: Ledger | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ca = ca
        #: where the state and the issued log are written (key and certificate are not)
        self.ca_dir = Path(ca_dir)
        # disk work runs in threads so handshakes of other clients overlap the fsyncs;
        # one lock per file/store keeps each single-writer; state writes coalesce
        self._state_lock = asyncio.Lock()
        self._token_lock = asyncio.Lock()
        #: vertices waiting for the ledger's writer task (:meth:`_write_anchors`)
        self._anchors: list[tuple[OpaqueRecord, asyncio.Future[None]]] = []
        self._anchor_writer: asyncio.Task[None] | None = None
        self._state_version = 0
        self._state_written = 0
        self.tokens = tokens
        self.config = config or CaServiceConfig()
        self.ledger = ledger
        self.limiter = RateLimiter(self.config.enroll_rate, self.config.enroll_burst,
                                   clock=clock)
        self.admin_patterns = self.config.admin_patterns or (
            f"spiffe://{ca.trust_domain}/*/admin/*",)
        self._peers: dict[str, _PeerState] = {}
        self._crl: tuple[bytes, str, float] | None = None  # pem, etag, signed-at (monotonic)
        self._clock = clock
        self.identity = self._server_identity()
        self.server: HttpsServer | None = None
        self.plain: HttpsServer | None = None
        self.replays = 0
        self._maintenance: asyncio.Task[None] | None = None
        if ledger is not None:
            self._init_ledger(ledger)

    # ------------------------------------------------------------------ lifecycle

    def _server_identity(self) -> NodeIdentity:
        """A fresh ML-DSA leaf for the service itself, ``<td>/pqcnet/ca/ca-service``."""
        key = SigningKey.generate("ML-DSA-65")
        policy = IssuancePolicy(max_ttl=self.ca.policy.max_ttl,
                                default_ttl=self.ca.policy.default_ttl)
        # the CA's longest allowed lifetime: nodes' certificates may be short, the
        # service's own is renewed by the maintenance loop at half-life
        cert = self.ca.sign_csr(build_csr(key, ca_service_id(self.ca.trust_domain)),
                                policy, ttl=self.ca.policy.max_ttl)
        return NodeIdentity.from_pem(key, cert, self.ca.trust_bundle_pem(), self._crl_pem())

    def _init_ledger(self, ledger: Ledger) -> None:
        if ledger.genesis is None:
            ledger.init_genesis(self.ca.trust_domain, CA_AUTHOR, self.ca.key)
        elif not ledger.is_authority(CA_AUTHOR):
            raise CaServiceError(400, "bad_config", f"the ledger's genesis does not name "
                                 f"{CA_AUTHOR!r} as an authority: use a ledger of this CA")

    async def start(self, host: str = "127.0.0.1", port: int = 0,
                    crl_http_port: int | None = None) -> int:
        """Listen (TLS) and, when ``crl_http_port`` is given, serve GET /v1/crl on plain HTTP."""
        self.server = HttpsServer(self.handle, self.identity)
        bound = await self.server.start(host, port)
        if crl_http_port is not None:
            self.plain = HttpsServer(self.handle_plain, None)
            await self.plain.start(host, crl_http_port)
        self._update_gauge()
        await self.count_tokens()
        if self._maintenance is None:
            self.start_maintenance()
        log.info("CA service listening", extra={"port": bound, "trust_domain":
                                                self.ca.trust_domain})
        return bound

    def start_maintenance(self, interval_s: float | None = None) -> None:
        """Re-sign the CRL, renew the service's own certificate and count the tokens
        (``pqcnet ca token create`` adds them from another process, and they expire
        with time) in the background."""
        every = interval_s or max(1.0, min(30.0, self.config.crl_max_age_s / 2))

        async def loop() -> None:
            while True:
                await asyncio.sleep(every)
                try:
                    await self.refresh_server_identity()
                except PqcnetError as exc:  # keep serving with the current identity
                    log.warning("CA service refresh failed", extra={"reason": str(exc)})
                await self.count_tokens()

        self._maintenance = asyncio.create_task(loop())

    async def close(self) -> None:
        try:
            await cancel_and_wait(self._maintenance)
        finally:  # the listeners close even when this close is cancelled
            for srv in (self.server, self.plain):
                if srv is not None:
                    await srv.close()
            if self._anchor_writer is not None:  # queued vertices are written first
                await asyncio.shield(self._anchor_writer)

    async def refresh_server_identity(self) -> None:
        """Re-issue the service's own certificate (half-life) and reload the CRL into TLS.
        Its issuance is persisted like any other (one writer at a time: a second,
        unserialized writer could replace the issued log with an older snapshot)."""
        if self.identity.needs_renewal(utcnow()):
            self.identity = self._server_identity()
            await self._persist()
        else:
            self.identity = self.identity.with_crl(self._crl_pem())
        if self.server is not None:
            self.server.set_identity(self.identity)

    # ------------------------------------------------------------------ dispatch

    async def handle(self, req: Request) -> Response:
        routes: dict[str, tuple[str, Callable[[Request], Awaitable[Response]]]] = {
            "/v1/enroll": ("POST", self.enroll),
            "/v1/rotate": ("POST", self.rotate),
            "/v1/crl": ("GET", self.crl),
            "/v1/revoke": ("POST", self.revoke),
            "/v1/mesh/peers": ("GET", self.peers),
        }
        path = req.target.split("?", 1)[0]
        endpoint = path if path in routes else "other"
        try:
            if path not in routes:
                raise CaServiceError(404, "not_found", f"no endpoint {path}")
            method, fn = routes[path]
            if req.method != method:
                raise CaServiceError(405, "method", f"{path} takes {method}")
            response = await fn(req)
        except CaServiceError as exc:
            log.info("CA request refused", extra={"endpoint": endpoint, "status": exc.status,
                                                  "code": exc.code, "reason": exc.detail,
                                                  "remote": req.remote})
            response = _error_response(exc)
        REQUESTS.labels(endpoint=endpoint, status=str(response.status)).inc()
        return response

    async def handle_plain(self, req: Request) -> Response:
        """The plain-HTTP listener serves only the (signed, public) CRL."""
        if req.target.split("?", 1)[0] != "/v1/crl":
            return _error_response(CaServiceError(404, "not_found",
                                                  "only /v1/crl is served without TLS"))
        return await self.handle(req)

    # ------------------------------------------------------------------ endpoints

    async def enroll(self, req: Request) -> Response:
        if not self.limiter.allow(req.remote):
            raise CaServiceError(429, "rate_limited", "too many enrollments; retry later")
        body = _json_body(req)
        secret = _field(body, "token", limit=256)
        csr_pem = _field(body, "csr", limit=MAX_PEM_BYTES).encode()
        try:
            record = self.tokens.check(secret)
        except TokenError as exc:
            if exc.code == "used":
                sid, public = _parse_csr(csr_pem)
                if self.tokens.is_retry(secret, sid, public.key_id.hex()):
                    return await self._reissue(csr_pem, sid, public, body.get("attestation"))
                self.replays += 1
                TOKEN_REPLAYS.inc()
            raise CaServiceError(400 if exc.code == "malformed" else 401,
                                 f"token_{exc.code}", str(exc)) from None
        sid, public = self._parse_csr(csr_pem)
        try:
            check_token_binding(record, sid)
        except TokenError as exc:
            raise CaServiceError(403, "wrong_pattern", str(exc)) from None
        self._check_policy(sid, public, body.get("attestation"), new_node=True)
        cert_pem = self._sign(csr_pem)
        try:
            async with self._token_lock:
                await asyncio.to_thread(self.tokens.redeem, secret, sid,
                                        key_digest=public.key_id.hex())
        except TokenError as exc:  # lost a race with another enrollment of the same token
            self.ca.forget(load_certs(cert_pem)[0].serial_number)
            raise CaServiceError(401, f"token_{exc.code}", str(exc)) from None
        return await self._enrolled(cert_pem, sid, "enroll")

    async def _reissue(self, csr_pem: bytes, sid: SpiffeId, public: VerifyKey,
                       attestation: object) -> Response:
        """The answer to a node retrying an enrollment whose token it already spent on
        this ID and key (:meth:`TokenStore.is_retry`): policy and attestation are checked
        again, the node is not counted twice against ``max_nodes``, the certificate is
        new (and recorded like any other)."""
        self._check_policy(sid, public, attestation, new_node=False)
        log.info("enrollment retried", extra={"spiffe_id": str(sid)})
        return await self._enrolled(self._sign(csr_pem), sid, "enroll_retry")

    async def _enrolled(self, cert_pem: bytes, sid: SpiffeId, path: str) -> Response:
        cert = await self._commit(cert_pem, sid, path)
        return _ok({
            "certificate": cert_pem.decode(),
            "ca_cert": self.ca.trust_bundle_pem().decode(),
            "crl": self._crl_pem().decode(),
            "valid_not_before": cert.not_valid_before_utc.isoformat(),
            "valid_not_after": cert.not_valid_after_utc.isoformat(),
            "config": {"bootstrap_peers": list(self.config.bootstrap_peers),
                       "gossip_fanout": self.config.gossip_fanout,
                       "crl_url": self.config.crl_url},
        })

    async def rotate(self, req: Request) -> Response:
        peer = self._require_peer(req)
        if peer.cert_serial in self.ca.revocations:
            raise CaServiceError(401, "revoked", "the presented certificate is revoked")
        body = _json_body(req)
        csr_pem = _field(body, "csr", limit=MAX_PEM_BYTES).encode()
        sid, public = self._parse_csr(csr_pem)
        if str(sid) != str(peer.spiffe_id):
            raise CaServiceError(403, "wrong_identity", f"a certificate for {peer.spiffe_id} "
                                 f"can only renew itself, not {sid}")
        self._check_policy(sid, public, body.get("attestation"), new_node=False)
        cert_pem = self._sign(csr_pem)
        cert = await self._commit(cert_pem, sid, "rotate")
        return _ok({"certificate": cert_pem.decode(),
                    "ca_cert": self.ca.trust_bundle_pem().decode(),
                    "crl": self._crl_pem().decode(),
                    "valid_not_before": cert.not_valid_before_utc.isoformat(),
                    "valid_not_after": cert.not_valid_after_utc.isoformat()})

    async def crl(self, req: Request) -> Response:
        pem = self._crl_pem()
        assert self._crl is not None
        etag = self._crl[1]
        headers = (("etag", etag), ("cache-control", f"max-age={self.config.crl_max_age_s}"))
        if req.headers.get("if-none-match") == etag:
            return Response(304, b"", "application/pem-certificate-chain", headers)
        return Response(200, pem, "application/pkix-crl", headers)

    async def revoke(self, req: Request) -> Response:
        peer = self._require_peer(req)
        if not any(spiffe_matches(p, peer.spiffe_id) for p in self.admin_patterns):
            raise CaServiceError(403, "not_admin", f"{peer.spiffe_id} may not revoke")
        body = _json_body(req)
        reason = _field(body, "reason", required=False, limit=64) or "unspecified"
        serial_hex = _field(body, "serial", required=False, limit=64)
        spiffe = _field(body, "spiffe_id", required=False, limit=2048) or _field(
            body, "node_id", required=False, limit=2048)
        if bool(serial_hex) == bool(spiffe):
            raise CaServiceError(400, "bad_target", "give exactly one of serial, spiffe_id")
        try:
            if serial_hex:
                try:
                    serial = int(serial_hex, 16)
                except ValueError:
                    raise CaServiceError(400, "bad_serial", "serial must be hex") from None
                if serial not in self.ca.issued:
                    raise CaServiceError(404, "unknown_serial", f"serial {serial_hex} was not "
                                         "issued by this CA")
                revs = [self.ca.revoke(serial, reason)]
            else:
                revs = self.ca.revoke_spiffe_id(spiffe, reason)
        except IdentityError as exc:
            raise CaServiceError(400, "bad_target", str(exc)) from None
        self._crl = None  # re-sign now: the revocation must be in the next fetch
        await self._persist()
        for rev in revs:
            REVOKED.inc()
            rec = self.ca.issued.get(rev.serial)
            await self._anchor(REVOKED_CONTENT_TYPE, rec.spiffe_id if rec else "", {
                "serial": format(rev.serial, "x"), "reason": rev.reason.name,
                "spiffe_id": rec.spiffe_id if rec else "", "by": str(peer.spiffe_id)})
        await self.refresh_server_identity()
        self._update_gauge()
        return Response(204, b"")

    async def peers(self, req: Request) -> Response:
        self._require_peer(req)
        now = utcnow()
        out = []
        for state in sorted(self._peers.values(), key=lambda p: p.spiffe_id):
            if state.not_after <= now:
                continue
            status = "revoked" if state.serial in self.ca.revocations else "enrolled"
            out.append({"node_id": SpiffeId.parse(state.spiffe_id).node_id,
                        "spiffe_id": state.spiffe_id, "status": status,
                        "serial": format(state.serial, "x"),
                        "not_after": state.not_after.isoformat(),
                        "last_seen": state.last_seen.isoformat()})
        return _ok({"peers": out})

    # ------------------------------------------------------------------ helpers

    def _require_peer(self, req: Request) -> Any:
        if req.peer is None:
            raise CaServiceError(401, "no_client_cert",
                                 "this endpoint needs your mesh certificate (mutual TLS)")
        if req.peer.cert_serial in self.ca.revocations:
            raise CaServiceError(401, "revoked", "the presented certificate is revoked")
        return req.peer

    def _parse_csr(self, csr_pem: bytes) -> tuple[SpiffeId, VerifyKey]:
        """The CSR's SPIFFE ID, its tenant and role read through the CA policy's SPIFFE
        layouts (403 ``policy`` if it has another shape that fits none), and its key."""
        sid, public = _parse_csr(csr_pem)
        try:
            return self.ca.policy.resolve(sid), public
        except PolicyViolation as exc:
            raise CaServiceError(403, "policy", str(exc)) from None

    def _check_policy(self, sid: SpiffeId, public: VerifyKey, attestation: object, *,
                      new_node: bool) -> None:
        if self.config.allowed_tenants and sid.tenant not in self.config.allowed_tenants:
            raise CaServiceError(403, "tenant_not_allowed", f"tenant {sid.tenant!r} may not "
                                 "enroll here")
        ttl = self.config.cert_ttl or self.ca.policy.default_ttl
        try:
            self.ca.policy.check(self.ca.trust_domain, sid, ttl, public.algorithm)
        except PolicyViolation as exc:
            raise CaServiceError(403, "policy", str(exc)) from None
        if sid.role in self.config.attest_roles or attestation is not None:
            self._check_attestation(sid, public, attestation)
        limit = self.config.max_nodes_per_tenant
        if new_node and limit:
            live = self.ca.live_holders(sid.tenant)
            if str(sid) not in live and len(live) >= limit:
                raise CaServiceError(403, "max_nodes", f"tenant {sid.tenant!r} has {len(live)} "
                                     f"nodes already (limit {limit})")

    def _check_attestation(self, sid: SpiffeId, public: VerifyKey, attestation: object) -> None:
        if attestation is None:
            raise CaServiceError(403, "attestation_required",
                                 f"role {sid.role!r} must enroll with an attestation")
        if not isinstance(attestation, dict) or attestation.get("type") != "pqcnet":
            raise CaServiceError(400, "bad_attestation",
                                 'attestation must be {"type": "pqcnet", "payload": base64}')
        payload = attestation.get("payload")
        if not isinstance(payload, str) or len(payload) > MAX_ATTESTATION_BYTES:
            raise CaServiceError(400, "bad_attestation", "attestation payload missing or large")
        try:
            msg = qsdag_pb2.AttestationEvent.FromString(base64.b64decode(payload, validate=True))
            event = AttestationEvent.from_proto(msg)
        except (ValueError, PqcnetError) as exc:
            raise CaServiceError(400, "bad_attestation", f"cannot decode attestation: {exc}"
                                 ) from None
        except Exception as exc:  # protobuf DecodeError has no common pqcnet base
            raise CaServiceError(400, "bad_attestation", f"cannot decode attestation: "
                                 f"{type(exc).__name__}") from None
        if event.node_id != sid.node_id or event.role != sid.role:
            raise CaServiceError(403, "attestation_mismatch", "attestation is for "
                                 f"{event.node_id}/{event.role}, not {sid.node_id}/{sid.role}")
        policy = self.config.measurements or MeasurementPolicy(
            package_hashes=frozenset({event.measurements.package_hash}))
        try:
            verify_attestation(event, public, policy)
        except LedgerError as exc:
            raise CaServiceError(403, "attestation_rejected", str(exc)) from None

    def _sign(self, csr_pem: bytes) -> bytes:
        try:
            # _parse_csr verified these bytes' signature (proof of possession) already
            return self.ca.sign_csr(csr_pem, ttl=self.config.cert_ttl, signature_checked=True)
        except PolicyViolation as exc:
            raise CaServiceError(403, "policy", str(exc)) from None
        except IdentityError as exc:
            raise CaServiceError(400, "bad_csr", str(exc)) from None

    async def _commit(self, cert_pem: bytes, sid: SpiffeId, path: str) -> x509.Certificate:
        cert = load_certs(cert_pem)[0]
        await self._persist()
        ISSUED.labels(path=path).inc()
        now = utcnow()
        self._peers[str(sid)] = _PeerState(str(sid), cert.serial_number,
                                           cert.not_valid_after_utc, now)
        await self._anchor(ISSUED_CONTENT_TYPE, str(sid), {
            "serial": format(cert.serial_number, "x"), "spiffe_id": str(sid), "path": path,
            "not_after": cert.not_valid_after_utc.isoformat(),
            "sha3_256": hashlib.sha3_256(cert.public_bytes(Encoding.DER)).hexdigest()})
        self._update_gauge()
        log.info("certificate issued", extra={"spiffe_id": str(sid), "path": path,
                                              "serial": format(cert.serial_number, "x")})
        return cert

    async def _anchor(self, content_type: str, spiffe_id: str, body: dict[str, Any]) -> None:
        ledger = self.ledger
        if ledger is None:
            return
        subject = SpiffeId.parse(spiffe_id).node_id if spiffe_id else CA_AUTHOR
        record = OpaqueRecord(content_type, subject, json.dumps(body, sort_keys=True).encode())
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._anchors.append((record, done))
        if self._anchor_writer is None or self._anchor_writer.done():
            self._anchor_writer = asyncio.create_task(self._write_anchors(ledger))
        await done  # a request cancelled here leaves its vertex to the writer

    async def _write_anchors(self, ledger: Ledger) -> None:
        """The ledger's one writer: appends what requests queued, up to
        :data:`MAX_ANCHOR_BATCH` per trip to a thread, and settles each request's
        future. A task of its own because requests get cancelled (a client gone, the
        service closing): a request that appended in a thread itself left, when
        cancelled, the ledger to the next request's thread while its own still wrote —
        two writers — and :meth:`close` returned (and the ledger was closed) under a
        write. Now a cancelled request leaves its vertex to this task, and ``close``
        waits for it."""
        while self._anchors:
            batch = self._anchors[:MAX_ANCHOR_BATCH]
            del self._anchors[:MAX_ANCHOR_BATCH]
            records = [record for record, _ in batch]
            results = await asyncio.to_thread(self._append_all, ledger, records)
            for (_, done), result in zip(batch, results, strict=True):
                if done.done():  # its request was cancelled
                    continue
                if isinstance(result, Exception):
                    done.set_exception(result)
                else:
                    done.set_result(None)

    def _append_all(self, ledger: Ledger, records: list[OpaqueRecord]) -> list[Exception | None]:
        """Append each record as a CA vertex (a worker thread); an error is its own."""
        out: list[Exception | None] = []
        for record in records:
            try:
                ledger.append(VertexKind.GOVERNANCE_DIRECTIVE, record, CA_AUTHOR, self.ca.key)
                out.append(None)
            except Exception as exc:  # handed to the request, as when it appended itself
                out.append(exc.with_traceback(None))
        return out

    async def _persist(self) -> None:
        """Make the CA state as of now durable; concurrent callers share one write."""
        self._state_version += 1
        mine = self._state_version
        async with self._state_lock:
            if self._state_written >= mine:
                return  # a write that started after our change already covered it
            version, change = self._state_version, self.ca.pending_state()
            await asyncio.to_thread(write_state, self.ca_dir, change)
            self.ca.state_written(change)
            self._state_written = version

    def _crl_pem(self) -> bytes:
        now = self._clock()
        if self._crl is None or now - self._crl[2] >= self.config.crl_max_age_s:
            pem = self.ca.crl_pem(validity=dt.timedelta(
                seconds=max(60, 4 * self.config.crl_max_age_s)))
            etag = '"' + hashlib.sha256(pem).hexdigest()[:32] + '"'
            self._crl = (pem, etag, now)
        return self._crl[0]

    def _update_gauge(self) -> None:
        ENROLLED_NODES.set(self.ca.live_count())

    async def count_tokens(self) -> None:
        """Set ``pqcnet_ca_tokens``: a pass over the token table, in a thread (up to
        100,000 rows; an enrollment never waits for it). A store that cannot be read
        keeps the last counts and is logged — enrollment reports its own errors."""
        try:
            counts = await asyncio.to_thread(self.tokens.counts)
        except IdentityError as exc:
            log.warning("token count failed", extra={"reason": str(exc)})
            return
        for state, n in counts.items():
            TOKENS.labels(state).set(n)


def _parse_csr(csr_pem: bytes) -> tuple[SpiffeId, VerifyKey]:
    """The CSR's SPIFFE ID and ML-DSA key, or a 400 (the CA re-checks when signing)."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise CaServiceError(400, "bad_csr", f"cannot parse CSR: {exc}") from None
    try:
        signed = csr.is_signature_valid
    except (ValueError, TypeError):
        signed = False
    if not signed:
        raise CaServiceError(400, "bad_csr", "CSR signature does not verify (proof of "
                             "possession failed)")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        if len(uris) != 1:
            raise CaServiceError(400, "bad_csr", "CSR must carry exactly one SPIFFE URI SAN")
        sid = SpiffeId.parse(uris[0])
        public = VerifyKey(csr.public_key())  # type: ignore[arg-type]
    except (x509.ExtensionNotFound, IdentityError, CryptoError, ValueError, TypeError) as exc:
        raise CaServiceError(400, "bad_csr", f"unusable CSR: {exc}") from None
    return sid, public


__all__ = [
    "CA_AUTHOR",
    "ISSUED_CONTENT_TYPE",
    "REVOKED_CONTENT_TYPE",
    "CaService",
    "CaServiceConfig",
    "RateLimiter",
    "check_advertised_url",
]
