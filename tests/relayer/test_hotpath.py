"""The batch-level hot path (issue 15) decides exactly what the per-frame path did.

* ``Sequencer.offer_batch`` (the shard worker's inline common case) against ``offer``
  one record at a time, on random streams with duplicates, gaps and reordering;
* the protobuf fast path of ``decode_client`` (present vs missing fields, QoS 0 vs
  absent);
* the ingress deciding ids / authorization / shard once per topic per request, with
  every frame still checked on its own (payload, seq order, refusals counted per frame);
* the subscriber stream writing several queued shares in one send.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pqcnet.proto import relayer_pb2 as pb
from pqcnet.relayer.authz import Quotas, QuotaSpec, QuotasSpec
from pqcnet.relayer.bus.base import Delivery
from pqcnet.relayer.errors import FieldMissing, FieldTooLarge, NotAuthorized, SeqNotMonotonic
from pqcnet.relayer.frame import Frame
from pqcnet.relayer.sequencer import Deliver, Sequencer
from pqcnet.relayer.wire import decode_client
from tests.relayer.e2e import publisher, start_node, subscriber

TOPICS = [("c", "a"), ("c", "b"), ("d", "a")]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(1, 12)), max_size=60),
       st.integers(1, 6), st.lists(st.integers(0, 2), max_size=3))
def test_offer_batch_decides_like_offer(records: list[tuple[int, int]], max_reorder: int,
                                        primed: list[int]) -> None:
    marks = {TOPICS[t]: 3 for t in primed}  # some topics with a durable mark, some new
    one = Sequencer(max_reorder=max_reorder, gap_timeout=1.0)
    batch = Sequencer(max_reorder=max_reorder, gap_timeout=1.0)
    for s in (one, batch):
        s.prime(marks, [TOPICS[t] for t in primed])
    pairs = [(Frame(*TOPICS[t], seq, b"p%d" % i), Delivery(0, i, b""))
             for i, (t, seq) in enumerate(records)]
    for chunk in (pairs[:20], pairs[20:40], pairs[40:]):  # several worker steps
        want_frames: list[Frame] = []
        want_other = []
        for frame, d in chunk:
            for ev in one.offer(frame, d, 0.0):
                if isinstance(ev, Deliver):
                    want_frames.append(ev.frame)
                else:
                    want_other.append(ev)
        got_frames: list[Frame] = []
        got_other = batch.offer_batch(chunk, 0.0, got_frames)
        assert got_frames == want_frames
        assert got_other == want_other
        assert batch.take_dirty() == one.take_dirty()
        assert batch.buffered == one.buffered
        assert {t: batch.next_seq(t) for t in TOPICS} == {t: one.next_seq(t) for t in TOPICS}
        assert batch.poll(5.0) == one.poll(5.0)  # same gaps pending


def _publish_body(*frames: pb.IngressFrame) -> bytes:
    msg = pb.ClientMessage()
    msg.publish.request_id = 7
    msg.publish.frames.extend(frames)
    return msg.SerializeToString()


def test_decode_fast_path_keeps_presence_and_qos() -> None:
    body = _publish_body(
        pb.IngressFrame(customer_id="c", channel_id="a", seq=1, payload=b"x"),  # qos absent
        pb.IngressFrame(customer_id="c", channel_id="a", seq=2, payload=b"x", qos=0),
        pb.IngressFrame(customer_id="c", channel_id="a", seq=3, payload=b"", qos=2),
        pb.IngressFrame(customer_id="c", channel_id="a", seq=4),  # payload missing
        pb.IngressFrame(customer_id="c", seq=5, payload=b"x"),  # channel missing
        pb.IngressFrame(customer_id="c", channel_id="a", payload=b"x", retry=True),
    )
    request = decode_client(body)
    assert isinstance(request, tuple)
    rid, items = request
    assert rid == 7
    assert [i.frame for i in items[:3]] == [Frame("c", "a", 1, b"x", 1),
                                            Frame("c", "a", 2, b"x", 0),
                                            Frame("c", "a", 3, b"", 2)]
    assert all(i.error is None for i in items[:3])
    for item, field in zip(items[3:], ("payload", "channel_id", "seq"), strict=True):
        assert item.frame is None and isinstance(item.error, FieldMissing)
        assert field in str(item.error)
    assert items[5].retry and items[5].seq == 0


def test_quotas_know_when_nobody_is_limited() -> None:
    q = Quotas()
    assert q.unlimited
    q.apply_rate_limit("acme", 5, 5, 0.0)
    assert not q.unlimited
    q.take("other", 100, 0, 0.0)  # still unlimited for the others
    q.take("acme", 5, 0, 0.0)
    with pytest.raises(Exception, match="quota"):
        q.take("acme", 1, 0, 0.0)
    q.reload(QuotasSpec(default=QuotaSpec()), 0.0)
    assert q.unlimited


async def test_per_topic_decisions_still_judge_every_frame(tmp_path: Path) -> None:
    # no rule: the publisher's tenant (acme) may publish to its own customer only
    node = await start_node(tmp_path, authz={"customers": {}}, max_payload=16)
    sub = await subscriber(node.port, "acme")
    pub = await publisher(node.port)
    try:
        res = await pub.publish([
            Frame("acme", "a", 1, b"ok"),
            Frame("other", "x", 1, b"no"),           # not authorized
            Frame("acme", "a", 2, b"y" * 17),        # same topic, payload too large
            Frame("acme", "a", 2, b"ok"),            # the ids passed above: still judged
            Frame("other", "x", 2, b"no"),           # refused again, counted again
            Frame("acme", "a", 2, b"again"),         # not after 2, no retry flag
            Frame("acme", "b", 1, b"best-effort", 0),
        ])
        assert [r.accepted for r in res] == [True, False, False, True, False, False, True]
        assert [r.code for r in res if not r.accepted] == [
            NotAuthorized.code, FieldTooLarge.code, NotAuthorized.code, SeqNotMonotonic.code]
        assert node.ingress.stats.unauthorized == 2
        assert node.authz.refusals["publish"] == 2
        await sub.wait_for(3, 30)
        assert dict(sub.by_topic) == {("acme", "a"): [1, 2], ("acme", "b"): [1]}
        assert [f.qos for f in sub.frames if f.channel == "b"] == [0]
    finally:
        await pub.close()
        await sub.close()
        await node.stop()


async def test_queued_shares_written_together_arrive_once_in_order(tmp_path: Path) -> None:
    # frames of every shard wait for a subscriber (held); when it joins, the shard
    # workers queue their shares at once and the stream coalesces them into few sends
    node = await start_node(tmp_path, shards=8)
    pub = await publisher(node.port)
    sub = None
    try:
        topics = [f"t{i}" for i in range(16)]
        for start in range(1, 61, 20):
            res = await pub.publish([Frame("acme", t, s, b"%d" % s)
                                     for s in range(start, start + 20) for t in topics])
            assert all(r.accepted for r in res)
        sub = await subscriber(node.port, "acme")
        await sub.wait_for(16 * 60, 60)
        assert {t: sub.by_topic[("acme", t)] for t in topics} == {
            t: list(range(1, 61)) for t in topics}
        assert len(sub.frames) == 16 * 60
    finally:
        await pub.close()
        if sub is not None:
            await sub.close()
        await node.stop()
