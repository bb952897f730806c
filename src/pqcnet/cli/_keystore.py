"""How CLI commands pick a key store: ``--key-store FILE`` (a ``key_store:`` YAML mapping).

Secrets never come from argv: for kind ``file`` the command's ``--passphrase-env`` /
``--no-passphrase`` / prompt apply (as before key stores existed); for ``pkcs11`` the
PIN comes from the environment variable the config names, else a hidden prompt;
``shamir`` gathers its shares from files or custodians (:mod:`pqcnet.runtime.shares`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import click

from pqcnet.identity.keyconfig import KeyStoreConfig
from pqcnet.identity.keystore import FileKeyStore, KeyStore


def key_store_option(help_text: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """``--key-store FILE``: a YAML file with the ``key_store:`` mapping."""
    return click.option("--key-store", "key_store_file", default=None,
                        type=click.Path(dir_okay=False, exists=True, path_type=Path),
                        help=help_text)


def open_store(config: KeyStoreConfig, passphrase: Callable[[], bytes | None]) -> KeyStore:
    """The configured store; ``passphrase`` is asked only for kind ``file``."""
    if config.kind == "file":
        return FileKeyStore(config.key_path, passphrase())
    from pqcnet.runtime.shares import open_key_store

    pin = None
    if config.kind == "pkcs11" and not os.environ.get(config.pin_env):
        pin = click.prompt(f"PKCS#11 PIN for token {config.token_label!r} "
                           f"(or set ${config.pin_env})", hide_input=True)
    return open_key_store(config, pin=pin)

