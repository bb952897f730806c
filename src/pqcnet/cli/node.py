"""``pqcnet node run``: a relayer or sentry together with its control plane;
``pqcnet node enroll``: join the mesh through the CA service with a one-time token.

The command loads and validates the node file (see ``examples/node-relayer.yaml``),
starts :class:`~pqcnet.runtime.node.NodeRuntime`, prints one ``ready`` JSON line on
stdout once the node listens and has joined the mesh (scripts and tests wait for it),
and serves until SIGINT/SIGTERM, then shuts down cleanly. ``check`` validates a node
file without starting anything.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import click

from pqcnet._util.env import PASS_ENV
from pqcnet.cli._common import run_until_signalled
from pqcnet.cli._keystore import key_store_option
from pqcnet.cli._rotation import build_manager, rotation_options, unbind
from pqcnet.runtime import schema

_config = click.option("--config", "config_path", required=True,
                       type=click.Path(dir_okay=False, path_type=Path),
                       help="Node YAML (see examples/node-relayer.yaml, node-sentry.yaml).")


@click.group()
def cli() -> None:
    """Run a relayer or sentry with its control-plane agent; enroll a new node."""


@cli.command("check")
@_config
def check(config_path: Path) -> None:
    """Validate a node file (and the role's config it names) as `run` would; print a JSON
    summary (same as `pqcnet config check FILE --kind node`)."""
    click.echo(json.dumps(schema.check_node_file(config_path)))


@cli.command("run")
@_config
@rotation_options
def run(config_path: Path, **rotation: Any) -> None:
    """Start the node and its control-plane agent; serve until SIGINT/SIGTERM.

    The role's identity directory is watched (a certificate rewritten by cert-manager or
    `pqcnet ca issue` is taken within --reload-poll seconds, atomically) and, with
    --renew-ca-url / --renew-ca-dir, renewed at --renew-at of its lifetime; new tunnels
    use the new certificate, old ones get a GOAWAY. A relayer keeps its key (it signs
    its proofs and its ledger vertices); a sentry's key rotates with its certificate.
    """
    from pqcnet.runtime.node import NodeRuntime
    from pqcnet.runtime.rotation import bind_relayer, bind_sentry

    cfg = schema.load_node_file(config_path)
    if cfg.role == "relayer":
        from pqcnet.relayer.node import load_identity, save_identity

        rcfg = cfg.relayer
        assert rcfg is not None
        manager = build_manager(Path(str(rcfg.identity_dir)), None, rotate_key=False,
                                load=lambda: load_identity(rcfg),
                                save=lambda new: save_identity(rcfg, new), **rotation)
    else:
        from pqcnet._util.env import PASS_ENV, env_passphrase
        from pqcnet.sentry.config import require_identity

        assert cfg.sentry is not None
        manager = build_manager(require_identity(cfg.sentry), env_passphrase(PASS_ENV),
                                **rotation)

    async def start() -> NodeRuntime:
        node = NodeRuntime(cfg)
        await node.start()
        if node.relayer is not None:
            await bind_relayer(node.relayer, manager)
        else:
            await bind_sentry(node.sentry_service, manager)
        return node

    async def stop(node: NodeRuntime) -> None:
        await unbind(manager)
        await node.stop()

    def ready(node: NodeRuntime) -> None:
        click.echo(json.dumps({
            "ready": True, "role": cfg.role, "node": node.node_id, "port": node.port,
            "metrics_port": node.metrics_port, "mesh_metrics_port": node.mesh_metrics_port,
            "grpc_port": node.relayer.grpc_port if node.relayer is not None else None,
            "transport": cfg.control_plane.spec.transport,
            "namespace": cfg.control_plane.spec.namespace}))
        sys.stdout.flush()

    run_until_signalled(start, stop, ready)


@cli.command("enroll")
@click.option("--ca", "ca_url", default="",
              help="https://host:port of `pqcnet ca serve` (default: the token bundle's).")
@click.option("--token-file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Token bundle from `pqcnet ca token create`.")
@click.option("--spiffe-id", default="",
              help="SPIFFE ID to ask for (default: the token's pattern when it is exact).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Identity directory to write (cert.pem, bundle.pem, crl.pem, key.pem).")
@key_store_option("Key store config (YAML key_store: mapping: file | pkcs11 | shamir) for the "
                  "new node key; default: --out/key.pem under $PQCNET_NODE_PASSPHRASE.")
@click.option("--passphrase-env", default=PASS_ENV, show_default=True,
              help="Environment variable with the passphrase for a file key store.")
@click.option("--no-passphrase", is_flag=True, help="Store the node key unencrypted (dev).")
@click.option("--attest/--no-attest", default=False, show_default=True,
              help="Send this installation's signed measurements (required for attested roles).")
@click.option("--timeout", type=float, default=15.0, show_default=True,
              help="Seconds for one request.")
@click.option("--retry-for", type=click.FloatRange(0), default=60.0, show_default=True,
              help="Seconds to keep retrying (same key) while the CA is unreachable, "
                   "rate-limits or fails; a refusal is final.")
def enroll(ca_url: str, token_file: Path, spiffe_id: str, out: Path,
           key_store_file: Path | None, passphrase_env: str, no_passphrase: bool,
           attest: bool, timeout: float, retry_for: float) -> None:
    """Join the mesh: new ML-DSA-65 key, CSR, POST /v1/enroll with the one-time token;
    key (key store) and identity written only after the CA said yes."""
    import asyncio

    from pqcnet.cli._common import passphrase
    from pqcnet.cli._keystore import open_store
    from pqcnet.crypto.pqc import SigningKey
    from pqcnet.identity import SpiffeId
    from pqcnet.identity.errors import IdentityError
    from pqcnet.identity.keyconfig import key_store_config, read_key_store_file
    from pqcnet.identity.tokens import read_bundle
    from pqcnet.runtime import enroll as client

    bundle = read_bundle(token_file)
    url = ca_url or bundle.ca_url
    if not url:
        raise click.UsageError("no CA URL: pass --ca or create the token with --ca-url")
    if not spiffe_id:
        if any(c in bundle.pattern for c in "*?["):
            raise click.UsageError(f"the token allows {bundle.pattern}: pass --spiffe-id")
        spiffe_id = bundle.pattern
    sid = SpiffeId.parse(spiffe_id)
    config = (read_key_store_file(key_store_file, default_dir=out) if key_store_file
              else key_store_config(None, default_dir=out))
    store = open_store(config, lambda: passphrase(passphrase_env, no_passphrase,
                                                  what="node key", confirm=False))
    key = SigningKey.generate("ML-DSA-65")
    # an ID of another shape names no role itself: the CA reads it through its SPIFFE
    # layouts, and the token says which one it must come out as
    attested = sid if sid.role else dataclasses.replace(sid, role=bundle.role)
    attestation = client.attestation_for(key, attested) if attest else None
    identity, mesh = asyncio.run(client.enroll(url, bundle, sid, key, attestation=attestation,
                                               timeout_s=timeout, retry_for_s=retry_for))
    try:
        identity.save(out, key_store=store)
    except IdentityError as exc:
        raise IdentityError(f"enrolled, but writing {out} failed: {exc}") from None
    click.echo(json.dumps({"enrolled": str(identity.spiffe_id),
                           "serial": format(identity.serial, "x"),
                           "not_after": identity.not_after.isoformat(), "out": str(out),
                           "key": store.describe(), "config": mesh}))
