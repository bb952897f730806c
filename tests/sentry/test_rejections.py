"""Every rejection path: the error the client sees, the metric, and a backend that saw nothing."""

from __future__ import annotations

import time
from typing import Any

import grpc
import grpc.aio
import httpx
import pytest

from pqcnet import qstp
from pqcnet.crypto.pqc import SigningKey
from pqcnet.identity import NodeIdentity
from pqcnet.proto import echo_pb2, echo_pb2_grpc, sentry_pb2
from pqcnet.sentry import assertion as sa
from pqcnet.sentry.sidecar import Sidecar, serve_grpc, serve_http
from pqcnet.sentry.wire import RequestHead, ResponseHead, decode_response, encode_request, read_head

from .conftest import Env

pytestmark = pytest.mark.timeout(60)


async def raw_call(env: Env, identity: NodeIdentity, head: RequestHead, body: bytes = b"",
                   tunnel: Any = None) -> ResponseHead:
    t = tunnel or await qstp.connect("127.0.0.1", env.stack.port, identity)
    try:
        stream = t.open_stream()
        await stream.send(encode_request(head) + body, end=True)
        payload, _ = await read_head(stream.recv)
        return decode_response(payload)
    finally:
        if tunnel is None:
            await t.close()


async def http_via(sidecar: Sidecar, path: str = "/rpc", method: str = "POST",
                   **kw: Any) -> httpx.Response:
    server = await serve_http(sidecar)
    port = server.sockets[0].getsockname()[1]
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            return await client.request(method, path, json={"id": 1}, **kw)
    finally:
        server.close()
        await sidecar.aclose()


def rejected(env: Env, reason: str) -> float:
    return env.stack.sentry.metrics.value("pqcnet_sentry_rejections_total", {"reason": reason})


async def test_no_assertion(env: Env) -> None:
    resp = await raw_call(env, env.mesh.acme, RequestHead("http", "POST", "/rpc"), b"{}")
    assert (resp.status, resp.error) == (401, "unauthenticated")
    assert "no session assertion" in resp.reason
    assert rejected(env, "Unauthenticated") == 1
    assert env.http.seen.requests == []


async def test_expired_assertion(env: Env) -> None:
    sidecar = env.stack.sidecar(env.mesh.acme, env.mesh.acme_issuer, ttl=60,
                                clock=lambda: time.time() - 3600)
    r = await http_via(sidecar)
    assert r.status_code == 401
    assert r.json()["error"] == "unauthenticated" and "expired" in r.json()["reason"]
    assert r.headers["x-pqcnet-error"] == "unauthenticated"
    assert rejected(env, "AssertionExpired") == 1
    assert env.http.seen.requests == []


async def test_wrong_tenant(env: Env) -> None:
    # an acme node presenting a (validly signed) globex assertion
    sidecar = env.stack.sidecar(env.mesh.acme, env.mesh.globex_issuer, tenant="globex")
    r = await http_via(sidecar)
    assert r.status_code == 401 and "tenant" in r.json()["reason"]
    assert rejected(env, "WrongTenant") == 1
    assert env.http.seen.requests == []


async def test_unknown_issuer(env: Env) -> None:
    sidecar = env.stack.sidecar(env.mesh.acme, SigningKey.generate())
    r = await http_via(sidecar)
    assert r.status_code == 401 and "not trusted" in r.json()["reason"]
    assert rejected(env, "UnknownIssuer") == 1
    assert env.http.seen.requests == []


async def test_assertion_replayed_on_another_tunnel(env: Env) -> None:
    t1 = await qstp.connect("127.0.0.1", env.stack.port, env.mesh.acme)
    t2 = await qstp.connect("127.0.0.1", env.stack.port, env.mesh.acme)
    try:
        raw = sa.issue(env.mesh.acme_issuer, subject="alice", tenant="acme",
                       channel_binding=t1.channel_binding(), now=time.time())
        head = RequestHead("http", "POST", "/rpc", (), raw)
        ok = await raw_call(env, env.mesh.acme, head, b"{}", tunnel=t1)
        assert ok.status == 200 and not ok.error
        replay = await raw_call(env, env.mesh.acme, head, b"{}", tunnel=t2)
        assert (replay.status, replay.error) == (401, "unauthenticated")
        assert "different tunnel" in replay.reason
        assert rejected(env, "ChannelBindingMismatch") == 1
        assert len(env.http.seen.requests) == 1
    finally:
        await t1.close()
        await t2.close()


async def test_bad_signature_and_broken_encodings(env: Env) -> None:
    t = await qstp.connect("127.0.0.1", env.stack.port, env.mesh.acme)
    try:
        raw = sa.issue(env.mesh.acme_issuer, subject="alice", tenant="acme",
                       channel_binding=t.channel_binding(), now=time.time())
        outer = sentry_pb2.SessionAssertion.FromString(raw)
        sig = bytearray(outer.signature)
        sig[0] ^= 0xFF
        bad = sentry_pb2.SessionAssertion(body=outer.body, signature=bytes(sig))
        resp = await raw_call(env, env.mesh.acme, RequestHead(
            "http", "POST", "/rpc", (), bad.SerializeToString()), tunnel=t)
        assert resp.status == 401 and "signature" in resp.reason
        for header in ["!!!", "A" * 30_000, sa.to_header(b"\x12\x34garbage"), ""]:
            resp = await raw_call(env, env.mesh.acme, RequestHead(
                "http", "POST", "/rpc", (("x-pqcnet-assertion", header),)), tunnel=t)
            assert resp.status == 401, header[:10]
        # the tunnel still works after all that
        ok = await raw_call(env, env.mesh.acme, RequestHead(
            "http", "POST", "/rpc", (("x-pqcnet-assertion", sa.to_header(raw)),)), b"{}",
            tunnel=t)
        assert ok.status == 200
    finally:
        await t.close()
    assert rejected(env, "BadSignature") == 1
    assert rejected(env, "MalformedAssertion") == 3
    assert len(env.http.seen.requests) == 1


async def test_acl_method_and_peer_denied(env: Env) -> None:
    r = await http_via(env.stack.sidecar(env.mesh.acme, env.mesh.acme_issuer), "/admin")
    assert r.status_code == 403 and "not allowed" in r.json()["reason"]
    # the intruder role is in the right tenant and holds a valid assertion, but is not
    # in allow_from
    r = await http_via(env.stack.sidecar(env.mesh.intruder, env.mesh.acme_issuer))
    assert r.status_code == 403 and "allow_from" in r.json()["reason"]
    assert env.stack.sentry.metrics.value("pqcnet_sentry_requests_total",
                                          {"outcome": "denied"}) == 2
    assert env.http.seen.requests == []


async def test_tenant_namespace_isolation(env: Env) -> None:
    # globex may use its own backend, but not acme's JSON-RPC backend
    r = await http_via(env.stack.sidecar(env.mesh.globex, env.mesh.globex_issuer,
                                         tenant="globex"), "/globex/x")
    assert r.status_code == 200
    r = await http_via(env.stack.sidecar(env.mesh.globex, env.mesh.globex_issuer,
                                         tenant="globex"), "/rpc")
    assert r.status_code == 403 and "namespace" in r.json()["reason"]
    r = await http_via(env.stack.sidecar(env.mesh.acme, env.mesh.acme_issuer), "/globex/x")
    assert r.status_code == 403
    assert [q["path"] for q in env.http.seen.requests] == ["/globex/x"]


@pytest.mark.parametrize("stack_options", [{"rate": 1, "burst": 2}])
async def test_rate_limited_http_and_grpc(env: Env) -> None:
    sidecar = env.stack.sidecar(env.mesh.acme, env.mesh.acme_issuer)
    server = await serve_http(sidecar)
    port = server.sockets[0].getsockname()[1]
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            codes = [(await client.post("/rpc", json={})).status_code for _ in range(2)]
            r = await client.post("/rpc", json={})
        assert codes == [200, 200]
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"] == "rate_limited"
    finally:
        server.close()
    assert len(env.http.seen.requests) == 2
    gserver, gport = await serve_grpc(sidecar)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gport}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await echo_pb2_grpc.EchoStub(ch).Say(echo_pb2.EchoRequest(text="x"), timeout=5)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await gserver.stop(None)
        await sidecar.aclose()
    assert env.grpc.seen == []
    assert env.stack.sentry.metrics.value("pqcnet_sentry_requests_total",
                                          {"outcome": "rate_limited"}) == 2


async def test_grpc_rejection_codes(env: Env) -> None:
    sidecar = env.stack.sidecar(env.mesh.acme, SigningKey.generate())
    gserver, gport = await serve_grpc(sidecar)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gport}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await echo_pb2_grpc.EchoStub(ch).Say(echo_pb2.EchoRequest(text="x"), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await gserver.stop(None)
        await sidecar.aclose()
    assert env.grpc.seen == []


async def test_backend_down_is_a_clear_502(env: Env) -> None:
    env.http.server.shutdown()
    env.http.server.server_close()
    r = await http_via(env.stack.sidecar(env.mesh.acme, env.mesh.acme_issuer))
    assert r.status_code == 502 and r.json()["error"] == "backend_error"
