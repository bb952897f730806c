"""Envelope sign/seal/verify: every way a control message can be bad is dropped and counted."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pqcnet.crypto.pqc import RecipientKey, SigningKey
from pqcnet.mesh.envelope import (
    EnvelopeSigner,
    EnvelopeVerifier,
    Keyring,
    MessageType,
    NodeKeys,
    VerifierConfig,
)
from pqcnet.mesh.errors import EnvelopeRejected
from pqcnet.proto import mesh_pb2

NOW = 1_700_000_000_000


@pytest.fixture(scope="module")
def alice() -> NodeKeys:
    return NodeKeys("alice", SigningKey.from_seed(b"a" * 32))


@pytest.fixture(scope="module")
def bob() -> NodeKeys:
    return NodeKeys("bob", SigningKey.from_seed(b"b" * 32))


def _verifier(*nodes: NodeKeys, recipients: list[RecipientKey] | None = None,
              config: VerifierConfig | None = None) -> EnvelopeVerifier:
    ring = Keyring()
    for n in nodes:
        ring.add(n.node_id, n.signing_key.public_key, n.key_version)
    return EnvelopeVerifier(ring, recipients, config)


def test_plain_roundtrip(alice: NodeKeys) -> None:
    v = _verifier(alice)
    wire = EnvelopeSigner(alice).wire(MessageType.NODE_ANNOUNCEMENT, b"hello", now_ms=NOW)
    msg = v.open(wire, NOW + 5)
    assert (msg.sender, msg.body, msg.type, msg.sealed) == (
        "alice", b"hello", MessageType.NODE_ANNOUNCEMENT, False)
    assert v.accepted["node_announcement"] == 1


def test_sealed_roundtrip_hides_body(alice: NodeKeys, bob: NodeKeys) -> None:
    v = _verifier(alice, recipients=[bob.recipient_key])
    secret = b"rate limit for tenant-7 is now 3/s"
    wire = EnvelopeSigner(alice).wire(MessageType.GOSSIP, secret, now_ms=NOW,
                                      to=bob.recipient_key.public)
    assert secret not in wire and b"alice" not in wire
    msg = v.open(wire, NOW)
    assert msg.body == secret and msg.sealed


def test_sealed_to_someone_else_is_not_for_us(alice: NodeKeys, bob: NodeKeys) -> None:
    v = _verifier(alice, recipients=[RecipientKey.generate()])
    wire = EnvelopeSigner(alice).wire(MessageType.GOSSIP, b"x", now_ms=NOW,
                                      to=bob.recipient_key.public)
    assert v.accept(wire, NOW) is None
    assert v.drops == {"not_for_us": 1}


def test_forged_and_tampered_are_dropped(alice: NodeKeys, bob: NodeKeys) -> None:
    v = _verifier(alice, bob)
    # bob signs but claims to be alice
    forged = NodeKeys("alice", bob.signing_key)
    assert v.accept(EnvelopeSigner(forged).wire(MessageType.GOSSIP, b"x", now_ms=NOW), NOW) is None
    # body changed after signing
    wire = mesh_pb2.WireMessage.FromString(
        EnvelopeSigner(alice).wire(MessageType.ROUTE_ADVERTISEMENT, b"ok", now_ms=NOW))
    env = mesh_pb2.ControlEnvelope.FromString(wire.signed.envelope)
    env.body = b"evil"
    wire.signed.envelope = env.SerializeToString()
    assert v.accept(wire.SerializeToString(), NOW) is None
    # signature stripped
    wire.signed.signature = b""
    assert v.accept(wire.SerializeToString(), NOW) is None
    assert v.drops == {"bad_signature": 3}
    assert sum(v.accepted.values()) == 0


def test_replay_and_window(alice: NodeKeys) -> None:
    v = _verifier(alice, config=VerifierConfig(replay_window=8))
    signer = EnvelopeSigner(alice, start_counter=100)
    first = signer.wire(MessageType.DAG_TIPS, b"1", now_ms=NOW)
    old = [signer.wire(MessageType.DAG_TIPS, b"n", now_ms=NOW) for _ in range(20)]
    assert v.accept(old[-1], NOW) is not None      # counter 121
    assert v.accept(old[-1], NOW) is None          # replay
    assert v.accept(old[-3], NOW) is not None      # out of order inside the window
    assert v.accept(old[-3], NOW) is None          # replay of that one
    assert v.accept(first, NOW) is None            # counter 101: far below the window
    assert v.drops == {"replay": 3}


def test_stale_and_future_timestamps(alice: NodeKeys) -> None:
    v = _verifier(alice, config=VerifierConfig(max_skew_ms=1000))
    signer = EnvelopeSigner(alice)
    assert v.accept(signer.wire(MessageType.DAG_TIPS, b"", now_ms=NOW - 5000), NOW) is None
    assert v.accept(signer.wire(MessageType.DAG_TIPS, b"", now_ms=NOW + 5000), NOW) is None
    assert v.accept(signer.wire(MessageType.DAG_TIPS, b"", now_ms=NOW - 900), NOW) is not None
    assert v.drops == {"stale": 2}


def test_unknown_revoked_and_retired(alice: NodeKeys, bob: NodeKeys) -> None:
    v = _verifier(alice)
    assert v.accept(EnvelopeSigner(bob).wire(MessageType.GOSSIP, b"", now_ms=NOW), NOW) is None
    v.keyring.revoke("alice", "slashed")
    assert v.accept(EnvelopeSigner(alice).wire(MessageType.GOSSIP, b"", now_ms=NOW), NOW) is None
    v.keyring.readmit("alice")
    v.keyring.add("alice", bob.signing_key.public_key, 2)
    v.keyring.retire_below("alice", 2)
    assert v.accept(EnvelopeSigner(alice).wire(MessageType.DAG_TIPS, b"", now_ms=NOW), NOW) is None
    rekeyed = EnvelopeSigner(NodeKeys("alice", bob.signing_key, 2))
    assert v.accept(rekeyed.wire(MessageType.DAG_TIPS, b"", now_ms=NOW), NOW) is not None
    assert v.drops == {"unknown_sender": 1, "revoked": 2}


def test_gossip_dedup_by_message_id(alice: NodeKeys, bob: NodeKeys) -> None:
    from pqcnet.mesh.envelope import wrap

    v = _verifier(alice, recipients=[bob.recipient_key])
    signer = EnvelopeSigner(alice)
    signed = signer.sign(MessageType.GOSSIP, b"revoke carol", now_ms=NOW)
    m1 = v.open(wrap(signed, to=None, hops=3), NOW)
    # the same gossip arriving hours later, re-sealed by a forwarder: still a duplicate
    assert v.accept(wrap(signed, to=None, hops=2), NOW + 3_600_000) is None
    assert m1.hops_left == 3
    assert v.drops == {"duplicate": 1}


def test_oversized_and_garbage(alice: NodeKeys) -> None:
    v = _verifier(alice, config=VerifierConfig(max_wire_bytes=64))
    wire = EnvelopeSigner(alice).wire(MessageType.GOSSIP, b"x" * 100, now_ms=NOW)
    assert v.accept(wire, NOW) is None
    assert v.accept(b"\xff\xff\xff", NOW) is None
    assert v.drops["malformed"] == 2


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_never_escape_as_untyped(data: bytes) -> None:
    v = _verifier()
    try:
        v.open(data, NOW)
    except EnvelopeRejected as exc:
        assert exc.reason in {"malformed", "bad_signature", "not_for_us", "unknown_sender"}
