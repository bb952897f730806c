"""The rotated relayer identity on disk: encrypted like the original, whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from pqcnet.errors import PqcnetError
from pqcnet.identity import NodeIdentity, dev_identities
from pqcnet.identity.keystore import is_encrypted
from pqcnet.identity.node import KEY_FILE
from pqcnet.relayer.config import RelayerConfig
from pqcnet.relayer.node import load_identity, save_identity

TD = "pqcnet.test"
ENV = "H17_TEST_RELAYER_PASS"


def _two_ids() -> tuple[NodeIdentity, NodeIdentity]:
    _ca, (old, new) = dev_identities(TD, f"spiffe://{TD}/ops/relayer/r1",
                                     f"spiffe://{TD}/ops/relayer/r1")
    return old, new


def test_save_identity_encrypts_with_the_same_passphrase(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "s3cret")
    old, new = _two_ids()
    old.save(tmp_path / "id", b"s3cret")
    cfg = RelayerConfig(identity_dir=str(tmp_path / "id"), identity_passphrase_env=ENV)
    save_identity(cfg, new)
    assert is_encrypted(tmp_path / "id" / KEY_FILE)
    assert load_identity(cfg).key.public_key.key_id == new.key.public_key.key_id
    with pytest.raises(PqcnetError):
        NodeIdentity.load(tmp_path / "id", b"wrong")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["id"]  # no leftovers


def test_load_finishes_an_interrupted_swap(tmp_path: Path) -> None:
    _old, new = _two_ids()
    new.save(tmp_path / ".id.rekey", None)  # crash after the old dir was renamed away
    cfg = RelayerConfig(identity_dir=str(tmp_path / "id"))
    assert load_identity(cfg).key.public_key.key_id == new.key.public_key.key_id
    assert (tmp_path / "id").is_dir() and not (tmp_path / ".id.rekey").exists()
