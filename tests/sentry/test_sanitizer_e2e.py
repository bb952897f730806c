"""The backend receives exactly the policy's transformation — random metadata, real stack."""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import string

import grpc.aio
import httpx
import pytest

from pqcnet.proto import echo_pb2, echo_pb2_grpc
from pqcnet.sentry.sidecar import serve_grpc, serve_http

from .conftest import Env
from .harness import SANITIZER_KEY

pytestmark = pytest.mark.timeout(60)
RULES = {"x-forwarded-for": "strip", "x-user-id": "hash", "x-wallet": "redacted"}
FIELDS = {"ip": "strip", "user_id": "hash", "wallet": "0x0"}


def model(rules: dict[str, str], key: str, value: str) -> str | None:
    rule = rules.get(key.lower())
    if rule is None:
        return value
    if rule == "strip":
        return None
    if rule == "hash":
        return "hmac256:" + hmac.new(bytes.fromhex(SANITIZER_KEY), value.encode(),
                                     hashlib.sha256).hexdigest()
    return rule


def rand_text(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_letters + string.digits + ".:-_ ")
                   for _ in range(rng.randint(1, 30))).strip() or "v"


async def test_http_random_headers_and_json(env: Env) -> None:
    rng = random.Random(20261122)
    sidecar = env.stack.sidecar(env.mesh.acme, env.mesh.acme_issuer)
    server = await serve_http(sidecar)
    port = server.sockets[0].getsockname()[1]
    names = [*RULES, "x-other", "x-trace-id", "accept-language"]
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            for _ in range(40):
                headers = {(n.upper() if rng.random() < 0.3 else n): rand_text(rng)
                           for n in rng.sample(names, rng.randint(0, 5))}
                params: dict[str, object] = {
                    f: rand_text(rng) for f in rng.sample([*FIELDS, "block", "to"],
                                                          rng.randint(0, 5))}
                r = await client.post("/rpc", headers=headers,
                                      json={"id": 1, "method": "m", "params": params})
                assert r.status_code == 200
                seen = env.http.seen.requests[-1]
                got = {k.lower(): v for k, v in seen["headers"].items()}
                for name, value in headers.items():
                    want = model(RULES, name, value)
                    if want is None:
                        assert name.lower() not in got
                    else:
                        assert got[name.lower()] == want
                want_params = {k: model(FIELDS, k, str(v)) for k, v in params.items()}
                want_params = {k: v for k, v in want_params.items() if v is not None}
                assert json.loads(seen["body"])["params"] == want_params
    finally:
        server.close()
        await sidecar.aclose()


async def test_grpc_random_metadata(env: Env) -> None:
    rng = random.Random(7)
    sidecar = env.stack.sidecar(env.mesh.acme, env.mesh.acme_issuer)
    server, port = await serve_grpc(sidecar)
    names = [*RULES, "x-other", "x-trace-id"]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = echo_pb2_grpc.EchoStub(ch)
            for i in range(25):
                md = tuple((n, rand_text(rng)) for n in rng.sample(names, rng.randint(0, 4)))
                await stub.Say(echo_pb2.EchoRequest(text=str(i)), metadata=md, timeout=10)
                _text, seen = env.grpc.seen[-1]
                got = dict(seen)
                for name, value in md:
                    want = model(RULES, name, value)
                    assert got.get(name) == want
    finally:
        await server.stop(None)
        await sidecar.aclose()
