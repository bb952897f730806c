"""The CA service's client side: enroll, rotate, fetch the CRL, revoke.

Used by ``pqcnet node enroll``, the rotation loop of long-running roles, ``pqcnet ca
revoke --ca`` and ``pqcnet bench enroll``. Every call is one HTTP/1.1 request over
PQ TLS (:func:`pqcnet.runtime.https.request`); a refusal is a
:class:`~pqcnet.runtime.errors.CaServiceError` carrying the service's status and code.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from typing import Any

from pqcnet.crypto.pqc import SigningKey
from pqcnet.identity.csr import build_csr
from pqcnet.identity.node import NodeIdentity
from pqcnet.identity.spiffe import SpiffeId
from pqcnet.identity.tokens import TokenBundle, ca_service_pattern
from pqcnet.qsdag.attestation import build_attestation
from pqcnet.runtime.errors import CaServiceError, HttpsError, NodeError
from pqcnet.runtime.https import ClientResponse, request

DEFAULT_TIMEOUT_S = 15.0

log = logging.getLogger(__name__)


def attestation_for(key: SigningKey, sid: SpiffeId, *, config_bytes: bytes = b"",
                    counter: int = 1) -> dict[str, str]:
    """This installation's signed measurements, as the enroll/rotate ``attestation`` field."""
    event = build_attestation(sid.node_id, sid.role, key, counter, config_bytes)
    return {"type": "pqcnet",
            "payload": base64.b64encode(event.to_proto().SerializeToString()).decode()}


def _answer(resp: ClientResponse, ok: tuple[int, ...] = (200,)) -> dict[str, Any]:
    if resp.status in ok:
        if not resp.body:
            return {}
        try:
            body = json.loads(resp.body)
        except ValueError:
            raise HttpsError("CA service answered with a body that is not JSON") from None
        if not isinstance(body, dict):
            raise HttpsError("CA service answered with a JSON value that is not an object")
        return body
    code, message = "error", resp.body[:200].decode(errors="replace")
    try:
        err = json.loads(resp.body)["error"]
        code, message = str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        pass
    raise CaServiceError(resp.status, code, message)


def _identity(key: SigningKey, body: dict[str, Any]) -> NodeIdentity:
    try:
        cert = str(body["certificate"]).encode()
        bundle = str(body["ca_cert"]).encode()
        crl = str(body["crl"]).encode() if body.get("crl") else None
    except KeyError as exc:
        raise HttpsError(f"CA service answer lacks {exc}") from None
    return NodeIdentity.from_pem(key, cert, bundle, crl)


def _transient(exc: NodeError) -> bool:
    """Worth asking again: the CA was unreachable, went away mid-answer, timed out, is
    rate-limiting us or failed inside; never a refusal of the token, CSR or policy."""
    if isinstance(exc, CaServiceError):
        return exc.status == 429 or exc.status >= 500
    return isinstance(exc, HttpsError)


async def enroll(ca_url: str, bundle: TokenBundle, spiffe_id: SpiffeId, key: SigningKey, *,
                 attestation: dict[str, str] | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S,
                 retry_for_s: float = 0.0) -> tuple[NodeIdentity, dict[str, Any]]:
    """Join: the token + a CSR for ``key`` -> the node's identity and mesh config.

    The CA service is pinned by the bundle's CA certificate(s) and its SPIFFE ID;
    nothing is written here (the caller stores key and identity on success). A
    transient failure is retried with the same key and CSR for up to ``retry_for_s``
    seconds (backoff 0.5 s doubling to 5 s): if the CA spent the token but its answer
    was lost, it recognises the same node asking again (``TokenStore.is_retry``).
    """
    payload: dict[str, Any] = {"token": bundle.token,
                               "csr": build_csr(key, spiffe_id).decode(),
                               "node_id": spiffe_id.node_id}
    if attestation is not None:
        payload["attestation"] = attestation
    data = json.dumps(payload).encode()
    deadline = time.monotonic() + retry_for_s
    backoff = 0.5
    while True:
        try:
            resp = await request(ca_url, "POST", "/v1/enroll", data,
                                 trust_bundle_pem=bundle.ca_bundle_pem,
                                 server_pattern=ca_service_pattern(spiffe_id.trust_domain),
                                 timeout_s=timeout_s)
            body = _answer(resp)
            break
        except NodeError as exc:
            if not _transient(exc) or time.monotonic() + backoff > deadline:
                raise
            log.info("enrollment failed, retrying", extra={"reason": str(exc),
                                                          "retry_in_s": backoff})
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
    identity = _identity(key, body)
    if identity.spiffe_id != spiffe_id:
        raise HttpsError(f"CA issued {identity.spiffe_id}, asked for {spiffe_id}")
    config = body.get("config") if isinstance(body.get("config"), dict) else {}
    return identity, dict(config or {})


async def rotate(ca_url: str, current: NodeIdentity, new_key: SigningKey | None = None, *,
                 attestation: dict[str, str] | None = None, attest: bool = False,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> NodeIdentity:
    """Renew: authenticated by ``current`` (mutual TLS), a CSR for ``new_key`` (a fresh
    ML-DSA-65 key unless given) -> the new identity. ``attest`` signs this
    installation's measurements with the key being certified (what a CA with
    ``attest_roles`` requires on rotation, as on enrollment)."""
    key = new_key or SigningKey.generate(current.key.algorithm)
    if attest and attestation is None:
        attestation = attestation_for(key, current.spiffe_id)
    payload: dict[str, Any] = {"csr": build_csr(key, current.spiffe_id).decode(),
                               "current_cert_serial": format(current.serial, "x")}
    if attestation is not None:
        payload["attestation"] = attestation
    resp = await request(ca_url, "POST", "/v1/rotate", json.dumps(payload).encode(),
                         identity=current,
                         server_pattern=ca_service_pattern(current.spiffe_id.trust_domain),
                         timeout_s=timeout_s)
    return _identity(key, _answer(resp))


async def fetch_crl(url: str, trust_bundle_pem: bytes, trust_domain: str, *,
                    etag: str = "", timeout_s: float = DEFAULT_TIMEOUT_S
                    ) -> tuple[bytes | None, str]:
    """GET /v1/crl (https pinned, or plain http): ``(pem, etag)``, ``pem`` None when
    the server says 304 Not Modified. Verify the PEM with :func:`pqcnet.identity.load_crl`."""
    headers = (("if-none-match", etag),) if etag else ()
    resp = await request(url, "GET", "/v1/crl", trust_bundle_pem=trust_bundle_pem,
                         server_pattern=ca_service_pattern(trust_domain), headers=headers,
                         timeout_s=timeout_s)
    if resp.status == 304:
        return None, etag
    if resp.status != 200:
        _answer(resp)  # raises CaServiceError with the service's reason
    return resp.body, resp.headers.get("etag", "")


async def revoke(ca_url: str, admin: NodeIdentity, *, serial: int | None = None,
                 spiffe_id: str | None = None, reason: str = "unspecified",
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """POST /v1/revoke as ``admin`` (an identity the service's admin pattern allows)."""
    payload: dict[str, str] = {"reason": reason}
    if serial is not None:
        payload["serial"] = format(serial, "x")
    if spiffe_id is not None:
        payload["spiffe_id"] = spiffe_id
    resp = await request(ca_url, "POST", "/v1/revoke", json.dumps(payload).encode(),
                         identity=admin,
                         server_pattern=ca_service_pattern(admin.spiffe_id.trust_domain),
                         timeout_s=timeout_s)
    _answer(resp, ok=(204,))


async def peers(ca_url: str, identity: NodeIdentity, *,
                timeout_s: float = DEFAULT_TIMEOUT_S) -> list[dict[str, Any]]:
    """GET /v1/mesh/peers with ``identity``'s mesh certificate."""
    resp = await request(ca_url, "GET", "/v1/mesh/peers", identity=identity,
                         server_pattern=ca_service_pattern(identity.spiffe_id.trust_domain),
                         timeout_s=timeout_s)
    out = _answer(resp).get("peers", [])
    return list(out) if isinstance(out, list) else []


__all__ = ["attestation_for", "enroll", "fetch_crl", "peers", "revoke", "rotate"]
