"""Large work crosses the relayer's 8 MiB message limit in parts.

Delivery: a backlog of large frames reaches a subscriber — shares are cut into messages
it accepts. Before, a share went as one message whatever its size; a subscriber
refuses messages over 8 MiB (``MessageTooLarge``), so a customer whose subscriber came
back to more than 8 MiB of held frames got the error, reconnected, and got the same
message again — never any frame.

Publishing: one ``publish`` call of more than a request holds (4096 frames, or more
than 8 MiB) goes as several requests. Before, the relayer refused every frame of a
call over 4096, and a call over 8 MiB reset the publisher's stream (failing every
request on it)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pqcnet.relayer.frame import Frame
from pqcnet.relayer.wire import (
    MAX_MESSAGE,
    MAX_PAYLOAD_LIMIT,
    MessageReader,
    MessageTooLarge,
    decode_server,
    encode_delivery_messages,
)
from tests.relayer.e2e import publisher, start_node, subscriber

pytestmark = pytest.mark.timeout(120)


def test_a_large_share_is_cut_into_messages_a_subscriber_accepts() -> None:
    frames = [Frame("acme", "c", s, bytes([s]) * (700 * 1024)) for s in range(1, 41)]
    messages = encode_delivery_messages(frames)
    assert len(messages) > 1
    reader = MessageReader()  # the subscriber's: refuses bodies over MAX_MESSAGE
    got = [f for m in messages for body in reader.feed(m) for f in decode_server(body)]
    assert [(f.seq, f.payload) for f in got] == [(f.seq, f.payload) for f in frames]
    assert all(len(m) - 4 <= MAX_MESSAGE for m in messages)
    small = [Frame("acme", "c", s, b"x") for s in range(1, 100)]
    assert len(encode_delivery_messages(small)) == 1  # the common case: one message
    with pytest.raises(MessageTooLarge):  # a frame over the limit cannot be cut
        encode_delivery_messages([Frame("acme", "c", 1, b"x" * (MAX_MESSAGE + 1))])


def test_max_payload_is_bounded_so_that_a_frame_fits_a_message() -> None:
    from pqcnet.relayer.config import RelayerConfig
    from pqcnet.relayer.errors import ConfigError

    assert RelayerConfig(max_payload=MAX_PAYLOAD_LIMIT).max_payload == MAX_PAYLOAD_LIMIT
    with pytest.raises((ConfigError, ValueError), match="max_payload"):
        RelayerConfig.from_mapping({"relayer": {"max_payload": MAX_PAYLOAD_LIMIT + 1}})


async def test_a_subscriber_gets_a_backlog_of_large_frames(tmp_path: Path) -> None:
    """12 MiB of 512 KiB frames held for a customer with no subscriber (four publish
    requests of 3 MiB); the subscriber that comes gets all of them, in order, once."""
    node = await start_node(tmp_path)
    pub = sub = None
    try:
        pub = await publisher(node.port)
        topic = ("acme", "big")
        n = 24
        for first in range(1, n + 1, 6):
            results = await pub.publish([Frame(*topic, s, bytes([s]) * (512 * 1024))
                                         for s in range(first, first + 6)])
            assert all(r.accepted for r in results), results
        sub = await subscriber(node.port, "acme")
        await sub.wait_for(n, 60)
        assert sub.by_topic[topic] == list(range(1, n + 1))
        assert all(f.payload == bytes([f.seq]) * (512 * 1024) for f in sub.frames)
    finally:
        if sub is not None:
            await sub.close()
        if pub is not None:
            await pub.close()
        await node.stop()


async def test_one_publish_call_larger_than_a_request_goes_in_parts(tmp_path: Path) -> None:
    """12 MiB in one call, then 5,000 small frames in one call, then a frame that no
    message can hold (refused before sending, the stream still usable); the subscriber
    gets every accepted frame once, in order."""
    from pqcnet.relayer.wire import MAX_MESSAGE, MessageTooLarge

    node = await start_node(tmp_path)
    pub = sub = None
    try:
        sub = await subscriber(node.port, "acme")
        await asyncio.sleep(0.2)  # subscribed
        pub = await publisher(node.port)
        big, many = ("acme", "big"), ("acme", "many")
        results = await pub.publish([Frame(*big, s, bytes([s]) * (512 * 1024))
                                     for s in range(1, 25)])
        assert [r.accepted for r in results] == [True] * 24
        results = await pub.publish([Frame(*many, s, b"m") for s in range(1, 5001)])
        assert [r.seq for r in results] == list(range(1, 5001))
        assert all(r.accepted for r in results)
        with pytest.raises(MessageTooLarge):
            await pub.publish([Frame(*big, 25, b"x" * (MAX_MESSAGE + 1))])
        (after,) = await pub.publish([Frame(*big, 25, b"still usable")])
        assert after.accepted
        await sub.wait_for(24 + 5000 + 1, 60)
        assert sub.by_topic[big] == list(range(1, 26))
        assert sub.by_topic[many] == list(range(1, 5001))
    finally:
        if sub is not None:
            await sub.close()
        if pub is not None:
            await pub.close()
        await node.stop()
