"""Frame codec: exact layout, round trips (hypothesis), and "parse or FrameError" fuzzing."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pqcnet.qstp import frames as fr
from pqcnet.qstp.errors import FrameError, ProtocolError
from pqcnet.qstp.frames import ErrorCode, Flags, FlowOp, Frame, FrameDecoder, FrameType

SMALL_LIMIT = 4096

u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, fr.MAX_SEQ)
reason_text = st.text(max_size=40)


@st.composite
def valid_frames(draw: st.DrawFn) -> Frame:
    kind = draw(st.sampled_from(list(FrameType)))
    seq = draw(u64)
    if kind is FrameType.DATA:
        sid = draw(st.integers(1, 0xFFFFFFFF))
        payload = draw(st.binary(max_size=300))
        flags = draw(st.sampled_from([0, Flags.END_STREAM]))
        return Frame(kind, sid, seq, payload, int(flags))
    if kind in (FrameType.PING, FrameType.PONG):
        return Frame(kind, 0, seq, draw(st.binary(min_size=8, max_size=8)))
    if kind is FrameType.REKEY:
        return Frame(kind, 0, seq, b"")
    if kind is FrameType.GOAWAY:
        payload = fr.goaway_payload(draw(u32), draw(u64), draw(st.integers(0, 0xFFFF)),
                                    draw(reason_text))
        return Frame(kind, 0, seq, payload)
    sid = draw(u32)
    if kind is FrameType.ACK:
        return Frame(kind, sid, seq, fr.ack_payload(draw(u32)))
    if kind is FrameType.FLOW:
        payload = fr.flow_payload(draw(st.sampled_from(list(FlowOp))),
                                  draw(st.integers(0, 0xFFFF)), draw(u32))
        return Frame(kind, sid, seq, payload)
    return Frame(kind, sid, seq, fr.error_payload(draw(st.integers(0, 0xFFFF)),
                                                  draw(reason_text)))


def test_header_layout_is_fixed_big_endian() -> None:
    raw = fr.encode(FrameType.DATA, 7, 0x0102030405060708, b"hi", Flags.END_STREAM)
    assert fr.HEADER_SIZE == 20
    assert raw == bytes([1, 0, 0, 1, 0, 0, 0, 7, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 2]) + b"hi"


def test_payload_helpers_round_trip() -> None:
    ack = Frame(FrameType.ACK, 3, 9, fr.ack_payload(123456))
    assert fr.parse_ack(ack) == 123456
    flow = Frame(FrameType.FLOW, 0, 0, fr.flow_payload(FlowOp.PAUSE, 42, 1500))
    assert fr.parse_flow(flow) == (FlowOp.PAUSE, 42, 1500)
    err = Frame(FrameType.ERROR, 0, 0, fr.error_payload(ErrorCode.FRAME_ERROR, "bad ✓"))
    assert fr.parse_error(err) == (ErrorCode.FRAME_ERROR, "bad ✓")
    ga = Frame(FrameType.GOAWAY, 0, 0, fr.goaway_payload(9, 77, 0, "bye"))
    assert fr.parse_goaway(ga) == (9, 77, 0, "bye")


def test_long_reason_is_truncated_on_a_code_point_boundary() -> None:
    payload = fr.error_payload(1, "é" * fr.MAX_REASON)
    code, reason = fr.parse_error(Frame(FrameType.ERROR, 0, 0, payload))
    assert code == 1
    assert len(reason.encode()) <= fr.MAX_REASON
    assert set(reason) == {"é"}


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (bytes([2]) + bytes(19), "version"),
        (fr.encode(FrameType.DATA, 0, 0, b"x"), "stream 0"),
        (bytes([1, 99]) + bytes(18), "unknown frame type"),
        (fr.encode(FrameType.PING, 0, 0, b"short"), "8 bytes"),
        (fr.encode(FrameType.PING, 5, 0, bytes(8)), "stream 0"),
        (fr.encode(FrameType.ACK, 1, 0, b"", flags=0x8), "undefined flags"),
        (fr.encode(FrameType.REKEY, 0, 0, b"x"), "no payload"),
        (fr.HEADER.pack(1, 0, 0, 1, 0, SMALL_LIMIT + 1), "exceeds limit"),
    ],
)
def test_malformed_headers_raise_frame_error(raw: bytes, needle: str) -> None:
    with pytest.raises(FrameError, match=needle) as info:
        FrameDecoder(SMALL_LIMIT).feed(raw)
    assert info.value.code == ErrorCode.FRAME_ERROR


def test_oversized_length_is_refused_before_the_payload_arrives() -> None:
    dec = FrameDecoder(SMALL_LIMIT)
    with pytest.raises(FrameError):
        dec.feed(fr.HEADER.pack(1, 0, 0, 1, 0, 0xFFFFFFFF))
    assert dec.buffered == 0
    with pytest.raises(FrameError, match="already failed"):
        dec.feed(b"")


def test_bad_payloads_raise_frame_error() -> None:
    with pytest.raises(FrameError):
        fr.parse_ack(Frame(FrameType.ACK, 0, 0, b"123"))
    with pytest.raises(FrameError):
        fr.parse_flow(Frame(FrameType.FLOW, 0, 0, fr.flow_payload(FlowOp.PAUSE, 0, 0)[:-1]))
    with pytest.raises(FrameError, match="FLOW op"):
        fr.parse_flow(Frame(FrameType.FLOW, 0, 0, bytes([9]) + bytes(6)))
    with pytest.raises(FrameError, match="UTF-8"):
        fr.parse_error(Frame(FrameType.ERROR, 0, 0, b"\x00\x01\xff\xfe"))
    with pytest.raises(FrameError, match="shorter"):
        fr.parse_goaway(Frame(FrameType.GOAWAY, 0, 0, b"\x00"))


def test_decode_all_rejects_trailing_partial_frame() -> None:
    raw = fr.encode(FrameType.REKEY, 0, 1) + b"\x01\x00"
    with pytest.raises(FrameError, match="trailing"):
        fr.decode_all(raw)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(valid_frames(), max_size=8), st.integers(1, 64))
def test_round_trip_whole_split_and_byte_at_a_time(frames: list[Frame], cut: int) -> None:
    wire = b"".join(fr.encode_frame(f) for f in frames)
    assert fr.decode_all(wire) == frames
    dec = FrameDecoder()
    out: list[Frame] = []
    for i in range(0, len(wire), cut):
        out += dec.feed(wire[i : i + cut])
    assert out == frames
    assert dec.buffered == 0
    if len(wire) < 2000:
        dec = FrameDecoder()
        one: list[Frame] = []
        for i in range(len(wire)):
            one += dec.feed(wire[i : i + 1])
        assert one == frames


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(valid_frames(), min_size=1, max_size=8), st.integers(1, 64))
def test_memoryview_input_is_copied_out_before_its_buffer_is_reused(
        frames: list[Frame], cut: int) -> None:
    """The TLS reader hands large reads over as a view on a buffer it reuses: after
    ``feed`` returns, wiping that buffer must change no frame and no buffered tail."""
    wire = b"".join(fr.encode_frame(f) for f in frames)
    scratch = bytearray(cut)
    dec = FrameDecoder()
    out: list[Frame] = []
    for i in range(0, len(wire), cut):
        piece = wire[i : i + cut]
        scratch[: len(piece)] = piece
        got = dec.feed(memoryview(scratch)[: len(piece)])
        scratch[:] = b"\xee" * cut  # the next read overwrites the buffer
        assert all(type(f.payload) is bytes for f in got)
        out += got
    assert out == frames
    assert dec.buffered == 0


def _parse_everything(frames: list[Frame]) -> None:
    """Run the payload parser for each frame type (may raise FrameError only)."""
    for f in frames:
        if f.type is FrameType.ACK:
            fr.parse_ack(f)
        elif f.type is FrameType.FLOW:
            fr.parse_flow(f)
        elif f.type is FrameType.ERROR:
            fr.parse_error(f)
        elif f.type is FrameType.GOAWAY:
            fr.parse_goaway(f)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600), st.booleans())
def test_any_bytes_parse_or_raise_frame_error(data: bytes, bytewise: bool) -> None:
    dec = FrameDecoder(SMALL_LIMIT)
    try:
        if bytewise:
            got: list[Frame] = []
            for i in range(len(data)):
                got += dec.feed(data[i : i + 1])
        else:
            got = dec.feed(data)
        _parse_everything(got)
    except ProtocolError as exc:
        assert isinstance(exc, FrameError)
        return
    # bounded memory: never more than one incomplete frame is held
    assert dec.buffered <= fr.HEADER_SIZE + SMALL_LIMIT
    assert dec.buffered <= len(data)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(valid_frames(), min_size=1, max_size=4), st.integers(0, 10_000),
       st.integers(0, 255))
def test_single_byte_corruption_parses_or_raises_frame_error(
    frames: list[Frame], where: int, value: int
) -> None:
    wire = bytearray(b"".join(fr.encode_frame(f) for f in frames))
    wire[where % len(wire)] = value
    with contextlib.suppress(FrameError):
        _parse_everything(FrameDecoder().feed(bytes(wire)))
