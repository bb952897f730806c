"""Agents on the embedded in-process transport: formation, directives, slashing, gossip, DTN."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pqcnet.mesh.directives import (
    Directive,
    ForceRekey,
    RateLimitUpdate,
    SlashNotice,
    sign_directive,
)
from pqcnet.mesh.envelope import EnvelopeSigner, MessageType, NodeKeys
from pqcnet.mesh.messages import GossipItem, RouteEntry
from pqcnet.mesh.transport import TOPICS, InProcessHub, InProcessTransport

from .harness import (
    GOV,
    Recorder,
    attach_ledgers,
    bootstrap_ledgers,
    make_agents,
    node_key,
    stop_all,
    until,
)

pytestmark = pytest.mark.timeout(60)


def _net(n: int) -> tuple[InProcessHub, list[InProcessTransport]]:
    hub = InProcessHub()
    return hub, [InProcessTransport(hub) for _ in range(n)]


async def test_formation_routes_and_liveness(tmp_path: Path) -> None:
    _, ts = _net(3)
    a, b, c = agents = make_agents(["gov", "sentry-1", "relayer-1"], ts, tmp_path)
    try:
        for x in agents:
            await x.start()
        await until(lambda: all(len(x.peers.live(x.clock())) == 2 for x in agents), what="mesh")
        await c.advertise_routes([RouteEntry("orders", 3, "relayer-1")])
        await until(lambda: b.routes.lookup("orders") is not None, what="route")
        assert b.routes.lookup("orders").shard == 3  # type: ignore[union-attr]
        # relayer-1 goes silent: it expires from the others' live set
        ts[2].online = False
        await until(lambda: not a.peers.is_live("relayer-1", a.clock()), what="expiry")
        ts[2].online = True
        await until(lambda: a.peers.is_live("relayer-1", a.clock()), what="return")
    finally:
        await stop_all(agents)


async def test_directive_reaches_handlers_once_and_forgeries_are_dropped(tmp_path: Path) -> None:
    _, ts = _net(3)
    names = ["gov", "sentry-1", "relayer-1"]
    gov, sentry, relayer = agents = make_agents(names, ts, tmp_path)
    attach_ledgers(agents, bootstrap_ledgers(names, tmp_path))
    rec_s, rec_r = Recorder(), Recorder()
    sentry.handlers.append(rec_s)
    relayer.handlers.append(rec_r)
    try:
        for x in agents:
            await x.start()
        d = sign_directive(Directive.create(RateLimitUpdate("*", 2.0, 4), now_ms=gov.clock()),
                           GOV)
        await gov.issue_directive(d)
        await until(lambda: rec_s.limits and rec_r.limits, what="directive")
        assert rec_s.limits == [RateLimitUpdate("*", 2.0, 4)]
        # the same directive again (new envelope) is applied only once
        await gov.issue_directive(d)
        # a directive signed by a non-governance key is refused
        forged = sign_directive(Directive.create(RateLimitUpdate("*", 1e6, 10**6),
                                                 now_ms=gov.clock()), node_key("gov"))
        await gov.publisher.publish(TOPICS["governance"], MessageType.GOVERNANCE_DIRECTIVE,
                                     forged.encode())
        await until(lambda: sentry.events["directive_rejected"] >= 1, what="forgery refused")
        # replaying a captured wire message is dropped by the replay window
        wire = gov.signer.wire(MessageType.GOVERNANCE_DIRECTIVE, d.encode(), now_ms=gov.clock())
        await ts[0].publish(TOPICS["governance"], wire)
        await ts[0].publish(TOPICS["governance"], wire)
        await until(lambda: sentry.drops["replay"] >= 1, what="replay drop")
        assert len(rec_s.limits) == 1 and len(rec_r.limits) == 1
    finally:
        await stop_all(agents)


async def test_slashed_node_is_ignored_everywhere(tmp_path: Path) -> None:
    _, ts = _net(3)
    names = ["gov", "sentry-1", "mallory"]
    gov, sentry, mallory = agents = make_agents(names, ts, tmp_path)
    attach_ledgers(agents, bootstrap_ledgers(names, tmp_path))
    seen: list[GossipItem] = []
    sentry.gossip_listeners.append(lambda item, sender: seen.append(item))
    try:
        for x in agents:
            await x.start()
        await until(lambda: sentry.peers.is_live("mallory", sentry.clock()), what="mallory up")
        await mallory.advertise_routes([RouteEntry("orders", 1, "mallory")])
        await until(lambda: sentry.routes.lookup("orders") is not None, what="route")
        slash = sign_directive(Directive.create(SlashNotice("mallory", "equivocation"),
                                                now_ms=gov.clock()), GOV)
        await gov.issue_directive(slash)
        await until(lambda: sentry.keyring.is_revoked("mallory"), what="slash applied")
        assert sentry.routes.lookup("orders") is None
        before = sentry.drops["revoked"]
        await mallory.gossip("anomaly", b"trust me", destination="sentry-1")
        await mallory.announce()
        await until(lambda: sentry.drops["revoked"] >= before + 1, what="revoked drops")
        assert seen == [] and not sentry.peers.is_live("mallory", sentry.clock())
    finally:
        await stop_all(agents)


async def test_gossip_fanout_and_dtn_store_and_forward(tmp_path: Path) -> None:
    _, ts = _net(4)
    agents = make_agents(["n0", "n1", "n2", "n3"], ts, tmp_path)
    got: dict[str, list[bytes]] = {x.node_id: [] for x in agents}
    for x in agents:
        x.gossip_listeners.append(lambda item, sender, n=x.node_id: got[n].append(item.payload))
    try:
        for x in agents:
            await x.start()
        await until(lambda: all(len(x.peers.live(x.clock())) == 3 for x in agents), what="mesh")
        # n3 goes offline; once the others see it expired, n0 broadcasts two items
        ts[3].online = False
        await until(lambda: not agents[0].peers.is_live("n3", agents[0].clock()), what="n3 down")
        await agents[0].gossip("revocation", b"carol", ttl_ms=60_000)
        await agents[0].gossip("crl", b"short-lived", ttl_ms=200)
        await until(lambda: all(b"carol" in got[n] for n in ("n1", "n2")), what="gossip")
        assert got["n3"] == []
        assert len(agents[0].bundles or []) >= 1
        # each node delivers each item exactly once despite forwarding
        assert got["n1"].count(b"carol") == 1 and got["n2"].count(b"carol") == 1
        await asyncio.sleep(0.3)            # the short-lived item expires while n3 is away
        ts[3].online = True
        await until(lambda: b"carol" in got["n3"], what="bundle delivered after reconnect")
        await asyncio.sleep(0.3)
        assert b"short-lived" not in got["n3"]
        # a peer's revocation gossip is advisory: delivered and counted, never applied
        assert agents[3].keyring.is_revoked("carol") is False
        assert agents[3].events["advisory_revocation"] == 1
        assert got["n3"].count(b"carol") == 1
    finally:
        await stop_all(agents)


async def test_forced_rekey_rolls_the_key_over(tmp_path: Path) -> None:
    _, ts = _net(2)
    names = ["gov", "sentry-1"]
    gov, sentry = agents = make_agents(names, ts, tmp_path)
    attach_ledgers(agents, bootstrap_ledgers(names, tmp_path))
    rec = Recorder()
    sentry.handlers.append(rec)
    try:
        for x in agents:
            await x.start()
        await until(lambda: gov.peers.is_live("sentry-1", gov.clock()), what="up")
        old_key = sentry.keys.signing_key
        d = sign_directive(Directive.create(ForceRekey("sentry-1", 2), now_ms=gov.clock()), GOV)
        await gov.issue_directive(d)
        await until(lambda: gov.keyring.current_version("sentry-1") == 2, what="rollover")
        assert sentry.keys.key_version == 2 and sentry.keys.signing_key is not old_key
        assert rec.rekeys == [ForceRekey("sentry-1", 2)]
        await until(lambda: gov.peers.get("sentry-1").announcement.key_version == 2,  # type: ignore[union-attr]
                    what="announce v2")
        # a message still signed with the retired v1 key is refused
        stale = EnvelopeSigner(NodeKeys("sentry-1", old_key, 1)).wire(
            MessageType.DAG_TIPS, b"", now_ms=gov.clock())
        before = gov.drops["revoked"]
        await ts[1].publish(TOPICS["dagsync"], stale)
        await until(lambda: gov.drops["revoked"] == before + 1, what="v1 refused")
    finally:
        await stop_all(agents)
