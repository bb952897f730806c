"""Rotation and hot-reload options shared by long-running commands.

``--renew-ca-url`` (the CA service) or ``--renew-ca-dir`` (a CA directory on this
machine; its passphrase from ``$PQCNET_CA_PASSPHRASE``) enable renewal at
``--renew-at`` of the lifetime; the identity directory is always watched every
``--reload-poll`` seconds; ``--crl-url`` fetches ``/v1/crl`` every ``--crl-refresh``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from pqcnet._util.env import CA_PASS_ENV, env_passphrase


def rotation_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add the rotation options (keyword ``rotation`` dict is not used: plain kwargs)."""
    for option in reversed([
        click.option("--renew-ca-url", default="",
                     help="Renew through this CA service (https://host:port, POST /v1/rotate)."),
        click.option("--renew-ca-dir", default=None,
                     type=click.Path(file_okay=False, exists=True, path_type=Path),
                     help="Renew with this CA directory (passphrase from "
                          f"${CA_PASS_ENV}; unset = unencrypted CA key)."),
        click.option("--renew-at", type=click.FloatRange(0.05, 0.95), default=0.5,
                     show_default=True, help="Renew once this fraction of the lifetime passed."),
        click.option("--reload-poll", type=click.FloatRange(0.1, 600), default=2.0,
                     show_default=True,
                     help="Seconds between looks at the identity directory (hot reload)."),
        click.option("--crl-url", default="",
                     help="Fetch the CRL from this CA service (https:// or http://, /v1/crl)."),
        click.option("--crl-refresh", type=click.FloatRange(0.5, 86400), default=30.0,
                     show_default=True, help="Seconds between CRL fetches."),
    ]):
        f = option(f)
    return f


def build_manager(identity_dir: Path, passphrase: bytes | None, *, renew_ca_url: str,
                  renew_ca_dir: Path | None, renew_at: float, reload_poll: float,
                  crl_url: str, crl_refresh: float, rotate_key: bool = True,
                  load: Callable[[], Any] | None = None,
                  save: Callable[[Any], None] | None = None) -> Any:
    """An :class:`~pqcnet.runtime.rotation.IdentityManager` for ``identity_dir``."""
    from pqcnet.runtime.rotation import (
        CaServiceRenewer,
        IdentityManager,
        LocalCaRenewer,
        Renewer,
        RotationConfig,
        file_identity,
    )

    if renew_ca_url and renew_ca_dir is not None:
        raise click.UsageError("give --renew-ca-url or --renew-ca-dir, not both")
    renewer: Renewer | None = None
    if renew_ca_url:
        renewer = CaServiceRenewer(renew_ca_url)
    elif renew_ca_dir is not None:
        from pqcnet.cli._keystore import open_store
        from pqcnet.cli.ca import _key_store_config
        from pqcnet.identity.ca import MeshCA
        from pqcnet.identity.ca_lock import ca_writer

        ca_dir = renew_ca_dir
        ca_pass = env_passphrase(CA_PASS_ENV)
        # the CA's own key store (file, or the recorded key-store.yaml); never prompts
        store = open_store(_key_store_config(ca_dir, None), lambda: ca_pass)

        def load_ca() -> object:
            return MeshCA.load(ca_dir, key_store=store)

        def save_ca(ca: object) -> None:
            assert isinstance(ca, MeshCA)
            ca.save(ca_dir, key_store=store)  # state and certificate; the key stays

        renewer = LocalCaRenewer(load_ca, save_ca,
                                 hold=lambda: ca_writer(ca_dir, "a --renew-ca-dir renewer"))
    file_load, file_save = file_identity(identity_dir, passphrase)
    return IdentityManager(identity_dir, load or file_load, save or file_save, renewer=renewer,
                           config=RotationConfig(renew_at=renew_at, poll_s=reload_poll,
                                                 crl_url=crl_url, crl_refresh_s=crl_refresh,
                                                 rotate_key=rotate_key))


async def bind_relayer(node: Any, manager: Any) -> None:
    """Start ``manager`` and apply its changes to a running relayer's server."""
    from pqcnet.runtime.rotation import bind_relayer as bind

    await bind(node, manager)


async def unbind(manager: Any) -> None:
    """Stop ``manager`` and whatever was bound to it."""
    await manager.stop()
