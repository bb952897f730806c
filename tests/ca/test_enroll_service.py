"""The CA service (seed 001 §7) over real PQ TLS sockets: happy path and every refusal.

Every refusal is checked from the attacker's chair: the status and code the client
sees, that nothing was written (token file, CA issued log, ledger), and that the
service still serves the next good request.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import socket
import struct
import subprocess
from pathlib import Path

import pytest
from OpenSSL import SSL
from prometheus_client import REGISTRY

from pqcnet.crypto.pqc import SigningKey
from pqcnet.identity import MeshCA, SpiffeId, build_csr, load_crl
from pqcnet.identity.certs import utcnow
from pqcnet.identity.tokens import TokenBundle, hash_token
from pqcnet.qsdag.attestation import MeasurementPolicy
from pqcnet.runtime import enroll as client
from pqcnet.runtime.ca_service import TOKEN_REPLAYS, CaServiceConfig
from pqcnet.runtime.errors import CaServiceError, HttpsError
from pqcnet.runtime.https import request
from tests.ca.conftest import TD, Service, start_service
from tests.procs import PQCNET

R1 = SpiffeId.parse(f"spiffe://{TD}/acme/relayer/r1")


def _enroll(svc: Service, sid: SpiffeId = R1, **kw: object):  # type: ignore[no-untyped-def]
    """The enroll coroutine; its token is created now (before any state snapshot)."""
    bundle = kw.pop("bundle", None) or svc.token()
    return client.enroll(svc.url, bundle, sid, SigningKey.generate(), **kw)  # type: ignore[arg-type]


async def _refused(svc: Service, coro, status: int, code: str) -> CaServiceError:  # type: ignore[no-untyped-def]
    before = svc.state()
    with pytest.raises(CaServiceError) as err:
        await coro
    assert (err.value.status, err.value.code) == (status, code), err.value
    assert svc.state() == before, "a refused request wrote something"
    # and the service keeps serving
    ident, _ = await _enroll(svc, SpiffeId.parse(f"spiffe://{TD}/acme/relayer/ok-{id(coro)}"))
    assert ident.spiffe_id.node_id.startswith("ok-")
    return err.value


async def test_enroll_happy_path_rotate_crl_peers_revoke(service: Service) -> None:
    ident, config = await _enroll(service)
    assert ident.spiffe_id == R1
    assert ident.certificate.issuer == service.ca.certificate.subject
    assert config == {"bootstrap_peers": [], "gossip_fanout": 3, "crl_url": ""}
    assert load_crl(ident.crl_pem or b"", ident.trust_bundle_pem).number >= 1
    assert service.vertices() == 1  # the issuance is a QS-DAG vertex
    # rotate with the current certificate: new key, new serial, same ID
    new = await client.rotate(service.url, ident)
    assert new.spiffe_id == R1 and new.serial != ident.serial
    assert new.key.public_key.raw != ident.key.public_key.raw
    assert service.vertices() == 2
    peers = await client.peers(service.url, new)
    assert [p["spiffe_id"] for p in peers] == [str(R1)]
    assert peers[0]["serial"] == format(new.serial, "x") and peers[0]["status"] == "enrolled"
    # revoke as an admin; the CRL names it; the revoked cert can no longer rotate
    admin = service.ca.issue(f"spiffe://{TD}/ops/admin/a1")
    pem, etag = await client.fetch_crl(service.url, ident.trust_bundle_pem, TD)
    assert pem is not None and etag
    await client.revoke(service.url, admin, serial=new.serial, reason="key_compromise")
    assert service.vertices() == 3
    fresh, etag2 = await client.fetch_crl(service.url, ident.trust_bundle_pem, TD, etag=etag)
    assert fresh is not None and etag2 != etag
    assert load_crl(fresh, ident.trust_bundle_pem).is_revoked(new.serial)
    assert (await client.fetch_crl(service.url, ident.trust_bundle_pem, TD, etag=etag2))[0] is None
    with pytest.raises(HttpsError, match="revoked"):
        await client.rotate(service.url, new)


async def test_used_token_is_401_and_counted(service: Service) -> None:
    bundle = service.token()
    await _enroll(service, bundle=bundle)
    replays = TOKEN_REPLAYS._value.get()
    err = await _refused(service, _enroll(service, bundle=bundle), 401, "token_used")
    assert "already used" in err.detail
    assert TOKEN_REPLAYS._value.get() == replays + 1
    assert service.service.replays == 1


async def test_expired_unknown_and_malformed_tokens(service: Service) -> None:
    old = service.token(ttl=dt.timedelta(seconds=1), now=utcnow() - dt.timedelta(minutes=1))
    await _refused(service, _enroll(service, bundle=old), 401, "token_expired")
    good = service.token()
    unknown = type(good)("pqcnet-et1." + "A" * 43, good.pattern, good.role, good.expires_at,
                         good.ca_bundle_pem, good.ca_url)
    await _refused(service, _enroll(service, bundle=unknown), 401, "token_unknown")
    bad = type(good)("not-a-token", good.pattern, good.role, good.expires_at,
                     good.ca_bundle_pem, good.ca_url)
    await _refused(service, _enroll(service, bundle=bad), 400, "token_malformed")


async def test_wrong_pattern_and_role(service: Service) -> None:
    bundle = service.token(f"spiffe://{TD}/acme/relayer/r-*")
    await _refused(service, _enroll(service, SpiffeId.parse(f"spiffe://{TD}/acme/relayer/x1"),
                                    bundle=bundle), 403, "wrong_pattern")
    bundle = service.token(f"spiffe://{TD}/acme/*/*", role="relayer")
    await _refused(service, _enroll(service, SpiffeId.parse(f"spiffe://{TD}/acme/sentry/s1"),
                                    bundle=bundle), 403, "wrong_pattern")
    # the token survives a refusal: the right ID still enrolls with it
    ident, _ = await _enroll(service, SpiffeId.parse(f"spiffe://{TD}/acme/relayer/r9"),
                             bundle=bundle)
    assert ident.spiffe_id.role == "relayer"


async def _post(svc: Service, path: str, body: bytes) -> tuple[int, dict]:  # type: ignore[type-arg]
    from pqcnet.identity.tokens import ca_service_pattern

    resp = await request(svc.url, "POST", path, body, trust_bundle_pem=svc.ca.trust_bundle_pem(),
                         server_pattern=ca_service_pattern(TD))
    return resp.status, json.loads(resp.body or b"{}")


async def test_bad_csr_and_bad_json(service: Service) -> None:
    bundle = service.token()
    before = service.state()
    cases = [
        (b"not json", 400, "bad_json"),
        (b"[1, 2]", 400, "bad_json"),
        (json.dumps({"token": bundle.token}).encode(), 400, "bad_csr"),
        (json.dumps({"token": bundle.token, "csr": "garbage"}).encode(), 400, "bad_csr"),
    ]
    # a CSR whose signature does not match its key (proof of possession fails)
    k1, k2 = SigningKey.generate(), SigningKey.generate()
    good = build_csr(k1, R1)
    other = build_csr(k2, R1)
    forged = good.split(b"\n")[:3] + other.split(b"\n")[3:]
    cases.append((json.dumps({"token": bundle.token, "csr": b"\n".join(forged).decode()}
                             ).encode(), 400, "bad_csr"))
    for body, status, code in cases:
        got, answer = await _post(service, "/v1/enroll", body)
        assert (got, answer["error"]["code"]) == (status, code), (body[:40], answer)
    assert service.state() == before
    # the token was not spent by any of those
    ident, _ = await _enroll(service, bundle=bundle)
    assert ident.spiffe_id == R1


async def test_other_endpoints_refuse_bad_input(service: Service) -> None:
    from pqcnet.identity.tokens import ca_service_pattern

    pat = ca_service_pattern(TD)
    bundle = service.ca.trust_bundle_pem()
    r = await request(service.url, "GET", "/v1/nope", trust_bundle_pem=bundle, server_pattern=pat)
    assert r.status == 404
    r = await request(service.url, "GET", "/v1/enroll", trust_bundle_pem=bundle,
                      server_pattern=pat)
    assert r.status == 405
    # rotate / revoke / peers without a client certificate
    for method, path in (("POST", "/v1/rotate"), ("POST", "/v1/revoke"),
                         ("GET", "/v1/mesh/peers")):
        r = await request(service.url, method, path, b"{}", trust_bundle_pem=bundle,
                          server_pattern=pat)
        assert r.status == 401, (path, r.body)
    node, _ = await _enroll(service)
    before = service.state()
    # a node is not an admin
    with pytest.raises(CaServiceError) as err:
        await client.revoke(service.url, node, serial=node.serial)
    assert err.value.status == 403
    admin = service.ca.issue(f"spiffe://{TD}/ops/admin/a1")
    before = service.state()
    for payload in ({}, {"serial": "zz"}, {"serial": "ab", "spiffe_id": str(R1)},
                    {"serial": "abcdef"}):
        r = await request(service.url, "POST", "/v1/revoke", json.dumps(payload).encode(),
                          identity=admin, server_pattern=pat)
        assert r.status in (400, 404), (payload, r.body)
    # rotating into another node's ID
    other = SpiffeId.parse(f"spiffe://{TD}/acme/relayer/someone-else")
    r = await request(service.url, "POST", "/v1/rotate",
                      json.dumps({"csr": build_csr(SigningKey.generate(), other).decode()}
                                 ).encode(), identity=node, server_pattern=pat)
    assert r.status == 403
    r = await request(service.url, "POST", "/v1/rotate", b'{"csr": "x"}', identity=node,
                      server_pattern=pat)
    assert r.status == 400
    assert service.state()[1:] == before[1:]  # nothing issued, no vertex
    # an oversized body, raw garbage instead of TLS, a half request: still serving
    r = await request(service.url, "POST", "/v1/enroll", b"x" * (5 * 1024 * 1024),
                      trust_bundle_pem=bundle, server_pattern=pat)
    assert r.status == 413
    host, port = "127.0.0.1", int(service.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET / HTTP/1.1\r\n\r\n" * 10)
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 10) is not None
    writer.close()
    ident, _ = await _enroll(service, SpiffeId.parse(f"spiffe://{TD}/acme/relayer/after"))
    assert ident.spiffe_id.node_id == "after"


async def test_attestation_policy(tmp_path: Path) -> None:
    config = CaServiceConfig(attest_roles=("relayer",), measurements=MeasurementPolicy(
        package_hashes=frozenset({b"\x01" * 32})))
    svc = await start_service(tmp_path, config)
    try:
        await _refused_no_followup(svc, _enroll(svc), 403, "attestation_required")
        key = SigningKey.generate()
        att = client.attestation_for(key, R1)  # this installation: not the allowed hash
        with pytest.raises(CaServiceError) as err:
            await client.enroll(svc.url, svc.token(), R1, key, attestation=att)
        assert (err.value.status, err.value.code) == (403, "attestation_rejected")
        # signed by another key than the CSR's: refused too
        att = client.attestation_for(SigningKey.generate(), R1)
        with pytest.raises(CaServiceError) as err:
            await client.enroll(svc.url, svc.token(), R1, key, attestation=att)
        assert err.value.status == 403
        with pytest.raises(CaServiceError) as err:
            await client.enroll(svc.url, svc.token(), R1, key,
                                attestation={"type": "pqcnet", "payload": "@@"})
        assert err.value.status == 400
        assert svc.vertices() == 0 and not svc.ca.issued.keys() - {svc.service.identity.serial}
    finally:
        await svc.service.close()
        svc.ledger.close()
    # the same policy with this installation's hash admits it
    from pqcnet.qsdag.attestation import package_hash

    ok = CaServiceConfig(attest_roles=("relayer",), measurements=MeasurementPolicy(
        package_hashes=frozenset({package_hash()})))
    svc = await start_service(tmp_path / "ok", ok)
    try:
        key = SigningKey.generate()
        ident, _ = await client.enroll(svc.url, svc.token(), R1, key,
                                       attestation=client.attestation_for(key, R1))
        assert ident.spiffe_id == R1
        # rotation is held to the same policy: without an attestation it is refused ...
        with pytest.raises(CaServiceError) as err:
            await client.rotate(svc.url, ident)
        assert (err.value.status, err.value.code) == (403, "attestation_required")
        # ... with one signed by another key than the new certificate's too ...
        other = SigningKey.generate()
        with pytest.raises(CaServiceError) as err:
            await client.rotate(svc.url, ident, SigningKey.generate(),
                                attestation=client.attestation_for(other, R1))
        assert err.value.status == 403
        # ... and the renewer `node run --renew-ca-url` uses attests: the node renews
        from pqcnet.runtime.rotation import CaServiceRenewer

        renewed = await CaServiceRenewer(svc.url).renew(ident)
        assert renewed.spiffe_id == R1 and renewed.serial != ident.serial
        assert renewed.key.public_key.key_id != ident.key.public_key.key_id
        kept = await CaServiceRenewer(svc.url).renew(renewed, rotate_key=False)
        assert kept.key.public_key.key_id == renewed.key.public_key.key_id
    finally:
        await svc.service.close()
        svc.ledger.close()


async def _refused_no_followup(svc: Service, coro, status: int, code: str) -> None:  # type: ignore[no-untyped-def]
    before = svc.state()
    with pytest.raises(CaServiceError) as err:
        await coro
    assert (err.value.status, err.value.code) == (status, code)
    assert svc.state() == before


async def test_racing_enrollments_never_exceed_max_nodes_per_tenant(tmp_path: Path) -> None:
    """Eight nodes of one tenant enroll at once against ``max_nodes_per_tenant=3``: the
    count, the decision and the record of the certificate must happen in one step
    (nothing awaited between them), or racing requests all pass the count. Exactly
    three nodes get a certificate, five are refused ``max_nodes``; the CA holds three
    live IDs for the tenant and the ledger three issuance vertices — nothing of the
    refused ones."""
    svc = await start_service(tmp_path, CaServiceConfig(max_nodes_per_tenant=3))
    try:
        results = await asyncio.gather(*(
            _enroll(svc, SpiffeId.parse(f"spiffe://{TD}/acme/relayer/n{i}"))
            for i in range(8)), return_exceptions=True)
        got = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, CaServiceError)]
        assert len(got) == 3 and len(refused) == 5, results
        assert {(e.status, e.code) for e in refused} == {(403, "max_nodes")}
        assert set(svc.ca.live_holders("acme")) == {str(ident.spiffe_id) for ident, _ in got}
        assert svc.vertices() == 3
        assert svc.ledger.verify().ok
    finally:
        await svc.service.close()
        svc.ledger.close()


async def test_close_waits_for_a_vertex_being_written(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The service is closed (SIGTERM) while an enrollment's issuance vertex is being
    appended in a worker thread. Before, closing cancelled the request, the cancel
    released the ledger to whoever came next and ``close`` returned under the write —
    and ``pqcnet ca serve`` then closed the ledger beneath it. Now the vertex has its own
    writer and ``close`` returns after it is written; the ledger audits clean."""
    import threading
    import time

    svc = await start_service(tmp_path)
    started, times = threading.Event(), {}
    real = svc.ledger.append

    def slow_append(*args, **kw):  # type: ignore[no-untyped-def]
        started.set()
        time.sleep(0.5)  # a slow disk
        try:
            return real(*args, **kw)
        finally:
            times["written"] = time.monotonic()

    monkeypatch.setattr(svc.ledger, "append", slow_append)
    enrolling = asyncio.create_task(_enroll(svc))
    try:
        assert await asyncio.to_thread(started.wait, 30)
        await svc.service.close()
        times["closed"] = time.monotonic()
        assert "written" in times and times["written"] <= times["closed"]
        assert svc.vertices() == 1 and svc.ledger.verify().ok
    finally:
        enrolling.cancel()
        with contextlib.suppress(BaseException):
            await enrolling
        await svc.service.close()
        svc.ledger.close()


async def test_max_nodes_per_tenant(tmp_path: Path) -> None:
    svc = await start_service(tmp_path, CaServiceConfig(max_nodes_per_tenant=2))
    try:
        for n in ("a", "b"):
            await _enroll(svc, SpiffeId.parse(f"spiffe://{TD}/acme/relayer/{n}"))
        await _refused_no_followup(svc, _enroll(svc, SpiffeId.parse(
            f"spiffe://{TD}/acme/relayer/c")), 403, "max_nodes")
        # another tenant is not affected; re-enrolling an existing ID is not a new node
        await _enroll(svc, SpiffeId.parse(f"spiffe://{TD}/other/relayer/c"),
                      bundle=svc.token(f"spiffe://{TD}/other/relayer/*"))
        first, _ = await _enroll(svc, SpiffeId.parse(f"spiffe://{TD}/acme/relayer/a"))
        live = {r.spiffe_id for r in svc.ca.issued.values()}  # nothing expired or revoked yet
        assert {f"spiffe://{TD}/acme/relayer/a", f"spiffe://{TD}/acme/relayer/b",
                f"spiffe://{TD}/other/relayer/c"} < live  # and the service's own
        assert REGISTRY.get_sample_value("pqcnet_ca_enrolled_nodes") == len(live)
        # a revoked node no longer holds a slot: c gets in
        svc.ca.revoke_spiffe_id(first.spiffe_id)  # both of its certificates
        await _enroll(svc, SpiffeId.parse(f"spiffe://{TD}/acme/relayer/c"))
        # a left, acme/c came: as many as before
        assert REGISTRY.get_sample_value("pqcnet_ca_enrolled_nodes") == len(live)
    finally:
        await svc.service.close()
        svc.ledger.close()


async def test_server_reset_mid_exchange_is_a_typed_transient_error() -> None:
    """A CA that dies mid-answer resets the connection: the client gets HttpsError (which
    ``node enroll --retry-for`` retries), never a bare ConnectionResetError."""
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)  # the ClientHello
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    server = await asyncio.start_server(reset, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(HttpsError, match=r"lost|TLS|closed"):
            ca = MeshCA.create(TD)
            bundle = TokenBundle("t" * 32, f"spiffe://{TD}/acme/relayer/*", "relayer",
                                 utcnow() + dt.timedelta(hours=1), ca.trust_bundle_pem(), "")
            await client.enroll(f"https://127.0.0.1:{port}", bundle, R1, SigningKey.generate())
    finally:
        server.close()
        await server.wait_closed()


async def test_rate_limit(tmp_path: Path) -> None:
    svc = await start_service(tmp_path, CaServiceConfig(enroll_rate=0.5, enroll_burst=2))
    try:
        await _enroll(svc, SpiffeId.parse(f"spiffe://{TD}/acme/relayer/a"))
        await _enroll(svc, SpiffeId.parse(f"spiffe://{TD}/acme/relayer/b"))
        bundle = svc.token()
        await _refused_no_followup(svc, _enroll(svc, bundle=bundle), 429, "rate_limited")
        # the token was not spent: after the bucket refills it works
        await asyncio.sleep(2.5)
        ident, _ = await _enroll(svc, bundle=bundle)
        assert ident.spiffe_id == R1
    finally:
        await svc.service.close()
        svc.ledger.close()


async def test_plain_http_crl_and_tls_pinning(tmp_path: Path) -> None:
    svc = await start_service(tmp_path)
    try:
        from pqcnet.runtime.https import HttpsServer

        plain = HttpsServer(svc.service.handle_plain, None)
        port = await plain.start()
        try:
            pem, _etag = await client.fetch_crl(f"http://127.0.0.1:{port}", b"", TD)
            assert pem is not None and load_crl(pem, svc.ca.trust_bundle_pem())
            r = await request(f"http://127.0.0.1:{port}", "POST", "/v1/enroll", b"{}")
            assert r.status == 404  # nothing but the CRL without TLS
        finally:
            await plain.close()
        # a node provisioned with another CA's bundle refuses to talk to this service
        from pqcnet.identity import MeshCA

        stranger = MeshCA.create(TD)
        bundle = svc.token()
        wrong = type(bundle)(bundle.token, bundle.pattern, bundle.role, bundle.expires_at,
                             stranger.trust_bundle_pem(), bundle.ca_url)
        with pytest.raises(HttpsError, match=r"unknown-ca|certificate"):
            await client.enroll(svc.url, wrong, R1, SigningKey.generate())
    finally:
        await svc.service.close()
        svc.ledger.close()


def test_client_tls_is_post_quantum() -> None:
    # the group and ALPN the service negotiates (checked on every handshake by
    # verify_server/verify_peer: a classical group is refused)
    from pqcnet.runtime.https import http_policy

    pol = http_policy()
    assert pol.alpn == b"http/1.1" and pol.group_list == ("X25519MLKEM768",)
    assert SSL.TLS1_3_VERSION
    assert base64  # keep import used for readers of the attestation format


async def test_a_revoked_token_is_refused_as_unknown_and_the_others_still_work(
        service: Service) -> None:
    """An operator withdraws a token handed to the wrong person (``pqcnet ca token
    revoke``, run from outside against the CA directory the service uses): its holder
    is refused 401 token_unknown and nothing is written; other tokens still enroll."""
    withdrawn, kept = service.token(), service.token()
    digest = hash_token(withdrawn.token)
    out = await asyncio.to_thread(
        subprocess.run, [PQCNET, "ca", "token", "revoke", "--dir", str(service.dir),
                         digest[:10]], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"token {digest[:16]} for {withdrawn.pattern} (role relayer) revoked" in out.stdout
    await _refused(service, _enroll(service, bundle=withdrawn), 401, "token_unknown")
    ident, _ = await _enroll(service, SpiffeId.parse(f"spiffe://{TD}/acme/relayer/k1"),
                             bundle=kept)
    assert ident.spiffe_id.node_id == "k1"
