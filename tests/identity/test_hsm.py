"""PKCS#11 key store against a real SoftHSM2 token (Debian softhsm2 2.6).

The token holds an AES-256 KEK that never leaves it; the ML-DSA seed on disk is
only ciphertext under it. Shown here: a node identity and a CA whose keys live
that way sign, verify, handshake and survive a restart; a wrong PIN, a missing
KEK, a tampered or swapped blob are each a clear HsmError; the KEK is sensitive
and non-extractable on the token.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from pathlib import Path

import pkcs11
import pytest
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11.exceptions import AttributeSensitive

from pqcnet import qstp
from pqcnet.crypto.pqc import SigningKey
from pqcnet.identity import MeshCA, NodeIdentity, dev_identities
from pqcnet.identity.ca import CA_KEY_FILE
from pqcnet.identity.certs import is_signed_by
from pqcnet.identity.errors import HsmError
from pqcnet.identity.hsm import Pkcs11KeyStore, wrapped_public_key
from pqcnet.identity.keystore import key_seed
from pqcnet.identity.node import KEY_FILE
from tests.identity.conftest import Token

pytestmark = [pytest.mark.services, pytest.mark.timeout(120)]

NODE = "spiffe://mesh.test/acme/relayer/r1"
PEER = "spiffe://mesh.test/acme/publisher/p1"
MakeStore = Callable[..., Pkcs11KeyStore]


def test_hsm_backed_node_identity_signs_handshakes_and_restarts(
    tmp_path: Path, hsm_store: MakeStore
) -> None:
    _, (node,) = dev_identities("mesh.test", NODE)
    store = hsm_store(tmp_path / "id" / "key.wrapped")
    node.save(tmp_path / "id", key_store=store)
    assert not (tmp_path / "id" / KEY_FILE).exists()
    blob = (tmp_path / "id" / "key.wrapped").read_bytes()
    assert key_seed(node.key) not in blob and base64.b64encode(key_seed(node.key)) not in blob
    assert wrapped_public_key(tmp_path / "id" / "key.wrapped") == node.key.public_key

    # "restart": a fresh store object, a fresh load
    again = hsm_store(tmp_path / "id" / "key.wrapped")
    loaded = NodeIdentity.load(tmp_path / "id", key_store=again)
    assert loaded.spiffe_id == node.spiffe_id
    signature = loaded.key.sign(b"vertex", context=b"pqcnet/test")
    node.key.public_key.verify(signature, b"vertex", context=b"pqcnet/test")
    assert loaded.certificate.public_key() == loaded.key.public_key.cryptography_key


async def test_hsm_backed_identity_serves_a_real_tunnel(
    tmp_path: Path, hsm_store: MakeStore
) -> None:
    _, (node, peer) = dev_identities("mesh.test", NODE, PEER)
    store = hsm_store(tmp_path / "key.wrapped")
    node.save(tmp_path, key_store=store)
    loaded = await asyncio.to_thread(NodeIdentity.load, tmp_path, key_store=store)

    async def echo(tunnel: qstp.Tunnel) -> None:
        async for stream in tunnel:
            await stream.send(await stream.read_all(1024), end=True)

    async with await qstp.serve(echo, "127.0.0.1", 0, loaded) as server:
        tunnel = await qstp.connect("127.0.0.1", server.port, peer)
        stream = tunnel.open_stream()
        await stream.send(b"ping", end=True)
        assert await stream.read_all(1024) == b"ping"
        assert str(tunnel.peer.spiffe_id) == NODE
        await tunnel.close()


def test_wrong_pin_is_a_clear_error(tmp_path: Path, hsm_store: MakeStore) -> None:
    store = hsm_store(tmp_path / "k.wrapped")
    store.store(SigningKey.generate())
    with pytest.raises(HsmError, match="PIN incorrect for token"):
        hsm_store(tmp_path / "k.wrapped", pin="000000").load()
    with pytest.raises(HsmError, match="PIN incorrect"):
        hsm_store(tmp_path / "other.wrapped", pin="000000").store(SigningKey.generate())


def test_missing_token_and_module_are_clear_errors(tmp_path: Path, token: Token) -> None:
    with pytest.raises(HsmError, match="no PKCS#11 token labelled 'nope'"):
        Pkcs11KeyStore(tmp_path / "k", token_label="nope", pin=token.pin,
                       module=token.module).store(SigningKey.generate())
    with pytest.raises(HsmError, match="module not found"):
        Pkcs11KeyStore(tmp_path / "k", token_label=token.label, pin=token.pin,
                       module=tmp_path / "missing.so").store(SigningKey.generate())


def test_the_blob_is_useless_without_the_tokens_kek(tmp_path: Path, hsm_store: MakeStore) -> None:
    store = hsm_store(tmp_path / "k.wrapped")
    store.store(SigningKey.generate())
    store.destroy_kek()
    with pytest.raises(HsmError, match="holds no KEK labelled"):
        store.load()
    # a new KEK under the same label (another token, a re-initialised one) cannot open it
    hsm_store(tmp_path / "fresh.wrapped").store(SigningKey.generate())
    with pytest.raises(HsmError, match="does not decrypt under KEK"):
        store.load()
    # and a KEK of another label is refused before any token call
    with pytest.raises(HsmError, match="was wrapped under KEK"):
        hsm_store(tmp_path / "k.wrapped", kek_label="someone-else").load()


def test_tampered_or_swapped_blob_does_not_decrypt(tmp_path: Path, hsm_store: MakeStore) -> None:
    a, b = SigningKey.generate(), SigningKey.generate()
    store_a, store_b = hsm_store(tmp_path / "a.wrapped"), hsm_store(tmp_path / "b.wrapped")
    store_a.store(a)
    store_b.store(b)
    doc = json.loads((tmp_path / "a.wrapped").read_text())
    ct = bytearray(base64.b64decode(doc["ciphertext"]))
    ct[0] ^= 1
    (tmp_path / "a.wrapped").write_text(json.dumps({**doc, "ciphertext":
                                                    base64.b64encode(ct).decode()}))
    with pytest.raises(HsmError, match="does not decrypt"):
        store_a.load()
    # b's ciphertext under a's public key: the GCM additional data binds them
    doc_b = json.loads((tmp_path / "b.wrapped").read_text())
    (tmp_path / "a.wrapped").write_text(json.dumps({**doc_b, "public_key": doc["public_key"]}))
    with pytest.raises(HsmError, match="does not decrypt"):
        store_a.load()
    (tmp_path / "a.wrapped").write_text("{not json")
    with pytest.raises(HsmError, match="not a valid wrapped key"):
        store_a.load()
    assert store_b.load().key_id == b.key_id


def test_kek_is_sensitive_and_never_extractable(tmp_path: Path, token: Token,
                                                hsm_store: MakeStore) -> None:
    store = hsm_store(tmp_path / "k.wrapped")
    store.store(SigningKey.generate())
    lib = pkcs11.lib(str(token.module))
    with lib.get_token(token_label=token.label).open(user_pin=token.pin) as session:
        kek = session.get_key(ObjectClass.SECRET_KEY, KeyType.AES, label=store.kek_label)
        assert kek[Attribute.SENSITIVE] and kek[Attribute.ALWAYS_SENSITIVE]
        assert not kek[Attribute.EXTRACTABLE] and kek[Attribute.NEVER_EXTRACTABLE]
        assert kek[Attribute.VALUE_LEN] == 32
        with pytest.raises(AttributeSensitive):
            kek[Attribute.VALUE]  # reading it must fail


def test_hsm_backed_ca_issues_certificates(tmp_path: Path, hsm_store: MakeStore) -> None:
    ca = MeshCA.create("mesh.test")
    store = hsm_store(tmp_path / "ca" / "ca-key.wrapped")
    store.store(ca.key)
    ca.save(tmp_path / "ca", key_store=store)
    assert not (tmp_path / "ca" / CA_KEY_FILE).exists()
    reopened = MeshCA.load(tmp_path / "ca", key_store=hsm_store(tmp_path / "ca" / "ca-key.wrapped"))
    node = reopened.issue(NODE)
    assert is_signed_by(node.certificate, ca.certificate)
    reopened.save(tmp_path / "ca", key_store=store)  # state only; the blob is untouched
    assert MeshCA.load(tmp_path / "ca", key_store=store).issued.keys() == {node.serial}
