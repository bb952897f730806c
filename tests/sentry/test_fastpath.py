"""The per-RPC fast paths (round 2 of the sentry performance work) change nothing a
client or backend can observe: memoised heads equal freshly computed ones, bounds and
refusals still apply on a memo hit, and the optional uvloop loop proxies real RPCs."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest

from pqcnet._util import loop
from pqcnet.sentry import wire
from pqcnet.sentry.assertion import SessionAssertion
from pqcnet.sentry.core import Admission, Sentry
from pqcnet.sentry.errors import WireError
from pqcnet.sentry.memo import Memo
from pqcnet.sentry.sanitizer import SanitizerPolicy
from pqcnet.sentry.upstream import parse_response_head

from .harness import SANITIZER_KEY, HttpBackend, Mesh, config_dict, sentry_stack, write_config

pytestmark = pytest.mark.timeout(60)


def test_memo_is_bounded_and_clears_when_full() -> None:
    m: Memo[int, str] = Memo(max_entries=3)
    for i in range(3):
        m.put(i, str(i))
    assert len(m) == 3 and m.get(2) == "2"
    m.put(3, "3")  # full: forgets everything, keeps the new entry
    assert len(m) == 1 and m.get(0) is None and m.get(3) == "3"


def test_wire_memo_returns_what_a_fresh_codec_would() -> None:
    heads = [wire.RequestHead("http", "POST", f"/rpc/{i}", (("x-a", str(i)),), b"A" * 3400)
             for i in range(5)]
    for _ in range(2):  # second round is served from the memo
        for h in heads:
            enc = wire.encode_request(h)
            assert enc == wire._encode_request(h)
            assert wire.decode_request(enc[4:]) == h
    resp = wire.ResponseHead(200, (("content-length", "3"),))
    assert wire.decode_response(wire.encode_response(resp)[4:]) == resp
    assert wire.encode_response(dataclasses.replace(resp, status=201)) != \
        wire.encode_response(resp)


def test_malformed_heads_are_refused_every_time() -> None:
    for _ in range(3):
        with pytest.raises(WireError):
            wire.decode_request(b"\xff\xff\xff")
        with pytest.raises(WireError):
            wire.decode_request(wire._encode_request(
                wire.RequestHead("http", "GET", "/x"))[4:].replace(b"http", b"nope"))


def test_response_head_memo_is_read_only_and_strict() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n\r\n"
    status, headers, http10, lower = parse_response_head(raw)
    assert (status, headers, http10) == (200, (("Content-Length", "2"), ("X-A", "b")), False)
    assert lower["x-a"] == "b"
    with pytest.raises(TypeError):
        lower["x-a"] = "c"  # type: ignore[index]
    assert parse_response_head(raw) is parse_response_head(raw)
    for _ in range(2):
        with pytest.raises(ValueError):
            parse_response_head(b"HTTP/1.1 2000 OK\r\n\r\n")


def test_keyed_hash_memo_matches_hmac() -> None:
    key = bytes.fromhex(SANITIZER_KEY)
    policy = SanitizerPolicy(key)
    for value in ("u-1", "u-2", "u-1", "x" * 1000, "x" * 1000):
        want = "hmac256:" + hmac.new(key, value.encode(), hashlib.sha256).hexdigest()
        assert policy.keyed_hash(value) == want


def _admission(sentry: Sentry, tenant: str) -> Admission:
    a = SessionAssertion("alice", tenant, b"s", (), 0, 1, b"", b"")
    return Admission(a, sentry.config.backends["jsonrpc"], "POST /rpc")


async def test_forwarded_headers_follow_a_policy_reload(tmp_path: Path, mesh: Mesh) -> None:
    sentry = Sentry(_load(tmp_path, mesh))  # grpc backends need a running loop
    try:
        _check_forwarded_headers(sentry)
    finally:
        await sentry.aclose()


def _check_forwarded_headers(sentry: Sentry) -> None:
    head = wire.RequestHead("http", "POST", "/rpc", (
        ("x-user-id", "u-7"), ("x-keep", "k"), ("x-pqcnet-assertion", "zzz")))
    first = sentry.prepare(head, b"", _admission(sentry, "acme")).headers
    assert first == sentry.prepare(head, b"", _admission(sentry, "acme")).headers
    assert ("x-keep", "k") in first and all(n != "x-pqcnet-assertion" for n, _ in first)
    assert dict(first)["x-user-id"].startswith("hmac256:")
    policy = sentry.config.policy
    acme = policy.sanitizer["acme"]
    sentry.reload(dataclasses.replace(policy, sanitizer={"acme": SanitizerPolicy(
        acme.key, {"x-user-id": dataclasses.replace(acme.headers["x-user-id"],
                                                    kind="strip")})}))
    after = sentry.prepare(head, b"", _admission(sentry, "acme")).headers
    assert after == (("x-keep", "k"),)  # the memo did not outlive the old policy
    assert sentry.prepare(head, b"", _admission(sentry, "globex")).headers == (
        ("x-user-id", "u-7"), ("x-keep", "k"))  # no policy for globex


async def test_header_memos_keep_their_size_bound(tmp_path: Path, mesh: Mesh) -> None:
    """A peer's oversized header block (under the 64 KiB head limit, over the memo's
    item bound) is answered like any other but never remembered: the memos hold at most
    max_entries x max_item, whatever the peers send."""
    from pqcnet.sentry import backends

    sentry = Sentry(_load(tmp_path, mesh))
    try:
        memo = sentry._forward_headers
        big = (("x-keep", "k" * (memo.max_item + 1)),)
        small = (("x-keep", "k"),)
        for headers in (big, big, small):
            head = wire.RequestHead("http", "POST", "/rpc", headers)
            assert sentry.prepare(head, b"", _admission(sentry, "globex")).headers == headers
        assert len(memo) == 1 and memo.get(small) is not None and memo.get(big) is None
    finally:
        await sentry.aclose()
    backends._filtered.clear()
    huge = (("x-big", "v" * (backends._filtered.max_item + 1)), ("connection", "close"))
    assert backends._end_to_end(huge) == huge[:1]  # hop-by-hop dropped all the same
    assert len(backends._filtered) == 0
    assert backends._end_to_end(small) == small and len(backends._filtered) == 1


def _load(tmp_path: Path, mesh: Mesh) -> Any:
    from pqcnet.sentry.config import load_config

    return load_config(write_config(tmp_path, mesh, config_dict(1, 2, 3)))


def test_loop_choice_honours_the_opt_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(loop.NO_UVLOOP_ENV, "1")
    assert loop.loop_factory() is None and loop.loop_name() == "asyncio"
    assert loop.run(_loop_type()) == "_UnixSelectorEventLoop"
    monkeypatch.delenv(loop.NO_UVLOOP_ENV)
    try:
        import uvloop
    except ImportError:
        assert loop.loop_factory() is None
    else:
        assert loop.loop_factory() is uvloop.new_event_loop
        assert loop.run(_loop_type()) == "Loop"


async def _loop_type() -> str:
    return type(asyncio.get_running_loop()).__name__


def test_rpcs_through_sidecar_and_sentry_on_uvloop(tmp_path: Path, mesh: Mesh) -> None:
    """The whole path (QSTP, sentry, upstream pool, local HTTP face) on uvloop."""
    uvloop = pytest.importorskip("uvloop")

    async def main(http_port: int) -> list[tuple[int, Any]]:
        from pqcnet.sentry.sidecar import serve_http

        assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        path = write_config(tmp_path, mesh, config_dict(http_port, 1, 1))
        async with sentry_stack(mesh, path) as stack:
            sidecar = stack.sidecar(mesh.acme, mesh.acme_issuer)
            server = await serve_http(sidecar)
            port = server.sockets[0].getsockname()[1]
            r, w = await asyncio.open_connection("127.0.0.1", port)
            out = []
            for i in range(20):
                body = json.dumps({"jsonrpc": "2.0", "id": i, "method": "m"}).encode()
                w.write(b"POST /rpc HTTP/1.1\r\nhost: x\r\nx-user-id: u-9\r\n"
                        b"content-length: %d\r\n\r\n%s" % (len(body), body))
                head = await r.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                out.append((int(head[9:12]), json.loads(await r.readexactly(length))))
            w.close()
            server.close()
            await sidecar.aclose()
            return out

    with HttpBackend() as http, asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        got = runner.run(main(http.port))
        seen = list(http.seen.requests)
    assert [s for s, _ in got] == [200] * 20
    assert [doc["id"] for _, doc in got] == list(range(20))  # each answer to its request
    want = "hmac256:" + hmac.new(bytes.fromhex(SANITIZER_KEY), b"u-9",
                                 hashlib.sha256).hexdigest()
    assert len(seen) == 20
    assert all(req["headers"].get("x-user-id") == want for req in seen)
