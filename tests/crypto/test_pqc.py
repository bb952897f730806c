"""PQ primitives: registry, ML-DSA with context strings, ML-KEM, the hybrid seal,
and the optional liboqs backend (absent is a clean None; oqs is never imported then)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pqcnet.crypto import oqs
from pqcnet.crypto.errors import CryptoError, SealError, SignatureInvalid
from pqcnet.crypto.pqc import (
    ALGORITHMS,
    MAX_CONTEXT,
    RecipientKey,
    RecipientPublicKey,
    SigningKey,
    VerifyKey,
    algorithm,
    algorithm_of,
    kem_generate,
    length_prefixed,
    open_sealed,
    seal,
    sealed_overhead,
)

pytestmark = pytest.mark.timeout(120)

RECIPIENT = RecipientKey.generate()
OTHER = RecipientKey.generate()


def test_registry_sizes_match_real_keys() -> None:
    for name in ("ML-DSA-44", "ML-DSA-65", "ML-DSA-87"):
        key = SigningKey.generate(name)
        alg = algorithm(name)
        assert key.algorithm == name == algorithm_of(key.cryptography_key)
        assert len(key.public_key.raw) == alg.public_key_size
        assert len(key.sign(b"m")) == alg.output_size
    for name in ("ML-KEM-768", "ML-KEM-1024"):
        dk = kem_generate(name)
        alg = algorithm(name)
        ss, ct = dk.public_key().encapsulate()
        assert len(ct) == alg.output_size and len(ss) == alg.shared_secret_size
        assert dk.decapsulate(ct) == ss
        assert len(dk.public_key().public_bytes_raw()) == alg.public_key_size
    assert set(ALGORITHMS) == {"ML-KEM-768", "ML-KEM-1024", "ML-DSA-44", "ML-DSA-65", "ML-DSA-87"}


def test_registry_rejects_unknown_and_wrong_kind() -> None:
    with pytest.raises(CryptoError, match="unknown algorithm"):
        algorithm("RSA-2048")
    with pytest.raises(CryptoError, match="not a signature"):
        SigningKey.generate("ML-KEM-768")
    with pytest.raises(CryptoError, match="not a KEM"):
        kem_generate("ML-DSA-65")
    with pytest.raises(CryptoError, match="not a post-quantum key"):
        algorithm_of(object())


def test_signature_context_separates_domains() -> None:
    key = SigningKey.from_seed(b"\x01" * 32)
    sig = key.sign(b"vertex", context=b"pqcnet/qsdag/vertex")
    key.public_key.verify(sig, b"vertex", context=b"pqcnet/qsdag/vertex")
    with pytest.raises(SignatureInvalid):
        key.public_key.verify(sig, b"vertex", context=b"pqcnet/mesh/directive")
    with pytest.raises(SignatureInvalid):
        key.public_key.verify(sig, b"vertex")
    with pytest.raises(SignatureInvalid):
        key.public_key.verify(sig, b"vertex!", context=b"pqcnet/qsdag/vertex")
    assert not key.public_key.is_valid(sig[:-1], b"vertex", context=b"pqcnet/qsdag/vertex")
    with pytest.raises(CryptoError, match="255"):
        key.sign(b"m", context=b"x" * (MAX_CONTEXT + 1))
    assert SigningKey.from_seed(b"\x01" * 32).public_key == key.public_key  # deterministic
    with pytest.raises(CryptoError):
        SigningKey.from_seed(b"short")


def test_verify_key_raw_roundtrip_and_errors() -> None:
    key = SigningKey.generate()
    vk = VerifyKey.from_raw("ML-DSA-65", key.public_key.raw)
    assert vk == key.public_key and hash(vk) == hash(key.public_key)
    assert vk.key_id == key.key_id
    with pytest.raises(CryptoError, match="must be 1952 bytes"):
        VerifyKey.from_raw("ML-DSA-65", b"\0" * 10)
    with pytest.raises(CryptoError, match="not a signature"):
        VerifyKey.from_raw("ML-KEM-768", b"\0" * 1184)


def test_pem_roundtrip_encrypted() -> None:
    key = SigningKey.generate("ML-DSA-87")
    pem = key.to_pem(b"pw")
    assert b"ENCRYPTED" in pem
    assert SigningKey.from_pem(pem, b"pw").public_key == key.public_key
    with pytest.raises(CryptoError):
        SigningKey.from_pem(pem, b"wrong")
    with pytest.raises(CryptoError):
        SigningKey.from_pem(b"garbage")
    assert SigningKey.from_pem(key.to_pem()).public_key == key.public_key


def test_verify_key_pem_roundtrip_and_errors() -> None:
    key = SigningKey.generate("ML-DSA-44")
    pub = key.public_key.to_pem()
    assert pub.startswith(b"-----BEGIN PUBLIC KEY-----")
    assert VerifyKey.from_pem(pub) == key.public_key
    # a signing key PEM is refused unless the caller accepts one (keygen output)
    with pytest.raises(CryptoError, match="cannot load public key"):
        VerifyKey.from_pem(key.to_pem())
    assert VerifyKey.from_pem(key.to_pem(), private_ok=True) == key.public_key
    with pytest.raises(CryptoError, match="cannot load private key"):
        VerifyKey.from_pem(key.to_pem(b"pw"), private_ok=True)  # encrypted: no passphrase
    ed = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(CryptoError, match="expected an ML-DSA public key, got Ed25519"):
        VerifyKey.from_pem(ed, private_ok=True)
    with pytest.raises(CryptoError, match="cannot load public key"):
        VerifyKey.from_pem(b"-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096), st.binary(max_size=64))
def test_seal_open_roundtrip(plaintext: bytes, aad: bytes) -> None:
    blob = seal(RECIPIENT.public, plaintext, aad=aad)
    assert len(blob) == len(plaintext) + sealed_overhead()
    assert open_sealed(RECIPIENT, blob, aad=aad) == plaintext


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=1, max_size=256), st.data())
def test_seal_tamper_is_seal_error(plaintext: bytes, data: st.DataObject) -> None:
    blob = bytearray(seal(RECIPIENT.public, plaintext, aad=b"ctx"))
    pos = data.draw(st.integers(0, len(blob) - 1))
    bit = data.draw(st.integers(0, 7))
    blob[pos] ^= 1 << bit
    with pytest.raises(SealError):
        open_sealed(RECIPIENT, bytes(blob), aad=b"ctx")


@settings(max_examples=30, deadline=None)
@given(st.binary(max_size=2000))
def test_open_garbage_is_seal_error(garbage: bytes) -> None:
    with pytest.raises(SealError):
        open_sealed(RECIPIENT, garbage)


def test_seal_wrong_recipient_wrong_aad_truncation() -> None:
    blob = seal(RECIPIENT.public, b"gossip", aad=b"a")
    with pytest.raises(SealError):
        open_sealed(OTHER, blob, aad=b"a")
    with pytest.raises(SealError):
        open_sealed(RECIPIENT, blob, aad=b"b")
    with pytest.raises(SealError):
        open_sealed(RECIPIENT, blob[:-1], aad=b"a")
    with pytest.raises(SealError):
        open_sealed(RECIPIENT, blob[: sealed_overhead() - 1], aad=b"a")
    assert seal(RECIPIENT.public, b"x") != seal(RECIPIENT.public, b"x")  # fresh each time


def test_recipient_key_encodings() -> None:
    back = RecipientKey.from_bytes(RECIPIENT.to_bytes())
    assert back.public == RECIPIENT.public
    assert open_sealed(back, seal(RECIPIENT.public, b"m")) == b"m"
    pub = RecipientPublicKey.from_bytes(RECIPIENT.public.to_bytes())
    assert pub == RECIPIENT.public and len(pub.key_id) == 32
    with pytest.raises(CryptoError):
        RecipientPublicKey.from_bytes(b"\0" * 5)
    with pytest.raises(CryptoError):
        RecipientKey.from_bytes(b"\0" * 5)
    bad_pub = RecipientPublicKey(b"\0" * 32, RECIPIENT.public.mlkem)  # X25519 low-order point
    with pytest.raises(CryptoError):
        seal(bad_pub, b"m")


def test_seal_plaintext_bound() -> None:
    from pqcnet.crypto.pqc import MAX_SEAL_PLAINTEXT

    with pytest.raises(CryptoError, match="over"):
        seal(RECIPIENT.public, b"\0" * (MAX_SEAL_PLAINTEXT + 1))


def test_length_prefixed_is_unambiguous() -> None:
    assert length_prefixed(b"ab", b"c") != length_prefixed(b"a", b"bc")
    assert length_prefixed() == b""


# ---------------------------------------------------------------------------- liboqs (optional)


@pytest.fixture
def fresh_probe():  # type: ignore[no-untyped-def]
    oqs._probe.cache_clear()
    yield
    oqs._probe.cache_clear()


def test_absent_liboqs_never_imports_oqs(tmp_path: Path, monkeypatch, fresh_probe) -> None:  # type: ignore[no-untyped-def]
    # a tripwire "oqs" package: importing it would fail the test loudly, standing in
    # for liboqs-python's download-and-build on import
    pkg = tmp_path / "site" / "oqs"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('oqs was imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("OQS_INSTALL_PATH", str(tmp_path / "nothing"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(oqs.ctypes.util, "find_library", lambda name: None)
    monkeypatch.delitem(sys.modules, "oqs", raising=False)
    assert oqs.load() is None
    st = oqs.status()
    assert not st.available and "not found" in st.reason
    assert "oqs" not in sys.modules


def test_not_installed_reports_extra(monkeypatch, fresh_probe) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(oqs.importlib.util, "find_spec", lambda name: None)
    assert oqs.load() is None
    assert "pqcnet[oqs]" in oqs.status().reason


def test_unloadable_library_is_reported(tmp_path: Path, monkeypatch, fresh_probe) -> None:  # type: ignore[no-untyped-def]
    lib = tmp_path / "inst" / "lib"
    lib.mkdir(parents=True)
    (lib / "liboqs.so").write_bytes(b"not an ELF file")
    monkeypatch.setattr(oqs.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setenv("OQS_INSTALL_PATH", str(tmp_path / "inst"))
    assert oqs.find_liboqs() == str(lib / "liboqs.so")
    assert oqs.load() is None
    assert "does not load" in oqs.status().reason


@pytest.mark.skipif(not oqs.status().available, reason="liboqs not installed on this machine")
def test_liboqs_cross_verifies_cryptography_signatures() -> None:
    backend = oqs.load()
    assert backend is not None
    key = SigningKey.generate("ML-DSA-65")
    sig = key.sign(b"cross-check")
    assert backend.verify("ML-DSA-65", key.public_key.raw, sig, b"cross-check")
    assert not backend.verify("ML-DSA-65", key.public_key.raw, sig, b"other")
