"""Key-custody fixtures: the SoftHSM2 token from ``scripts/services``, a mesh CA, stores.

The token is real (Debian softhsm2, initialised by ``scripts/services start softhsm``);
without it HSM tests skip, or fail under ``PQCNET_REQUIRE_SERVICES=1``. Each test
gets its own KEK label and destroys its KEK afterwards, so tests share one token
without seeing each other's keys.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pqcnet.identity.errors import HsmError
from pqcnet.identity.hsm import Pkcs11KeyStore
from tests.conftest import _services_env, require_service


@dataclass(frozen=True)
class Token:
    """The test token: module, label, user PIN."""

    module: Path
    label: str
    pin: str


@pytest.fixture(scope="session")
def token() -> Token:
    pin = require_service("PQCNET_PKCS11_PIN", "SoftHSM2 test token")
    env = _services_env()
    conf = os.environ.get("SOFTHSM2_CONF") or env.get("SOFTHSM2_CONF", "")
    if not conf or not Path(conf).is_file():
        pytest.fail(f"SOFTHSM2_CONF {conf!r} missing although the token is configured")
    # SoftHSM reads it when the module is first initialised in this process.
    os.environ["SOFTHSM2_CONF"] = conf
    return Token(Path(env["PQCNET_PKCS11_MODULE"]), env["PQCNET_PKCS11_TOKEN"], pin)


@pytest.fixture
def hsm_store(token: Token) -> Iterator[Callable[..., Pkcs11KeyStore]]:
    """Make Pkcs11KeyStores on the test token with a KEK label unique to this test."""
    labels: list[str] = []
    kek = f"test-kek-{uuid.uuid4().hex[:12]}"

    def make(path: Path, *, pin: str | None = None, kek_label: str = kek) -> Pkcs11KeyStore:
        labels.append(kek_label)
        return Pkcs11KeyStore(path, token_label=token.label, pin=token.pin if pin is None else pin,
                              module=token.module, kek_label=kek_label)

    yield make
    for label in set(labels):
        store = Pkcs11KeyStore(Path("unused"), token_label=token.label, pin=token.pin,
                               module=token.module, kek_label=label)
        with contextlib.suppress(HsmError):  # the test may have destroyed it already
            store.destroy_kek()
