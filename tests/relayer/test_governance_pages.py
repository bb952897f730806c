"""GetVolume in pages: a governance pull of a big meter used to be one gRPC message,
which every gRPC client refuses past 4 MiB (~127k records — a relayer with the 100k
active topics of issue 15 over two epochs). Now the client walks pages by an opaque
cursor; the records it collects are exactly the meter's, in order, with nothing lost
or doubled when traffic lands between pages; a bad cursor is INVALID_ARGUMENT and a
report bigger than a client accepts is refused with a clear message."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import grpc
import pytest

from pqcnet.identity import dev_identities
from pqcnet.proto import relayer_pb2 as pb
from pqcnet.proto import relayer_pb2_grpc as pb_grpc
from pqcnet.relayer import governance
from pqcnet.relayer.errors import GovernanceError
from pqcnet.relayer.governance import (
    DEFAULT_PAGE_SIZE,
    VolumeFilter,
    VolumeMetricsService,
    pull_report,
    pull_volume,
    serve_governance,
)
from pqcnet.relayer.metering import VolumeMeter, VolumeRecord
from pqcnet.relayer.proof import PerformanceReport, build_volume_proofs, sign_report

pytestmark = pytest.mark.timeout(120)


def _meter(seed: int, n: int) -> VolumeMeter:
    rng = random.Random(seed)
    m = VolumeMeter(60)
    m.apply({(rng.randrange(5), rng.choice("abc"), f"ch{rng.randrange(n)}", rng.randrange(3)):
             [rng.randrange(1, 1000), rng.randrange(1, 9)] for _ in range(n)})
    return m


def _walk(m: VolumeMeter, f: VolumeFilter, limit: int, max_bytes: int = 1 << 30,
          ) -> tuple[list[VolumeRecord], int]:
    out: list[VolumeRecord] = []
    after, pages = None, 0
    while True:
        recs, after = m.page(f.customer, f.channel, f.epoch_from, f.epoch_to, after, limit,
                             max_bytes)
        pages += 1
        assert len(recs) <= limit
        out += recs
        if after is None:
            return out, pages
        assert pages < 10_000


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("limit", [1, 7, 100, 10_000])
def test_pages_concatenate_to_the_query(seed: int, limit: int) -> None:
    m = _meter(seed, 400)
    for f in (VolumeFilter(), VolumeFilter(customer="b"), VolumeFilter(channel="ch3"),
              VolumeFilter(epoch_from=1, epoch_to=3), VolumeFilter(customer="zz")):
        got, pages = _walk(m, f, limit)
        want = m.query(f.customer, f.channel, f.epoch_from, f.epoch_to)
        assert got == want
        assert pages == max(1, -(-len(want) // limit))  # no empty last page


def test_a_page_stops_at_its_byte_bound() -> None:
    m = VolumeMeter(60)
    m.apply({(1, "acme", "c" * 500 + str(i), 0): [1, 1] for i in range(100)})
    recs, after = m.page(None, None, 0, None, None, 1000, 5_000)
    assert 5 <= len(recs) <= 11 and after is not None  # ~540 bytes each
    got, _ = _walk(m, VolumeFilter(), 1000, 5_000)
    assert got == m.query()


def test_traffic_between_pages_is_neither_lost_nor_doubled() -> None:
    m = _meter(9, 300)
    first, after = m.page(None, None, 0, None, None, 50, 1 << 30)
    assert after is not None
    # new keys before and after the cursor, and more volume on one already sent
    m.apply({(0, "a", "aaa-new", 0): [5, 1], (4, "c", "zzz-new", 2): [5, 1],
             (first[0].epoch, first[0].customer, first[0].channel, first[0].qos): [1, 1]})
    rest: list[VolumeRecord] = []
    while after is not None:
        recs, after = m.page(None, None, 0, None, after, 50, 1 << 30)
        rest += recs
    keys = [(r.epoch, r.customer, r.channel, r.qos) for r in first + rest]
    assert len(keys) == len(set(keys)) and keys == sorted(keys)
    assert (4, "c", "zzz-new", 2) in keys  # after the cursor: seen
    assert set(keys) | {(0, "a", "aaa-new", 0)} == {
        (r.epoch, r.customer, r.channel, r.qos) for r in m.query()}


@pytest.fixture
async def big() -> AsyncIterator[tuple[str, VolumeMeter]]:
    m = VolumeMeter(60)
    m.apply({(e, "acme", f"channel-{i:07d}", 1): [64 + i % 7, 1]
             for e in (1, 2) for i in range(80_000)})
    _, ids = dev_identities("t.example", "spiffe://t.example/t/relayer/r")
    proofs = tuple(build_volume_proofs("r", 1, m.records(1), ids[0].key))
    report = sign_report(PerformanceReport("r", 1, 1, proofs, (), 1.0), ids[0].key)
    server, port = await serve_governance(VolumeMetricsService(m, lambda a, b: report),
                                          "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{port}", m
    finally:
        await server.stop(None)


async def test_a_pull_beyond_one_grpc_message_gets_every_record(
        big: tuple[str, VolumeMeter]) -> None:
    target, m = big  # 160k records: one response would be ~5.3 MB
    s = await pull_volume(target, VolumeFilter())
    assert list(s.records) == m.query()
    assert s.total_frames == 160_000 and s.total_bytes == sum(r.bytes for r in m.query())
    one = await pull_volume(target, VolumeFilter(epoch_from=2, channel="channel-0000042"))
    assert [(r.epoch, r.channel) for r in one.records] == [(2, "channel-0000042")]
    async with grpc.aio.insecure_channel(target) as ch:  # the wire: pages and the cursor
        stub = pb_grpc.VolumeMetricsStub(ch)  # type: ignore[no-untyped-call]
        first = await stub.GetVolume(pb.VolumeQuery())
        assert len(first.records) == DEFAULT_PAGE_SIZE and first.next_page_token
        assert first.total_frames == DEFAULT_PAGE_SIZE
        capped = await stub.GetVolume(pb.VolumeQuery(page_size=10**9))
        # capped by count and by encoded size, whichever comes first (here: the size)
        assert DEFAULT_PAGE_SIZE < len(capped.records) <= governance.MAX_PAGE_SIZE
        assert capped.ByteSize() <= governance.MAX_PAGE_BYTES + 1024
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetVolume(pb.VolumeQuery(page_token=b"\xff\xff not a cursor"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_report_too_big_for_a_client_is_refused_clearly(
        big: tuple[str, VolumeMeter], monkeypatch: pytest.MonkeyPatch) -> None:
    target, _ = big
    rep = await pull_report(target, 1, 1)  # ~4.6 MB: over gRPC's default, under ours
    assert len(rep.proofs[0].records) == 80_000
    monkeypatch.setattr(governance, "MAX_MESSAGE_BYTES", 1 << 20)
    with pytest.raises(GovernanceError, match=r"RESOURCE_EXHAUSTED.*ask for fewer epochs"):
        await pull_report(target, 1, 1)
