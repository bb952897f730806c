"""The file backend behind the KeyStore interface, and the ``key_store:`` config seam.

Existing key files (written before key stores existed) must keep loading, through
the old functions and through the interface alike; every config mistake is one
KeyStoreError line naming the key.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pqcnet.crypto.pqc import SigningKey
from pqcnet.identity import NodeIdentity, dev_identities
from pqcnet.identity.errors import IdentityError, KeyStoreError
from pqcnet.identity.hsm import Pkcs11KeyStore
from pqcnet.identity.keyconfig import (
    CustodianConfig,
    key_store_config,
    open_key_store,
    read_key_store_file,
)
from pqcnet.identity.keystore import (
    FileKeyStore,
    KeyStore,
    key_from_seed,
    key_seed,
    write_private_key,
)
from pqcnet.identity.shamir import ShamirKeyStore


def test_existing_key_files_load_through_the_interface(tmp_path: Path) -> None:
    _, (node,) = dev_identities("mesh.test", "spiffe://mesh.test/acme/relayer/r1")
    node.save(tmp_path / "id", b"pw")  # the pre-key-store writer
    store = open_key_store(key_store_config(None, default_dir=tmp_path / "id"),
                           environ={"PQCNET_NODE_PASSPHRASE": "pw"})
    assert isinstance(store, FileKeyStore) and isinstance(store, KeyStore)
    back = NodeIdentity.load(tmp_path / "id", key_store=store)
    assert back.key.public_key == node.key.public_key
    assert NodeIdentity.load(tmp_path / "id", b"pw").key.public_key == node.key.public_key
    with pytest.raises(IdentityError, match="wrong passphrase"):
        FileKeyStore(tmp_path / "id" / "key.pem", b"nope").load()


def test_file_store_round_trip_and_describe(tmp_path: Path) -> None:
    key = SigningKey.generate()
    store = FileKeyStore(tmp_path / "k.pem", None)
    store.store(key)
    assert store.load().public_key == key.public_key
    assert "unencrypted" in store.describe()
    write_private_key(tmp_path / "e.pem", key, b"x")
    assert FileKeyStore(tmp_path / "e.pem", b"x").load().key_id == key.key_id
    assert len(key_seed(key)) == 32


def test_seed_buffer_is_zeroised_after_expanding(tmp_path: Path) -> None:
    key = SigningKey.generate()
    seed = bytearray(key_seed(key))
    assert key_from_seed(seed, key.algorithm).key_id == key.key_id
    assert seed == bytearray(32)
    bad = bytearray(b"\x01" * 31)
    with pytest.raises(KeyStoreError, match="cannot rebuild"):
        key_from_seed(bad, "ML-DSA-65")
    assert bad == bytearray(31)  # wiped even when the key could not be built


def test_config_defaults_and_relative_paths(tmp_path: Path) -> None:
    cfg = key_store_config(None, default_dir=tmp_path)
    assert cfg.kind == "file" and cfg.key_path == tmp_path / "key.pem"
    cfg = key_store_config({"kind": "pkcs11", "token_label": "t", "wrapped_key_file": "w.json"},
                           base_dir=tmp_path / "conf", default_dir=tmp_path / "id")
    assert cfg.wrapped_path == tmp_path / "conf" / "w.json"
    assert cfg.pin_env == "PQCNET_PKCS11_PIN" and cfg.kek_label == "pqcnet-kek"
    cfg = key_store_config({"kind": "shamir", "share_files": ["a.json"],
                            "custodians": [{"address": "127.0.0.1:7001",
                                            "spiffe_id": "spiffe://td/ops/custodian/c1"}],
                            "client_identity": "boot"}, base_dir=tmp_path)
    assert cfg.manifest_path == tmp_path / "key.shares.json"
    assert cfg.share_files == (tmp_path / "a.json",)
    assert cfg.custodians == (CustodianConfig("127.0.0.1:7001", "spiffe://td/ops/custodian/c1"),)
    assert cfg.custodians[0].host_port == ("127.0.0.1", 7001)
    # round trip through the mapping a CA directory records (absolute paths)
    back = key_store_config(cfg.to_mapping(), default_dir=tmp_path)
    assert back == dataclasses.replace(cfg, manifest=cfg.manifest_path)


@pytest.mark.parametrize(("mapping", "message"), [
    ({"kind": "vault"}, "kind must be one of"),
    ({"kind": "file", "token_label": "t"}, "token_label is not a field of kind file"),
    ({"kind": "file", "colour": "red"}, "colour is unknown"),
    ({"kind": "pkcs11"}, "token_label is required"),
    ({"kind": "pkcs11", "token_label": 3}, "token_label must be a string"),
    ({"kind": "shamir", "custodians": [{"address": "nohost", "spiffe_id": "spiffe://a/b/c/d"}],
      "client_identity": "x"}, "address must be host:port"),
    ({"kind": "shamir", "custodians": [{"address": "h:1", "spiffe_id": "spiffe://a/b/c/d"}]},
     "client_identity is required"),
    ({"kind": "shamir", "custodians": [{"address": "h:1"}]}, "exactly address and spiffe_id"),
    ({"kind": "shamir", "shares": 3, "threshold": 4}, "threshold must be 2..3"),
    ({"kind": "shamir", "timeout_s": 0}, "timeout_s must be positive"),
    ({"kind": "shamir", "client_key_store": {"kind": "shamir"}}, "cannot itself be shamir"),
    ({"kind": "shamir", "share_files": "a.json"}, "share_files must be a list"),
    ({"kind": "shamir", "shares": 2.5, "threshold": 2}, "shares must be an integer"),
    ({"kind": "shamir", "timeout_s": "soon"}, "timeout_s must be a number"),
])
def test_config_mistakes_name_the_key(mapping: dict[str, object], message: str) -> None:
    with pytest.raises(KeyStoreError, match=message):
        key_store_config(mapping)


def test_config_file_and_secrets(tmp_path: Path) -> None:
    path = tmp_path / "ks.yaml"
    path.write_text("key_store:\n  kind: pkcs11\n  token_label: tok\n  pin_env: MY_PIN\n")
    cfg = read_key_store_file(path, default_dir=tmp_path / "id")
    with pytest.raises(KeyStoreError, match=r"PIN missing: set \$MY_PIN"):
        open_key_store(cfg, environ={})
    store = open_key_store(cfg, environ={"MY_PIN": "1234"})
    assert isinstance(store, Pkcs11KeyStore) and store.wrapped_path == tmp_path / "id/key.wrapped"
    path.write_text("- not a mapping\n")
    with pytest.raises(KeyStoreError, match="must be a mapping"):
        read_key_store_file(path)
    shamir = key_store_config({"kind": "shamir", "custodians": [
        {"address": "h:1", "spiffe_id": "spiffe://a/b/c/d"}], "client_identity": "x"})
    with pytest.raises(KeyStoreError, match=r"pqcnet.runtime.shares.open_key_store"):
        open_key_store(shamir)
    assert isinstance(open_key_store(key_store_config({"kind": "shamir"})), ShamirKeyStore)
