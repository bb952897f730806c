"""Shamir k-of-n custody: any k shares rebuild the key, k-1 never do, tampering is caught.

Tampering is tried the way an attacker would: a flipped word (caught by SLIP-39's
RS1024 checksum), a share value altered *with* a recomputed checksum (caught by the
SLIP-39 secret digest and by the public-key commitment), a share swapped for one of
another split, a share file claiming another key — with and without the manifest.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import pytest
import shamir_mnemonic

from pqcnet.crypto.pqc import SigningKey
from pqcnet.identity import MeshCA, NodeIdentity, dev_identities
from pqcnet.identity.certs import is_signed_by
from pqcnet.identity.errors import KeyStoreError, NotEnoughShares, ShareError, ShareTampered
from pqcnet.identity.keyconfig import key_store_config, open_key_store
from pqcnet.identity.shamir import (
    FileShareSource,
    KeyShare,
    ShamirKeyStore,
    combine_key,
    read_manifest,
    read_share,
    split_key,
    write_manifest,
    write_share,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def split() -> tuple[SigningKey, object, list[KeyShare]]:
    key = SigningKey.generate()
    manifest, shares = split_key(key, 5, 3)
    return key, manifest, shares


def _forge_value(share: KeyShare) -> KeyShare:
    """Alter the share's value and re-encode it with a *valid* RS1024 checksum."""
    parsed = shamir_mnemonic.Share.from_mnemonic(share.mnemonic)
    value = bytes([parsed.value[0] ^ 0x01]) + parsed.value[1:]
    forged = dataclasses.replace(parsed, value=value).mnemonic()
    shamir_mnemonic.Share.from_mnemonic(forged)  # the checksum is valid
    return dataclasses.replace(share, mnemonic=forged)


def test_every_k_subset_rebuilds_the_key(split) -> None:  # type: ignore[no-untyped-def]
    key, manifest, shares = split
    subsets = list(itertools.combinations(shares, 3))
    assert len(subsets) == 10
    for subset in subsets:
        assert combine_key(subset, manifest).key_id == key.key_id
    # more than k is fine (k of them are used), and order does not matter
    assert combine_key(reversed(shares), manifest).key_id == key.key_id
    assert combine_key(shares[1:]).key_id == key.key_id


def test_k_minus_one_shares_fail_clearly(split) -> None:  # type: ignore[no-untyped-def]
    _, manifest, shares = split
    for subset in itertools.combinations(shares, 2):
        with pytest.raises(NotEnoughShares, match=r"2 share\(s\) given, 3 needed \(a 3-of-5"):
            combine_key(subset, manifest)
    with pytest.raises(NotEnoughShares, match="2 share"):
        combine_key([shares[0], shares[0], shares[1]])  # a duplicate is not a third share
    with pytest.raises(NotEnoughShares, match="no shares"):
        combine_key([])


def test_flipped_word_is_detected(split) -> None:  # type: ignore[no-untyped-def]
    _, manifest, shares = split
    words = shares[0].mnemonic.split()
    words[10] = "academic" if words[10] != "academic" else "acid"
    bad = dataclasses.replace(shares[0], mnemonic=" ".join(words))
    with pytest.raises(ShareTampered, match="share 1 does not match the manifest digest"):
        combine_key([bad, *shares[1:3]], manifest)
    with pytest.raises(ShareTampered, match="share 1 is corrupt or tampered"):
        combine_key([bad, *shares[1:3]])


def test_value_forged_with_valid_checksum_is_detected(split) -> None:  # type: ignore[no-untyped-def]
    _, manifest, shares = split
    forged = _forge_value(shares[1])
    with pytest.raises(ShareTampered, match="share 2 does not match the manifest digest"):
        combine_key([shares[0], forged, shares[2]], manifest)
    # without the manifest: SLIP-39's secret digest catches it at combine time
    with pytest.raises(ShareTampered, match="do not combine"):
        combine_key([shares[0], forged, shares[2]])


def test_shares_of_another_split_or_key_are_refused(split) -> None:  # type: ignore[no-untyped-def]
    key, manifest, shares = split
    _, other_split = split_key(key, 5, 3)  # same key, fresh randomness
    with pytest.raises(ShareTampered, match="share 3 does not match the manifest digest"):
        combine_key([shares[0], shares[1], other_split[2]], manifest)
    with pytest.raises(ShareTampered, match="do not combine"):
        combine_key([shares[0], shares[1], other_split[2]])
    _, foreign = split_key(SigningKey.generate(), 5, 3)
    with pytest.raises(ShareTampered, match="belongs to a different key"):
        combine_key([shares[0], shares[1], foreign[2]], manifest)
    with pytest.raises(ShareError, match="belong to different keys"):
        combine_key([shares[0], shares[1], foreign[2]])
    relabelled = dataclasses.replace(shares[2], index=4)
    with pytest.raises(ShareTampered, match="mnemonic is for a different index"):
        combine_key([shares[0], shares[1], relabelled])
    with pytest.raises(ShareTampered, match="two different shares claim index 1"):
        combine_key([shares[0], _forge_value(shares[0]), shares[1], shares[2]])


@pytest.mark.parametrize(("n", "k", "message"), [
    (1, 1, "share count must be 2..16"), (17, 3, "share count must be 2..16"),
    (5, 1, "threshold must be 2..5"), (3, 5, "threshold must be 2..3"), (0, 0, "share count"),
])
def test_bad_share_count_or_threshold_is_refused(n: int, k: int, message: str) -> None:
    with pytest.raises(ShareError, match=message):
        split_key(SigningKey.generate(), n, k)


def test_share_files_and_manifest_round_trip(tmp_path: Path, split) -> None:  # type: ignore[no-untyped-def]
    key, manifest, shares = split
    for share in shares:
        write_share(tmp_path / f"s{share.index}.json", share)
    write_manifest(tmp_path / "m.json", manifest)
    assert (tmp_path / "s1.json").stat().st_mode & 0o777 == 0o600
    assert read_manifest(tmp_path / "m.json") == manifest
    assert read_share(tmp_path / "s4.json") == shares[3]
    assert shares[0].mnemonic not in repr(shares[0])
    files = [tmp_path / f"s{i}.json" for i in (2, 4, 5)]
    store = ShamirKeyStore(tmp_path / "m.json", FileShareSource(files))
    assert store.load().key_id == key.key_id
    doc = json.loads((tmp_path / "s2.json").read_text())
    (tmp_path / "s2.json").write_text(json.dumps({**doc, "index": 99}))
    with pytest.raises(ShareError, match="malformed"):
        store.load()
    (tmp_path / "m.json").write_text("[]")
    with pytest.raises(ShareError, match="not a pqcnet-key-shares/1 document"):
        read_manifest(tmp_path / "m.json")


def test_shamir_store_splits_on_store_and_needs_a_share_dir(tmp_path: Path) -> None:
    key = SigningKey.generate()
    cfg = key_store_config({"kind": "shamir", "shares": 4, "threshold": 2,
                            "share_dir": "out", "share_files": ["out/share-1.json",
                                                                "out/share-4.json"]},
                           base_dir=tmp_path)
    open_key_store(cfg).store(key)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        f"share-{i}.json" for i in range(1, 5)]
    assert open_key_store(cfg).load().key_id == key.key_id
    with pytest.raises(KeyStoreError, match="only with a share_dir"):
        ShamirKeyStore(tmp_path / "m.json", None).store(key)
    with pytest.raises(KeyStoreError, match="no share source"):
        ShamirKeyStore(cfg.manifest_path, None).load()


def test_shamir_backed_node_identity_and_ca(tmp_path: Path) -> None:
    ca = MeshCA.create("mesh.test")
    ca_cfg = key_store_config({"kind": "shamir", "shares": 3, "threshold": 2,
                               "share_dir": "ca-shares",
                               "share_files": ["ca-shares/share-1.json",
                                               "ca-shares/share-3.json"]},
                              base_dir=tmp_path, default_dir=tmp_path / "ca")
    store = open_key_store(ca_cfg)
    store.store(ca.key)
    ca.save(tmp_path / "ca", key_store=store)
    reopened = MeshCA.load(tmp_path / "ca", key_store=open_key_store(ca_cfg))
    node = reopened.issue("spiffe://mesh.test/acme/relayer/r1")
    assert is_signed_by(node.certificate, ca.certificate)

    _, (ident,) = dev_identities("mesh.test", "spiffe://mesh.test/acme/relayer/r2")
    node_cfg = key_store_config({"kind": "shamir", "shares": 3, "threshold": 2,
                                 "share_dir": "n-shares",
                                 "share_files": ["n-shares/share-2.json",
                                                 "n-shares/share-3.json"]},
                                base_dir=tmp_path, default_dir=tmp_path / "n")
    ident.save(tmp_path / "n", key_store=open_key_store(node_cfg))
    assert not (tmp_path / "n" / "key.pem").exists()
    back = NodeIdentity.load(tmp_path / "n", key_store=open_key_store(node_cfg))
    assert back.key.key_id == ident.key.key_id
