"""``pqcnet mesh ...``: the control plane from the command line.

``keygen`` writes an ML-DSA key; ``announce`` publishes a node announcement;
``directive`` signs and publishes a governance directive; ``listen`` / ``peers``
watch a Waku node's control topics. Their output is *verified only*: a message is
shown (and a peer listed) only if its envelope verifies under a key given with
``--trust NODE=PEM`` (signature, key version, freshness). ``--unverified`` adds the
rest, each labelled ``"verified": false`` with the reason it would be dropped —
never mixed up with verified ones. ``demo`` runs a three-node mesh on the
in-process transport (no services needed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import click

from pqcnet.crypto.pqc import SigningKey, VerifyKey
from pqcnet.mesh.directives import (
    Directive,
    ForceRekey,
    RateLimitUpdate,
    SlashNotice,
    sign_directive,
)
from pqcnet.mesh.envelope import (
    EnvelopeSigner,
    EnvelopeVerifier,
    Keyring,
    MessageType,
    NodeKeys,
    now_ms,
)
from pqcnet.mesh.errors import ConfigError, EnvelopeRejected, WakuError
from pqcnet.mesh.messages import Announcement
from pqcnet.mesh.transport import topic_map
from pqcnet.mesh.waku import WakuClientConfig, WakuRestClient
from pqcnet.proto import mesh_pb2


def _load_key(path: str) -> SigningKey:
    try:
        return SigningKey.from_pem(Path(path).read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read key {path}: {exc.strerror}") from None


_waku = click.option("--waku", "waku_url", required=True, envvar="PQCNET_WAKU_REST_URL",
                     help="REST base URL of an nwaku / go-waku node.")
_ns = click.option("--namespace", default="", show_default=True,
                   help="Content-topic namespace of the mesh.")


@click.group()
def cli() -> None:
    """Control plane over Waku: announcements, directives, observation."""


@cli.command()
@click.argument("path", type=click.Path(dir_okay=False))
def keygen(path: str) -> None:
    """Write a fresh ML-DSA-65 signing key (PKCS#8 PEM) to PATH; print its key id."""
    from pqcnet.identity.keystore import atomic_write

    key = SigningKey.generate()
    atomic_write(Path(path), key.to_pem(), mode=0o600)  # never world-readable, dirs made
    click.echo(json.dumps({"path": path, "key_id": key.key_id.hex(),
                           "algorithm": key.algorithm}))


@cli.command()
@_waku
@_ns
@click.option("--node-id", required=True)
@click.option("--key", "key_path", required=True, help="PEM signing key of the node.")
@click.option("--role", default="node", show_default=True)
def announce(waku_url: str, namespace: str, node_id: str, key_path: str, role: str) -> None:
    """Publish one NodeAnnouncement for NODE_ID."""
    keys = NodeKeys(node_id, _load_key(key_path))
    ann = Announcement(node_id, role, key_version=1, seal_key=keys.recipient_key.public)
    wire = EnvelopeSigner(keys).wire(MessageType.NODE_ANNOUNCEMENT, ann.encode(),
                                     now_ms=now_ms())
    asyncio.run(_publish(waku_url, topic_map(namespace)["announce"], wire))
    click.echo(json.dumps({"published": "announce", "node_id": node_id, "bytes": len(wire)}))


async def _publish(url: str, topic: str, wire: bytes) -> None:
    client = WakuRestClient(WakuClientConfig(url))
    try:
        await client.publish(topic, wire)
    finally:
        await client.aclose()


@cli.command()
@_waku
@_ns
@click.option("--issuer", default="governance", show_default=True,
              help="Node id the envelope is sent as.")
@click.option("--key", "key_paths", multiple=True, required=True,
              help="Governance key PEM (repeat for a threshold).")
@click.option("--rate", type=float, help="Rate-limit update: requests per second.")
@click.option("--burst", type=int, default=10, show_default=True)
@click.option("--scope", default="*", show_default=True)
@click.option("--rekey", "rekey_target", help="Force NODE to rotate its key.")
@click.option("--min-version", type=int, default=0)
@click.option("--slash", "slash_target", help="Slash NODE.")
@click.option("--reason", default="governance decision", show_default=True)
@click.option("--ttl", type=int, default=3600, show_default=True, help="Seconds valid.")
def directive(waku_url: str, namespace: str, issuer: str, key_paths: tuple[str, ...],
              rate: float | None, burst: int, scope: str, rekey_target: str | None,
              min_version: int, slash_target: str | None, reason: str, ttl: int) -> None:
    """Sign a governance directive with the given keys and publish it."""
    chosen = [x for x in (rate, rekey_target, slash_target) if x is not None]
    if len(chosen) != 1:
        raise click.UsageError("give exactly one of --rate, --rekey, --slash")
    action: RateLimitUpdate | ForceRekey | SlashNotice
    if rate is not None:
        action = RateLimitUpdate(scope, rate, burst)
    elif rekey_target is not None:
        action = ForceRekey(rekey_target, min_version)
    else:
        action = SlashNotice(str(slash_target), reason)
    keys = [_load_key(p) for p in key_paths]
    signed = sign_directive(Directive.create(action, now_ms=now_ms(), ttl_ms=ttl * 1000), *keys)
    wire = EnvelopeSigner(NodeKeys(issuer, keys[0])).wire(
        MessageType.GOVERNANCE_DIRECTIVE, signed.encode(), now_ms=now_ms())
    asyncio.run(_publish(waku_url, topic_map(namespace)["governance"], wire))
    click.echo(json.dumps({"published": "directive", "action": signed.directive.action_name,
                           "id": signed.directive.directive_id.hex(),
                           "signatures": len(signed.signatures)}))


def _load_trust(specs: tuple[str, ...]) -> Keyring:
    """``NODE[@VERSION]=PEM`` (a public key PEM, or a signing key from ``keygen``)."""
    ring = Keyring()
    for spec in specs:
        who, sep, path = spec.partition("=")
        node, _, version = who.partition("@")
        if not sep or not node or not path or (version and not version.isdigit()):
            raise click.BadParameter(f"expected NODE[@VERSION]=PEM, got {spec!r}",
                                     param_hint="--trust")
        try:
            pem = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read key {path}: {exc.strerror}") from None
        key = VerifyKey.from_pem(pem, private_ok=True)
        ring.add(node, key, int(version or 1))
    return ring


def _describe(payload: bytes, verifier: EnvelopeVerifier) -> dict[str, object]:
    """One wire message: decoded fields plus whether it verifies under the trusted keys."""
    try:
        msg = mesh_pb2.WireMessage.FromString(payload)
        if msg.WhichOneof("content") == "sealed":
            return {"verified": False, "reason": "sealed to another recipient",
                    "sealed_to": msg.sealed.recipient.hex()[:16], "bytes": len(payload)}
        env = mesh_pb2.ControlEnvelope.FromString(msg.signed.envelope)
        out: dict[str, object] = {
            "type": mesh_pb2.MessageType.Name(env.type), "sender": env.sender,
            "counter": env.counter, "timestamp_ms": env.timestamp_ms,
            "key_version": env.key_version, "bytes": len(payload)}
        if int(env.type) == MessageType.NODE_ANNOUNCEMENT.value:
            out["role"] = Announcement.decode(env.body).role
    except Exception as exc:  # observer output: report, never crash
        return {"verified": False, "reason": f"undecodable ({type(exc).__name__})",
                "bytes": len(payload)}
    try:
        verifier.open(payload, now_ms())
    except EnvelopeRejected as exc:
        return {"verified": False, "reason": exc.reason, **out}
    return {"verified": True, **out}


async def _observe(url: str, topics: list[str], seconds: float, trust: Keyring,
                   show_unverified: bool, *, echo: bool = True) -> list[dict[str, object]]:
    client = WakuRestClient(WakuClientConfig(url))
    verifier = EnvelopeVerifier(trust)
    seen: list[dict[str, object]] = []
    try:
        await client.subscribe(topics)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for t in topics:
                for m in await client.messages(t):
                    d = _describe(m.payload, verifier)
                    d["topic"] = t
                    seen.append(d)
                    if echo and (d["verified"] or show_unverified):
                        click.echo(json.dumps(d))
            await asyncio.sleep(0.1)
        with contextlib.suppress(WakuError):
            await client.unsubscribe(topics)
    finally:
        await client.aclose()
    return seen


_trust = click.option("--trust", "trust", multiple=True, metavar="NODE[@VERSION]=PEM",
                      help="Key a sender must verify under (repeat per node).")
_unverified = click.option("--unverified", is_flag=True,
                           help="Also show messages that do not verify, labelled as such.")


@cli.command()
@_waku
@_ns
@_trust
@_unverified
@click.option("--seconds", type=float, default=10.0, show_default=True)
def listen(waku_url: str, namespace: str, trust: tuple[str, ...], unverified: bool,
           seconds: float) -> None:
    """Print verified control messages on the standard topics for SECONDS (JSON lines)."""
    asyncio.run(_observe(waku_url, list(topic_map(namespace).values()), seconds,
                         _load_trust(trust), unverified))


@cli.command()
@_waku
@_ns
@_trust
@_unverified
@click.option("--seconds", type=float, default=12.0, show_default=True)
def peers(waku_url: str, namespace: str, trust: tuple[str, ...], unverified: bool,
          seconds: float) -> None:
    """Collect announcements for SECONDS, then print the verified peer table."""
    seen = asyncio.run(_observe(waku_url, [topic_map(namespace)["announce"]], seconds,
                                _load_trust(trust), False, echo=False))
    table: dict[str, dict[str, object]] = {}
    other: dict[str, dict[str, object]] = {}
    for d in seen:
        if "sender" not in d:
            continue
        entry = {"role": d.get("role"), "key_version": d["key_version"],
                 "last_seen_ms": d["timestamp_ms"]}
        if d["verified"]:
            table[str(d["sender"])] = entry
        else:
            other[str(d["sender"])] = {**entry, "reason": d["reason"]}
    out: dict[str, object] = {"peers": table}
    if unverified:
        out["unverified"] = other
    click.echo(json.dumps(out, indent=2))


@cli.command()
def demo() -> None:
    """Three nodes on the in-process transport: a directive, gossip and a DTN bundle."""
    from pqcnet.cli._mesh_demo import run_demo

    click.echo(json.dumps(asyncio.run(run_demo()), indent=2))
