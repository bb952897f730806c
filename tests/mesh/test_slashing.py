"""The slashing indexer on a real QS-DAG: equivocation and volume mismatches become
proposals, each once, and governance can turn one into a verifiable directive."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pqcnet.mesh.directives import GovernancePolicy, SignedDirective, SlashNotice
from pqcnet.mesh.messages import RelayReport
from pqcnet.mesh.slashing import SlashingIndexer, to_directive
from pqcnet.qsdag import Ledger, OpaqueRecord, VertexKind, build_attestation
from pqcnet.qsdag.errors import Equivocation
from pqcnet.qsdag.payloads import encode_payload
from pqcnet.qsdag.vertex import sign_vertex

from .harness import GOV, node_key


def test_equivocation_and_volume_mismatch_are_proposed_once(tmp_path: Path) -> None:
    gov, relayer = node_key("gov"), node_key("relayer-1")
    with Ledger.open(tmp_path / "l") as led:
        led.init_genesis("t", "gov", gov)
        led.register_author("relayer-1", relayer.public_key, registrar="gov", signer=gov)
        rec = OpaqueRecord("pqcnet.relayer.VolumeRecord", "relayer-1", b"bytes=100")
        first = led.append(VertexKind.VOLUME_PROOF, rec, "relayer-1", relayer)
        v1 = led.get(first.id)
        twin = sign_vertex(
            relayer, kind=VertexKind.VOLUME_PROOF, author="relayer-1", counter=v1.counter,
            timestamp_ms=v1.timestamp_ms, key_version=v1.key_version, parents=v1.parents,
            payload=encode_payload(OpaqueRecord(
                "pqcnet.relayer.VolumeRecord", "relayer-1", b"bytes=1")))
        with pytest.raises(Equivocation):
            led.verify_and_anchor(twin)
        idx = SlashingIndexer(led)
        found = idx.scan()
        assert [(p.target, p.kind) for p in found] == [("relayer-1", "equivocation")]
        assert idx.scan() == []                              # proposed once
        honest = RelayReport("volume_proof", b"bytes=100", first.id)
        assert idx.check_report(honest, "relayer-1") == []
        lying = RelayReport("volume_proof", b"bytes=999999", first.id)
        [mismatch] = idx.check_report(lying, "relayer-1")
        assert mismatch.kind == "volume_mismatch" and mismatch.target == "relayer-1"
        signed = to_directive(found[0], GOV, now_ms=led.now_ms())
        d = GovernancePolicy([GOV.public_key]).verify(
            SignedDirective.decode(signed.encode()), led.now_ms())
        assert isinstance(d.action, SlashNotice) and d.action.target == "relayer-1"


def test_config_outside_policy_is_proposed_once_per_attestation(tmp_path: Path) -> None:
    """The indexer reads only what was anchored since its last scan (it runs on a timer),
    yet a node's new attestation is checked against the policy again."""
    gov, sentry = node_key("gov"), node_key("sentry-1")
    good = hashlib.sha3_256(b"good config").digest()
    with Ledger.open(tmp_path / "l") as led:
        led.init_genesis("t", "gov", gov)
        led.register_author("sentry-1", sentry.public_key, registrar="gov", signer=gov)
        idx = SlashingIndexer(led, allowed_config_hashes=frozenset({good}))
        led.append(VertexKind.ATTESTATION,
                   build_attestation("sentry-1", "sentry", sentry, 1, b"good config"),
                   "sentry-1", sentry)
        assert idx.scan() == []
        bad = led.append(VertexKind.ATTESTATION,
                         build_attestation("sentry-1", "sentry", sentry, 2, b"tampered"),
                         "sentry-1", sentry).id
        [found] = idx.scan()
        assert (found.target, found.kind, found.evidence) == ("sentry-1", "measurement", (bad,))
        assert idx.scan() == []
        led.append(VertexKind.ATTESTATION,
                   build_attestation("sentry-1", "sentry", sentry, 3, b"tampered again"),
                   "sentry-1", sentry)
        assert [p.kind for p in idx.scan()] == ["measurement"]
