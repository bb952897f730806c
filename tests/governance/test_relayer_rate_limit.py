"""Issue 11, reproduction 6: a relayer said it applied rate-limit directives and did
nothing. Now the directive becomes the customer's frames/s quota at the running relayer
(real node, real QSTP tunnels), and the other directives are ``ignored`` there."""

from __future__ import annotations

from pathlib import Path

import pytest

from pqcnet.mesh.directives import ForceRekey, Outcome, RateLimitUpdate, SlashNotice
from pqcnet.relayer.frame import Frame
from pqcnet.runtime.governance import RelayerDirectives

from ..relayer.e2e import publisher, start_node

pytestmark = pytest.mark.timeout(60)


async def test_rate_limit_directive_becomes_a_customer_quota(tmp_path: Path) -> None:
    node = await start_node(tmp_path, shards=2)
    binding = RelayerDirectives(node)
    pub = await publisher(node.port)
    try:
        before = await pub.publish([Frame("acme", "ch", s, b"x") for s in range(1, 21)])
        assert all(r.accepted for r in before)  # no quota configured: unlimited
        assert binding.on_rate_limit(RateLimitUpdate("acme", 0.001, 4)) is Outcome.APPLIED
        after = await pub.publish([Frame("acme", "ch", s, b"x") for s in range(21, 31)])
        assert sum(r.accepted for r in after) == 4  # the burst, then refusals
        assert all(r.code == 33 and r.retriable for r in after[4:])
        other = await pub.publish([Frame("globex", "ch", s, b"x") for s in range(1, 11)])
        assert all(r.accepted for r in other)  # another customer is not limited
        binding.on_rate_limit(RateLimitUpdate("*", 0.001, 1))  # every customer
        limited = await pub.publish([Frame("globex", "ch", s, b"x") for s in range(11, 14)])
        assert [r.accepted for r in limited] == [True, False, False]  # burst 1, then refused
        assert node.cfg.quotas.default.frames_per_s == 0.001
        assert binding.applied["rate_limit"] == 2
        assert binding.on_force_rekey(ForceRekey("relayer-1", 2)) is Outcome.IGNORED
        assert binding.on_slash(SlashNotice("x", "r", b"")) is Outcome.IGNORED
    finally:
        await pub.close()
        await node.stop()
