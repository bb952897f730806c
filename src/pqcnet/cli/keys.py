"""``pqcnet keys``: node-side key handling (generate a key, make a CSR).

The node's private key never leaves the node: ``keys gen`` writes it encrypted
(PKCS#8 under ``$PQCNET_NODE_PASSPHRASE`` or a prompt), ``keys csr`` proves
possession to the CA with a signed CSR carrying the SPIFFE ID.
"""

from __future__ import annotations

from pathlib import Path

import click

from pqcnet._util.env import PASS_ENV
from pqcnet.cli._common import passphrase
from pqcnet.crypto.pqc import SigningKey
from pqcnet.identity import build_csr
from pqcnet.identity.errors import IdentityError
from pqcnet.identity.keystore import atomic_write, read_private_key, write_private_key


@click.group()
def cli() -> None:
    """Node keys: generate ML-DSA keys and certificate signing requests."""


@cli.command()
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the private key (PEM, mode 0600).")
@click.option("--algorithm", default="ML-DSA-65", show_default=True,
              type=click.Choice(["ML-DSA-44", "ML-DSA-65", "ML-DSA-87"]))
@click.option("--passphrase-env", default=PASS_ENV, show_default=True,
              help="Environment variable with the key passphrase.")
@click.option("--no-passphrase", is_flag=True, help="Store unencrypted (development only).")
@click.option("--force", is_flag=True, help="Overwrite an existing key file.")
def gen(out: Path, algorithm: str, passphrase_env: str, no_passphrase: bool, force: bool) -> None:
    """Generate a fresh ML-DSA private key."""
    if out.exists() and not force:
        raise IdentityError(f"{out} exists (use --force to overwrite)")
    pw = passphrase(passphrase_env, no_passphrase, what="node key", confirm=True)
    key = SigningKey.generate(algorithm)
    write_private_key(out, key, pw)
    click.echo(f"{algorithm} key {key.key_id.hex()[:16]} -> {out}"
               f" ({'encrypted' if pw else 'UNENCRYPTED'})")


@cli.command()
@click.option("--key", "key_file", required=True,
              type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--spiffe-id", required=True, help="spiffe://<trust-domain>/<tenant>/<role>/<node>")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--passphrase-env", default=PASS_ENV, show_default=True)
@click.option("--no-passphrase", is_flag=True, help="The key file is unencrypted.")
def csr(
    key_file: Path, spiffe_id: str, out: Path, passphrase_env: str, no_passphrase: bool
) -> None:
    """Write a CSR for SPIFFE_ID signed by the key (send it to `pqcnet ca sign-csr`)."""
    key = read_private_key(key_file, passphrase(passphrase_env, no_passphrase, what="node key"))
    atomic_write(out, build_csr(key, spiffe_id))
    click.echo(f"CSR for {spiffe_id} -> {out}")
