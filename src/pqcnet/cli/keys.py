"""``pqcnet keys``: node-side key handling — generate, CSR, show, Shamir split/combine,
and a custodian's share service.

The node's private key never leaves the node: ``keys gen`` writes it encrypted
(PKCS#8 under ``$PQCNET_NODE_PASSPHRASE`` or a prompt) or into any key store
(``--key-store``: PKCS#11 token, Shamir shares), ``keys csr`` proves possession to
the CA with a signed CSR carrying the SPIFFE ID. ``keys split`` turns a key file into
one share file per custodian plus a public manifest; ``keys share-serve`` is the
custodian's service a starting node gathers shares from (``keys combine`` is the
local dev/test path). See docs/how-to/key-custody.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from pqcnet._util.env import PASS_ENV
from pqcnet.cli._common import hostport, passphrase, run_until_signalled
from pqcnet.cli._keystore import key_store_option, open_store
from pqcnet.crypto.pqc import SigningKey
from pqcnet.identity import NodeIdentity, build_csr
from pqcnet.identity.errors import IdentityError
from pqcnet.identity.keyconfig import read_key_store_file
from pqcnet.identity.keystore import FileKeyStore, KeyStore, atomic_write, write_private_key
from pqcnet.identity.shamir import (
    combine_key,
    read_manifest,
    read_share,
    split_key,
    write_manifest,
    write_share,
)

if TYPE_CHECKING:
    from pqcnet.qstp.aio import Server

_STORE_HELP = "Key store config (YAML key_store: mapping: file | pkcs11 | shamir)."
passphrase_env_option = click.option(
    "--passphrase-env", default=PASS_ENV, show_default=True,
    help="Environment variable with the key passphrase (key files).")
no_passphrase_option = click.option("--no-passphrase", is_flag=True,
                                    help="The key file is (or will be) unencrypted.")


def _store(key_file: Path | None, key_store_file: Path | None, passphrase_env: str,
           no_passphrase: bool, *, confirm: bool = False) -> KeyStore:
    if (key_file is None) == (key_store_file is None):
        raise click.UsageError("give exactly one of --key/--out and --key-store")

    def ask() -> bytes | None:
        return passphrase(passphrase_env, no_passphrase, what="node key", confirm=confirm)

    if key_file is not None:
        return FileKeyStore(key_file, ask())
    assert key_store_file is not None
    return open_store(read_key_store_file(key_store_file, default_dir=key_store_file.parent), ask)


@click.group()
def cli() -> None:
    """Node keys: generate, CSR, show; Shamir split / combine / share-serve."""


@cli.command()
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the private key (PEM, mode 0600).")
@key_store_option(_STORE_HELP + " Instead of --out.")
@click.option("--algorithm", default="ML-DSA-65", show_default=True,
              type=click.Choice(["ML-DSA-44", "ML-DSA-65", "ML-DSA-87"]))
@passphrase_env_option
@click.option("--no-passphrase", is_flag=True, help="Store unencrypted (development only).")
@click.option("--force", is_flag=True, help="Overwrite an existing key file.")
def gen(out: Path | None, key_store_file: Path | None, algorithm: str, passphrase_env: str,
        no_passphrase: bool, force: bool) -> None:
    """Generate a fresh ML-DSA private key (into a file or a key store)."""
    if out is not None and out.exists() and not force:
        raise IdentityError(f"{out} exists (use --force to overwrite)")
    store = _store(out, key_store_file, passphrase_env, no_passphrase, confirm=True)
    key = SigningKey.generate(algorithm)
    store.store(key)
    click.echo(f"{algorithm} key {key.key_id.hex()[:16]} -> {store.describe()}")


@cli.command()
@click.option("--key", "key_file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@key_store_option(_STORE_HELP + " Instead of --key.")
@click.option("--spiffe-id", required=True, help="spiffe://<trust-domain>/<tenant>/<role>/<node>")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@passphrase_env_option
@no_passphrase_option
def csr(key_file: Path | None, key_store_file: Path | None, spiffe_id: str, out: Path,
        passphrase_env: str, no_passphrase: bool) -> None:
    """Write a CSR for SPIFFE_ID signed by the key (send it to `pqcnet ca sign-csr`)."""
    key = _store(key_file, key_store_file, passphrase_env, no_passphrase).load()
    atomic_write(out, build_csr(key, spiffe_id))
    click.echo(f"CSR for {spiffe_id} -> {out}")


@cli.command()
@click.option("--key", "key_file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@key_store_option(_STORE_HELP + " Instead of --key.")
@click.option("--identity", "identity_dir", type=click.Path(file_okay=False, exists=True,
                                                            path_type=Path),
              help="Also load this identity directory (cert.pem, bundle.pem) with the key.")
@passphrase_env_option
@no_passphrase_option
def show(key_file: Path | None, key_store_file: Path | None, identity_dir: Path | None,
         passphrase_env: str, no_passphrase: bool) -> None:
    """Load the key (proving the store can give it) and describe it; no secret is printed."""
    store = _store(key_file, key_store_file, passphrase_env, no_passphrase)
    key = store.load()
    click.echo(f"{key.algorithm} key {key.key_id.hex()[:16]} from {store.describe()}")
    if identity_dir is not None:
        node = NodeIdentity.load(identity_dir, key_store=_Loaded(key))
        click.echo(f"identity {node.spiffe_id} serial {node.serial:x} "
                   f"valid until {node.not_after.isoformat()}")


class _Loaded:
    """A key already loaded (so ``show --identity`` does not gather shares twice)."""

    def __init__(self, key: SigningKey) -> None:
        self._key = key

    def load(self) -> SigningKey:
        return self._key

    def store(self, key: SigningKey) -> None:
        raise IdentityError("read-only")

    def describe(self) -> str:
        return "loaded key"


@cli.command()
@click.option("--key", "key_file", required=True,
              type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--shares", required=True, type=int, help="Number of shares (custodians), 2..16.")
@click.option("--threshold", required=True, type=int, help="Shares needed to rebuild, 2..N.")
@click.option("--out-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Writes share-<i>.json (one per custodian, 0600) here.")
@click.option("--manifest", type=click.Path(dir_okay=False, path_type=Path),
              help="Public manifest (default <out-dir>/key.shares.json); the node keeps it.")
@passphrase_env_option
@no_passphrase_option
def split(key_file: Path, shares: int, threshold: int, out_dir: Path, manifest: Path | None,
          passphrase_env: str, no_passphrase: bool) -> None:
    """Split a key file into SHARES share files, any THRESHOLD of which rebuild it."""
    key = FileKeyStore(key_file, passphrase(passphrase_env, no_passphrase,
                                            what="node key")).load()
    public, parts = split_key(key, shares, threshold)
    for part in parts:
        write_share(out_dir / f"share-{part.index}.json", part)
    manifest = manifest or out_dir / "key.shares.json"
    write_manifest(manifest, public)
    click.echo(f"key {key.key_id.hex()[:16]} split {threshold}-of-{shares} -> "
               f"{out_dir}/share-1..{shares}.json, manifest {manifest}")
    click.echo(f"hand one share file to each custodian, then delete them and {key_file} here")


@cli.command()
@click.option("--manifest", required=True,
              type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.argument("share_files", nargs=-1, required=True,
                type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the rebuilt key here (else only check that the shares combine).")
@passphrase_env_option
@no_passphrase_option
def combine(manifest: Path, share_files: tuple[Path, ...], out: Path | None,
            passphrase_env: str, no_passphrase: bool) -> None:
    """Rebuild a key from share files (dev/test path; nodes use the share service)."""
    key = combine_key([read_share(p) for p in share_files], read_manifest(manifest))
    if out is not None:
        pw = passphrase(passphrase_env, no_passphrase, what="node key", confirm=True)
        write_private_key(out, key, pw)
        click.echo(f"key {key.key_id.hex()[:16]} rebuilt -> {out}")
    else:
        click.echo(f"key {key.key_id.hex()[:16]} rebuilt (not written)")


@cli.command("share-serve")
@click.option("--identity", "identity_dir", required=True,
              type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="The custodian's own identity directory.")
@key_store_option("Key store of the custodian's identity key (default: key.pem in --identity).")
@click.option("--share", "share_files", multiple=True, required=True,
              type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Share file to serve (repeat: one per key).")
@click.option("--allow", "allowed", multiple=True, required=True,
              help="SPIFFE ID (or per-segment glob) of a node that may fetch (repeat).")
@click.option("--listen", default="127.0.0.1:0", show_default=True, help="HOST:PORT to bind.")
@click.option("--port-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the bound port here once listening.")
@passphrase_env_option
@no_passphrase_option
def share_serve(identity_dir: Path, key_store_file: Path | None, share_files: tuple[Path, ...],
                allowed: tuple[str, ...], listen: str, port_file: Path | None,
                passphrase_env: str, no_passphrase: bool) -> None:
    """Serve share(s) over QSTP to the allowed node SPIFFE IDs until interrupted."""
    from pqcnet.runtime.shares import ShareService

    host, port = hostport(listen, param_hint="--listen")
    store = _store(identity_dir / "key.pem" if key_store_file is None else None,
                   key_store_file, passphrase_env, no_passphrase)
    identity = NodeIdentity.load(identity_dir, key_store=store)
    service = ShareService(identity, [read_share(p) for p in share_files], allowed)

    async def start() -> Server:
        return await service.serve(host, port)

    async def stop(server: Server) -> None:
        server.close()
        await server.wait_closed()
        click.echo(f"stopped after releasing {service.released} share(s)", err=True)

    def ready(server: Server) -> None:
        if port_file is not None:
            atomic_write(port_file, f"{server.port}\n".encode())
        click.echo(f"share service {service.identity.spiffe_id} on {host}:{server.port} "
                   f"for {', '.join(service.allowed)}", err=True)

    run_until_signalled(start, stop, ready)
