"""The slashing indexer on a real QS-DAG: equivocation and volume mismatches become
proposals, each once, and governance can turn one into a verifiable directive."""

from __future__ import annotations

from pathlib import Path

import pytest

from pqcnet.mesh.directives import GovernancePolicy, SignedDirective, SlashNotice
from pqcnet.mesh.messages import RelayReport
from pqcnet.mesh.slashing import SlashingIndexer, to_directive
from pqcnet.qsdag import Ledger, OpaqueRecord, VertexKind
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
