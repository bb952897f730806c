"""PKCS#11 key store: an AES-256 key on a token wraps the ML-DSA key kept on disk.

Tokens we can test against (SoftHSM2 2.6) and most HSMs in the field cannot hold
ML-DSA keys, so the token holds a **key-encryption key** (KEK) instead: AES-256,
generated on the token, ``CKA_SENSITIVE`` and not ``CKA_EXTRACTABLE`` (its bits
never leave the token), usable only for encrypt/decrypt after a PIN login. The
ML-DSA seed is encrypted under it with ``CKM_AES_GCM`` *by the token*; the blob
(nonce, ciphertext, tag, and the public key in the clear) is a small JSON file.
The GCM additional data binds the blob's format, algorithm, public key id and KEK
label, so a blob cannot be swapped for another key's without failing to decrypt.
The unwrapped seed exists only in this process, long enough to expand the key.

What this protects and what it does not is spelled out in
``docs/how-to/key-custody.md``: the key at rest and a stolen disk, yes (the blob is
useless without the token and its PIN); a compromised running process, no.

python-pkcs11 is the binding (see ``docs/decisions/0004-key-custody.md``). Every
call here blocks; token errors become :class:`HsmError` with one clear line.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.exceptions import (
    NoSuchKey,
    NoSuchToken,
    PinIncorrect,
    PinLenRange,
    PinLocked,
    PKCS11Error,
)
from pkcs11.mechanisms import GCMParams

from pqcnet.crypto.errors import CryptoError
from pqcnet.crypto.pqc import ALGORITHMS, SigningKey, VerifyKey, length_prefixed
from pqcnet.identity.errors import HsmError
from pqcnet.identity.keystore import atomic_write, key_from_seed, key_seed, read_bounded

#: Where Debian's ``softhsm2`` package puts its module (override per deployment).
DEFAULT_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
DEFAULT_KEK_LABEL = "pqcnet-kek"
WRAPPED_FORMAT = "pqcnet-hsm-wrapped-key/1"
#: A wrapped-key file holds a public key (<= 2592 bytes) and 48 bytes of ciphertext.
MAX_WRAPPED_BYTES = 16 * 1024
_NONCE_BYTES = 12
_TAG_BITS = 128


class Pkcs11KeyStore:
    """An ML-DSA key wrapped under a token's AES-256 KEK (see the module docstring)."""

    def __init__(
        self,
        wrapped_path: Path,
        *,
        token_label: str,
        pin: str,
        module: Path = DEFAULT_MODULE,
        kek_label: str = DEFAULT_KEK_LABEL,
    ) -> None:
        if not token_label or not kek_label:
            raise HsmError("PKCS#11 key store needs a token label and a KEK label")
        self.wrapped_path = Path(wrapped_path)
        self.module = Path(module)
        self.token_label = token_label
        self.kek_label = kek_label
        self._pin = pin

    # ------------------------------------------------------------------ KeyStore

    def load(self) -> SigningKey:
        """Decrypt the blob on the token and expand the key in this process."""
        blob = _read_blob(self.wrapped_path)
        if blob.kek_label != self.kek_label:
            raise HsmError(f"{self.wrapped_path} was wrapped under KEK {blob.kek_label!r}, "
                           f"not the configured {self.kek_label!r}")
        aad = _aad(blob.algorithm, blob.public_key, self.kek_label)
        with self._session() as session:
            kek = self._kek(session)
            try:
                plain = kek.decrypt(blob.ciphertext, mechanism=Mechanism.AES_GCM,
                                    mechanism_param=GCMParams(blob.nonce, aad, _TAG_BITS))
            except PKCS11Error:
                raise HsmError(f"{self.wrapped_path} does not decrypt under KEK "
                               f"{self.kek_label!r} on token {self.token_label!r} "
                               "(tampered blob, or a different token/KEK)") from None
        assert isinstance(plain, bytes)
        key = key_from_seed(bytearray(plain), blob.algorithm)
        del plain  # the library returns immutable bytes: dropped, not wiped
        if key.public_key.raw != blob.public_key:
            raise HsmError(f"{self.wrapped_path}: unwrapped key does not match its public key")
        return key

    def store(self, key: SigningKey) -> None:
        """Encrypt ``key``'s seed under the KEK (created on first use) and write the blob."""
        seed = key_seed(key)
        public = key.public_key.raw
        aad = _aad(key.algorithm, public, self.kek_label)
        nonce = os.urandom(_NONCE_BYTES)
        with self._session(rw=True) as session:
            kek = self._kek(session, create=True)
            try:
                ciphertext = kek.encrypt(seed, mechanism=Mechanism.AES_GCM,
                                         mechanism_param=GCMParams(nonce, aad, _TAG_BITS))
            except PKCS11Error as exc:
                raise HsmError(f"token {self.token_label!r} refused to encrypt: "
                               f"{type(exc).__name__}") from None
        assert isinstance(ciphertext, bytes)
        doc = {
            "format": WRAPPED_FORMAT,
            "algorithm": key.algorithm,
            "public_key": _b64(public),
            "token_label": self.token_label,
            "kek_label": self.kek_label,
            "mechanism": "CKM_AES_GCM",
            "nonce": _b64(nonce),
            "ciphertext": _b64(ciphertext),
        }
        atomic_write(self.wrapped_path, json.dumps(doc, indent=1).encode() + b"\n", mode=0o600)

    def describe(self) -> str:
        return (f"pkcs11 token {self.token_label!r} KEK {self.kek_label!r} "
                f"(module {self.module}) wrapping {self.wrapped_path}")

    # ------------------------------------------------------------------ token

    def destroy_kek(self) -> None:
        """Delete the KEK from the token: every blob wrapped under it becomes useless."""
        with self._session(rw=True) as session:
            self._kek(session).destroy()

    @contextmanager
    def _session(self, rw: bool = False) -> Iterator[Any]:
        token = self._token()
        try:
            session = token.open(rw=rw, user_pin=self._pin)
        except (PinIncorrect, PinLenRange):
            raise HsmError(f"PKCS#11 PIN incorrect for token {self.token_label!r}") from None
        except PinLocked:
            raise HsmError(f"PKCS#11 PIN locked on token {self.token_label!r}") from None
        except PKCS11Error as exc:
            raise HsmError(f"cannot log in to token {self.token_label!r}: "
                           f"{type(exc).__name__}") from None
        try:
            yield session
        finally:
            session.close()

    def _token(self) -> Any:
        if not self.module.is_file():
            raise HsmError(f"PKCS#11 module not found: {self.module}")
        try:
            lib = pkcs11.lib(str(self.module))
            return lib.get_token(token_label=self.token_label)
        except NoSuchToken:
            raise HsmError(f"no PKCS#11 token labelled {self.token_label!r} in {self.module} "
                           "(check SOFTHSM2_CONF / the token label)") from None
        except PKCS11Error as exc:
            raise HsmError(f"PKCS#11 module {self.module} failed: {type(exc).__name__}") from None
        except RuntimeError as exc:  # the binding's own "cannot load module"
            raise HsmError(f"cannot load PKCS#11 module {self.module}: {exc}") from None

    def _kek(self, session: Any, *, create: bool = False) -> Any:
        try:
            return session.get_key(ObjectClass.SECRET_KEY, KeyType.AES, label=self.kek_label)
        except NoSuchKey:
            if not create:
                raise HsmError(f"token {self.token_label!r} holds no KEK labelled "
                               f"{self.kek_label!r}: the wrapped key cannot be opened") from None
        except PKCS11Error as exc:
            raise HsmError(f"KEK lookup failed on {self.token_label!r}: "
                           f"{type(exc).__name__}") from None
        try:
            return session.generate_key(
                KeyType.AES, 256, label=self.kek_label, store=True,
                capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
                template={
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.WRAP: False,
                    Attribute.UNWRAP: False,
                    Attribute.SIGN: False,
                    Attribute.VERIFY: False,
                    Attribute.DERIVE: False,
                },
            )
        except PKCS11Error as exc:
            raise HsmError(f"cannot create the KEK on token {self.token_label!r}: "
                           f"{type(exc).__name__}") from None


# --------------------------------------------------------------------------- blob


def wrapped_public_key(path: Path) -> VerifyKey:
    """The public key recorded in a wrapped-key file (no token needed)."""
    blob = _read_blob(path)
    return VerifyKey.from_raw(blob.algorithm, blob.public_key)


def _aad(algorithm: str, public_key: bytes, kek_label: str) -> bytes:
    key_id = VerifyKey.from_raw(algorithm, public_key).key_id
    return length_prefixed(WRAPPED_FORMAT.encode(), algorithm.encode(), key_id,
                           kek_label.encode())


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass(frozen=True, slots=True)
class _Blob:
    algorithm: str
    kek_label: str
    public_key: bytes
    nonce: bytes
    ciphertext: bytes


def _read_blob(path: Path) -> _Blob:
    raw = read_bounded(path, MAX_WRAPPED_BYTES, "wrapped key")
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("format") != WRAPPED_FORMAT:
            raise ValueError(f"not a {WRAPPED_FORMAT} document")
        algorithm = str(doc["algorithm"])
        if algorithm not in ALGORITHMS or ALGORITHMS[algorithm].kind != "sig":
            raise ValueError(f"unknown signature algorithm {algorithm!r}")
        blob = _Blob(
            algorithm=algorithm,
            kek_label=str(doc["kek_label"]),
            public_key=base64.b64decode(doc["public_key"], validate=True),
            nonce=base64.b64decode(doc["nonce"], validate=True),
            ciphertext=base64.b64decode(doc["ciphertext"], validate=True),
        )
        if len(blob.nonce) != _NONCE_BYTES:
            raise ValueError("nonce must be 12 bytes")
        VerifyKey.from_raw(algorithm, blob.public_key)
    except (ValueError, KeyError, TypeError, CryptoError) as exc:
        raise HsmError(f"{path} is not a valid wrapped key: {exc}") from None
    return blob
