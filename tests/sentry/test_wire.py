"""Head blocks: round trip, byte-at-a-time feeding, and parse-or-typed-error fuzzing."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pqcnet.sentry import wire
from pqcnet.sentry.errors import RequestTooLarge, WireError

HEAD = wire.RequestHead("http", "POST", "/rpc?x=1", (("content-type", "application/json"),),
                        b"assertion", 5.0)


def test_roundtrip_whole_and_byte_at_a_time() -> None:
    data = wire.encode_request(HEAD) + b"body"
    dec = wire.HeadDecoder()
    got = None
    for i in range(len(data)):
        got = dec.feed(data[i : i + 1])
        if got is not None:
            break
    assert got is not None
    payload, rest = got
    assert wire.decode_request(payload) == HEAD
    rest += data[i + 1 :]
    assert rest == b"body"
    resp = wire.ResponseHead(429, (("retry-after", "1"),), "rate_limited", "slow down", 0.5, 8)
    enc = wire.encode_response(resp)
    assert wire.decode_response(enc[4:]) == resp


def test_bounds() -> None:
    with pytest.raises(RequestTooLarge):
        wire.HeadDecoder(max_head=100).feed(b"\x00\x01\x00\x00")
    with pytest.raises(RequestTooLarge):
        wire.encode_request(wire.RequestHead("http", "GET", "/", (("a", "b"),) * 101))
    with pytest.raises(WireError):
        wire.encode_request(wire.RequestHead("smtp", "GET", "/"))


@given(st.binary(max_size=200))
def test_fuzz_parse_or_typed_error(data: bytes) -> None:
    with contextlib.suppress(WireError):
        wire.decode_request(data)
    with contextlib.suppress(WireError):
        wire.decode_response(data)


async def test_read_head_from_recv() -> None:
    chunks = [wire.encode_request(HEAD)[:3], wire.encode_request(HEAD)[3:] + b"xy"]

    async def recv() -> bytes:
        return chunks.pop(0) if chunks else b""

    payload, rest = await wire.read_head(recv)
    assert wire.decode_request(payload).path == "/rpc?x=1" and rest == b"xy"
    with pytest.raises(WireError, match="ended"):
        await wire.read_head(recv)
