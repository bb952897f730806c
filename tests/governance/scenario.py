"""One governance scenario with real components, run over any control-plane transport.

Four mesh agents — ``gov``, ``sentry-1``, ``relayer-1``, ``rogue-1`` — each with its own
QS-DAG (RocksDB) kept in sync over the control plane. ``sentry-1`` is a real
:class:`~pqcnet.sentry.core.Sentry` behind a QSTP server owned by a
:class:`~pqcnet.runtime.governance.QstpEndpoint`, with real HTTP/gRPC/TCP backends; ``relayer-1``
is a real :class:`~pqcnet.relayer.node.RelayerNode` (embedded bus) whose ``TlsPolicy`` carries
a :class:`~pqcnet.qstp.tls.PeerGate`. Governance then issues, over the control plane:

(a) a lowered rate limit — live traffic through the sentry starts getting 429s;
(b) a forced rekey of the sentry — its tunnels are GOAWAYed, its new key version is
    in the QS-DAG, and a new tunnel presents a certificate on exactly that key;
(c) a slash of ``rogue-1`` — its open tunnel is closed, new handshakes to the sentry
    and the relayer are refused, its vertices and control messages are rejected.

A handler registered first checks that each directive is already anchored in the
receiving node's QS-DAG, in a vertex of that node's own, when consumers are called
(anchor before effect, on registrar and non-registrar nodes alike).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from pqcnet import qstp
from pqcnet.crypto.pqc import SigningKey
from pqcnet.errors import PqcnetError
from pqcnet.identity import MeshCA, NodeIdentity
from pqcnet.mesh.agent import AgentConfig
from pqcnet.mesh.directives import (
    Action,
    Directive,
    ForceRekey,
    Outcome,
    RateLimitUpdate,
    SlashNotice,
    sign_directive,
)
from pqcnet.mesh.qsdag_port import QsdagPort
from pqcnet.mesh.transport import Transport
from pqcnet.qsdag import Ledger, OpaqueRecord, VertexKind
from pqcnet.qsdag.errors import AuthorSlashed
from pqcnet.qstp.tls import PeerGate, TlsPolicy
from pqcnet.relayer.client import PublisherClient
from pqcnet.relayer.config import RelayerConfig
from pqcnet.relayer.node import RelayerNode
from pqcnet.runtime.governance import (
    GateDirectives,
    QstpEndpoint,
    SentryDirectives,
    peer_key,
    sentry_tunnel_handler,
)
from pqcnet.sentry.config import load_config
from pqcnet.sentry.core import Sentry
from pqcnet.sentry.limiter import Plan
from pqcnet.sentry.sidecar import Sidecar
from pqcnet.sentry.wire import RequestHead

from ..mesh.harness import GOV, anchored_by_itself, make_agents, node_key, stop_all, until
from ..sentry.harness import TD, HttpBackend, config_dict, grpc_backend, tcp_echo, write_config
from ..sentry.harness import Mesh as SentryMesh

NAMES = ["gov", "sentry-1", "relayer-1", "rogue-1"]
SPIFFE = {
    "gov": f"spiffe://{TD}/ops/governance/gov",
    "sentry-1": f"spiffe://{TD}/ops/sentry/sentry-1",
    "relayer-1": f"spiffe://{TD}/ops/relayer/relayer-1",
    "rogue-1": f"spiffe://{TD}/acme/sidecar/rogue-1",
    "client-1": f"spiffe://{TD}/acme/sidecar/client-1",
}
STATUS = RequestHead("http", "GET", "/status")


class AnchoredFirst:
    """DirectiveHandler registered before the real ones: fails the scenario if a
    directive reaches consumers before this node anchored it in its own QS-DAG."""

    def __init__(self, port: QsdagPort) -> None:
        self.port = port
        self.checked = 0
        self.unanchored: list[Action] = []

    def _check(self, action: Action) -> Outcome:
        if not anchored_by_itself(self.port, action):
            self.unanchored.append(action)
        self.checked += 1
        return Outcome.IGNORED

    def on_rate_limit(self, u: RateLimitUpdate) -> Outcome:
        return self._check(u)

    def on_force_rekey(self, r: ForceRekey) -> Outcome:
        return self._check(r)

    def on_slash(self, s: SlashNotice) -> Outcome:
        return self._check(s)


async def _status(sidecar: Sidecar) -> int:
    head, stream, _rest = await sidecar.call(STATUS, b"")
    with contextlib.suppress(PqcnetError):
        await stream.read_all(1 << 20)
    return head.status


async def directive_effects(transports: list[Transport], tmp: Path, *,
                            config: AgentConfig, limit_s: float = 30.0) -> None:
    ca = MeshCA.create(TD)
    ids: dict[str, NodeIdentity] = {
        n: ca.issue(SPIFFE[n], key=node_key(n) if n in NAMES else None) for n in SPIFFE}
    ledgers = [Ledger.open(tmp / f"ledger-{n}") for n in NAMES]
    ledgers[0].init_genesis("pqcnet-gov-test", "gov", node_key("gov"))
    for n in NAMES[1:]:
        ledgers[0].register_author(n, node_key(n).public_key, registrar="gov",
                                   signer=node_key("gov"))
    agents = make_agents(NAMES, transports, tmp, config=config)
    gov, s_agent, r_agent, rogue = agents
    ports = []
    for a, led in zip(agents, ledgers):
        a.ledger = port = QsdagPort(led, a.keys)
        ports.append(port)
    checks = [AnchoredFirst(p) for p in ports]
    for a, c in zip(agents, checks):
        a.handlers.append(c)

    smesh = SentryMesh(ids["sentry-1"], ids["client-1"], ids["rogue-1"], ids["rogue-1"],
                       SigningKey.from_seed(b"\x01" * 32), SigningKey.from_seed(b"\x02" * 32))
    relayer_gate = PeerGate()
    relayer = RelayerNode(RelayerConfig(node_id="relayer-1", listen_port=0, shards=4,
                                        data_dir=str(tmp / "relayer")),
                          ids["relayer-1"], TlsPolicy(gate=relayer_gate))
    r_agent.handlers.append(GateDirectives(relayer_gate, "relayer-1"))
    endpoint: QstpEndpoint | None = None
    sidecar: Sidecar | None = None
    with HttpBackend() as http:
        async with grpc_backend() as (_servicer, gport), tcp_echo() as tport:
            path = write_config(tmp, smesh, config_dict(http.port, gport, tport))
            sentry = Sentry(load_config(path))
            s_directives = SentryDirectives(sentry)
            endpoint = QstpEndpoint(ids["sentry-1"], s_agent.keys,
                                    lambda sid, key: ca.issue(sid, key=key),
                                    handler=sentry_tunnel_handler(sentry))
            s_agent.handlers += [s_directives, endpoint]
            try:
                port = await endpoint.serve()
                await relayer.start()
                for a in agents:
                    await a.start()
                await until(lambda: all(len(a.peers.live(a.clock())) == 3 for a in agents),
                            limit_s, "mesh formed")
                await until(lambda: all(set(p.ledger.ids()) == set(ports[0].ledger.ids())
                                        for p in ports), limit_s, "ledgers converged")

                async def dial() -> qstp.Tunnel:
                    return await qstp.connect("127.0.0.1", port, ids["client-1"])

                sidecar = Sidecar(dial, smesh.acme_issuer, subject="alice", tenant="acme")
                # ---------------------------------------------------------- (a) rate limit
                assert [await _status(sidecar) for _ in range(6)] == [200] * 6
                limit = sign_directive(Directive.create(RateLimitUpdate("acme", 0.2, 2),
                                                        now_ms=gov.clock()), GOV)
                await gov.issue_directive(limit)
                await until(lambda: s_directives.applied["rate_limit"] == 1
                            and limit.directive.directive_id in r_agent.applied,
                            limit_s, "rate limit reached sentry and relayer")
                assert sentry.limiter.plan_for("acme") == Plan(0.2, 2)
                after = [await _status(sidecar) for _ in range(8)]
                assert set(after) <= {200, 429} and after.count(429) >= 5, after
                # ---------------------------------------------------------- (b) forced rekey
                old_key = ids["sentry-1"].key.public_key.key_id
                old_tunnel = await qstp.connect("127.0.0.1", port, ids["client-1"])
                assert peer_key(old_tunnel).key_id == old_key
                rekey = sign_directive(Directive.create(ForceRekey("sentry-1", 2),
                                                        now_ms=gov.clock()), GOV)
                await gov.issue_directive(rekey)
                await until(lambda: endpoint is not None and endpoint.rekeys == 1, limit_s,
                            "sentry rekeyed")
                await until(lambda: old_tunnel.closed, limit_s, "old tunnel GOAWAYed")
                assert endpoint.key_version == s_agent.keys.key_version >= 2
                gov_ledger = ports[0].ledger
                await until(lambda: gov_ledger.views.key_versions.current("sentry-1")
                            == endpoint.key_version, limit_s, "new key version synced")
                recorded = gov_ledger.key_for("sentry-1", endpoint.key_version)
                assert recorded is not None and recorded.key_id != old_key
                new_tunnel = await qstp.connect("127.0.0.1", port, ids["client-1"])
                try:
                    assert peer_key(new_tunnel).key_id == recorded.key_id
                    assert not new_tunnel.peer.resumed
                finally:
                    await new_tunnel.close()
                # the sidecar notices its dead tunnel and re-dials the rekeyed sentry
                assert await _status(sidecar) in (200, 429)
                assert sidecar.tunnels_opened == 2
                # ---------------------------------------------------------- (c) slash
                rogue_tunnel = await qstp.connect("127.0.0.1", port, ids["rogue-1"])
                rogue_pub = await PublisherClient.connect("127.0.0.1", relayer.port,
                                                          ids["rogue-1"])
                await rogue_pub.close()
                slash = sign_directive(Directive.create(SlashNotice("rogue-1", "equivocation"),
                                                        now_ms=gov.clock()), GOV)
                await gov.issue_directive(slash)
                await until(lambda: endpoint is not None and endpoint.closed_for_slash == 1
                            and relayer_gate.reason_for(ids["rogue-1"].spiffe_id) is not None
                            and all(p.is_disabled("rogue-1") for p in ports[:3]),
                            limit_s, "slash applied on sentry and relayer")
                await until(lambda: rogue_tunnel.closed, limit_s, "rogue tunnel closed")
                with pytest.raises(PqcnetError):
                    t = await qstp.connect("127.0.0.1", port, ids["rogue-1"])
                    await t.close()
                with pytest.raises(PqcnetError):
                    p = await PublisherClient.connect("127.0.0.1", relayer.port, ids["rogue-1"])
                    await p.close()
                ok = await PublisherClient.connect("127.0.0.1", relayer.port, ids["client-1"])
                await ok.close()
                # its vertices are refused by every honest ledger ...
                rogue_id = ports[3].ledger.append(
                    VertexKind.PERFORMANCE_REPORT,
                    OpaqueRecord("pqcnet.relayer.PerformanceReport", "rogue-1", b"fake"),
                    "rogue-1", rogue.keys.signing_key).id
                blob = ports[3].ledger.get(rogue_id).encode()
                for p in ports[:3]:
                    assert p.import_vertices([blob]) == 0
                    assert not p.knows(rogue_id)
                # ... the registrar's qsdag slash notice reaches every honest ledger by
                # sync, and once the rogue's ledger holds it, qsdag itself refuses any
                # vertex of the rogue's (AuthorSlashed by DAG ancestry)
                await until(lambda: all(p.ledger.is_slashed("rogue-1") for p in ports[:3]),
                            limit_s, "ledger-level slash synced")
                ports[3].ledger.import_(ports[0].ledger.export(ports[0].ledger.tips()))
                assert ports[3].ledger.is_slashed("rogue-1")
                with pytest.raises(AuthorSlashed):
                    ports[3].ledger.append(
                        VertexKind.PERFORMANCE_REPORT,
                        OpaqueRecord("pqcnet.relayer.PerformanceReport", "rogue-1", b"2"),
                        "rogue-1", rogue.keys.signing_key)
                # ... and its control messages are dropped as from a revoked sender
                before = [a.drops["revoked"] for a in agents[:3]]
                await rogue.publish_tips()
                await until(lambda: all(a.drops["revoked"] > b
                                        for a, b in zip(agents[:3], before)),
                            limit_s, "rogue's messages dropped")
                # every consumer call came after the directive was anchored locally
                for c in checks[:3]:
                    assert c.checked >= 3 and not c.unanchored, (c.checked, c.unanchored)
            finally:
                if sidecar is not None:
                    await sidecar.aclose()
                await stop_all(agents)
                await endpoint.aclose()
                await relayer.stop()
                await sentry.aclose()
                for led in ledgers:
                    led.close()
