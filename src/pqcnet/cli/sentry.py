"""``pqcnet sentry``, ``pqcnet assertion`` and ``pqcnet sidecar`` commands.

All three live here (``pqcnet/cli/assertion.py`` and ``pqcnet/cli/sidecar.py`` only
re-export) because they share loading of identities and issuer keys. Long-running
commands run until SIGINT/SIGTERM and shut down cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from pathlib import Path
from typing import Any

import click

from pqcnet.cli.ca import passphrase
from pqcnet.crypto.pqc import SigningKey
from pqcnet.identity import NodeIdentity
from pqcnet.sentry import assertion as sa
from pqcnet.sentry.config import SentryConfig, load_config, verify_key_pem
from pqcnet.sentry.errors import SentryConfigError

PASS_ENV = "PQCNET_NODE_PASSPHRASE"
ISSUER_PASS_ENV = "PQCNET_ISSUER_PASSPHRASE"


def _hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise click.BadParameter(f"expected host:port, got {value!r}")
    return host or "127.0.0.1", int(port)


def _issuer(path: Path, env: str) -> SigningKey:
    import os

    pw = os.environ.get(env)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SentryConfigError(f"cannot read issuer key {path}: {exc.strerror}") from None
    return SigningKey.from_pem(data, pw.encode() if pw else None)


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


# ---------------------------------------------------------------------------- sentry


@click.group()
def cli() -> None:
    """The protected RPC edge: run a sentry, check its config."""


@cli.command("check")
@click.option("--config", "config_path", required=True,
              type=click.Path(dir_okay=False, exists=True, path_type=Path))
def check(config_path: Path) -> None:
    """Validate a sentry config and print its summary (JSON) with sanitizer policy digests."""
    from pqcnet.sentry.sanitizer import IdentitySanitizer

    cfg = load_config(config_path)
    p = cfg.policy
    click.echo(json.dumps({
        "listen": f"{cfg.listen_host}:{cfg.listen_port}",
        "backends": {n: {"kind": b.kind, "target": b.target, "tenants": list(b.tenants)}
                     for n, b in cfg.backends.items()},
        "tenants": sorted(p.issuers),
        "max_in_flight": p.max_in_flight,
        "sanitizer_policy_sha256": {t: d.hex() for t, d in
                                    IdentitySanitizer(p.sanitizer).digests().items()},
    }, indent=2))


@cli.command("run")
@click.option("--config", "config_path", required=True,
              type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Sentry YAML (see examples/sentry.yaml).")
@click.option("--reload-interval", default=1.0, show_default=True,
              help="Seconds between checks of the config file for hot reload.")
@click.option("--passphrase-env", default=PASS_ENV, show_default=True,
              help="Environment variable with the node key passphrase.")
@click.option("--no-passphrase", is_flag=True, help="The node key is stored unencrypted.")
def run(config_path: Path, reload_interval: float, passphrase_env: str,
        no_passphrase: bool) -> None:
    """Terminate QSTP tunnels and proxy admitted RPCs to the configured backends."""
    cfg = load_config(config_path)
    if cfg.identity_dir is None:
        raise SentryConfigError("config needs identity_dir (the sentry's node identity)")
    identity = NodeIdentity.load(cfg.identity_dir,
                                 passphrase(passphrase_env, no_passphrase, what="node key"))
    from pqcnet.sentry import loop

    loop.run(_run_sentry(cfg, identity, config_path, config_path.read_bytes(),
                         reload_interval))


async def _run_sentry(cfg: SentryConfig, identity: NodeIdentity, path: Path,
                      config_bytes: bytes, reload_interval: float) -> None:
    from pqcnet.sentry.attestation import LedgerAnchor, attestation_loop
    from pqcnet.sentry.core import Sentry
    from pqcnet.sentry.metrics import SentryMetrics
    from pqcnet.sentry.server import SentryServer

    metrics = SentryMetrics()
    anchor: LedgerAnchor | None = None
    ledger: Any = None
    if cfg.ledger_path is not None:
        from pqcnet.qsdag import Ledger

        ledger = Ledger.open(cfg.ledger_path)
        anchor = LedgerAnchor(ledger, identity.spiffe_id.node_id, identity.key,
                              config_bytes, metrics)
    sentry = Sentry(cfg, ledger=anchor, metrics=metrics)
    server = SentryServer(sentry, identity)
    port = await server.start()
    server.watch_config(path, reload_interval)
    tasks = []
    if anchor is not None:
        tasks.append(asyncio.create_task(attestation_loop(anchor, cfg.attestation_interval)))
    if cfg.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(cfg.metrics_port, addr="127.0.0.1", registry=metrics.registry)
    click.echo(f"sentry {identity.spiffe_id} listening on {cfg.listen_host}:{port}", err=True)
    try:
        await _until_signalled()
    finally:
        for t in tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await server.aclose()
        if ledger is not None:
            ledger.close()


# ---------------------------------------------------------------------------- assertion


@click.group("assertion")
def assertion_cli() -> None:
    """Session assertions: issuer keys, issue, inspect."""


@assertion_cli.command("keygen")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Private issuer key (PEM, PKCS#8; encrypted if the passphrase env is set).")
@click.option("--pub", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Public key (PEM) to list under issuers.<tenant> in the sentry config.")
@click.option("--passphrase-env", default=ISSUER_PASS_ENV, show_default=True)
def keygen(out: Path, pub: Path, passphrase_env: str) -> None:
    """Create a tenant issuer key pair (ML-DSA-65)."""
    import os

    from pqcnet.identity.keystore import atomic_write

    key = SigningKey.generate()
    pw = os.environ.get(passphrase_env)
    atomic_write(out, key.to_pem(pw.encode() if pw else None), mode=0o600)
    atomic_write(pub, verify_key_pem(key.public_key))
    click.echo(f"issuer key {key.key_id.hex()[:16]} -> {out}, public -> {pub}")


@assertion_cli.command("issue")
@click.option("--key", "key_path", required=True,
              type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--subject", required=True)
@click.option("--tenant", required=True)
@click.option("--channel-binding", required=True,
              help="Hex TLS exporter value of the tunnel the assertion is for.")
@click.option("--ttl", default=300.0, show_default=True, help="Lifetime in seconds.")
@click.option("--scope", "scopes", multiple=True, help="Scope (repeatable).")
@click.option("--passphrase-env", default=ISSUER_PASS_ENV, show_default=True)
def issue(key_path: Path, subject: str, tenant: str, channel_binding: str, ttl: float,
          scopes: tuple[str, ...], passphrase_env: str) -> None:
    """Sign an assertion and print it base64url (the x-pqcnet-assertion header value)."""
    try:
        cb = bytes.fromhex(channel_binding)
    except ValueError:
        raise click.BadParameter("--channel-binding must be hex") from None
    raw = sa.issue(_issuer(key_path, passphrase_env), subject=subject, tenant=tenant,
                   channel_binding=cb, now=time.time(), ttl=ttl, scopes=scopes)
    click.echo(sa.to_header(raw))


@assertion_cli.command("inspect")
@click.argument("token")
def inspect(token: str) -> None:
    """Decode an assertion WITHOUT verifying it and print its claims (JSON)."""
    a, _body, sig = sa.decode(sa.from_header(token.strip()))
    click.echo(json.dumps({
        "subject": a.subject, "tenant": a.tenant, "scopes": list(a.scopes),
        "session_id": a.session_id.hex(), "issued_at": a.issued_at,
        "expires_at": a.expires_at, "channel_binding": a.channel_binding.hex(),
        "issuer_key_id": a.issuer_key_id.hex(), "signature_bytes": len(sig),
    }, indent=2))


# ---------------------------------------------------------------------------- sidecar


@click.command("sidecar")
@click.option("--sentry", "sentry_addr", required=True, help="host:port of the sentry.")
@click.option("--identity-dir", required=True,
              type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--issuer-key", required=True,
              type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="The tenant's (delegated) issuer key used to mint per-tunnel assertions.")
@click.option("--tenant", required=True)
@click.option("--subject", required=True, help="Subject named in the assertions.")
@click.option("--mode", type=click.Choice(["http", "grpc", "tcp"]), default="http",
              show_default=True)
@click.option("--listen", default="127.0.0.1:8080", show_default=True,
              help="Local plaintext address (loopback only).")
@click.option("--tcp-backend", default=None, help="Sentry backend name for --mode tcp.")
@click.option("--ttl", default=300.0, show_default=True, help="Assertion lifetime, seconds.")
@click.option("--passphrase-env", default=PASS_ENV, show_default=True)
@click.option("--no-passphrase", is_flag=True, help="The node key is stored unencrypted.")
def sidecar_cli(sentry_addr: str, identity_dir: Path, issuer_key: Path, tenant: str,
                subject: str, mode: str, listen: str, tcp_backend: str | None, ttl: float,
                passphrase_env: str, no_passphrase: bool) -> None:
    """Let an unmodified local app reach a sentry over QSTP (plain localhost in, PQ out)."""
    host, port = _hostport(sentry_addr)
    lhost, lport = _hostport(listen)
    if lhost not in ("127.0.0.1", "localhost", "::1"):
        raise click.BadParameter("the sidecar's plaintext port must be on loopback")
    if mode == "tcp" and not tcp_backend:
        raise click.UsageError("--mode tcp needs --tcp-backend")
    identity = NodeIdentity.load(identity_dir,
                                 passphrase(passphrase_env, no_passphrase, what="node key"))
    issuer = _issuer(issuer_key, ISSUER_PASS_ENV)
    from pqcnet.sentry import loop

    loop.run(_run_sidecar(host, port, identity, issuer, tenant, subject, mode, lhost,
                          lport, tcp_backend, ttl))


async def _run_sidecar(host: str, port: int, identity: NodeIdentity, issuer: SigningKey,
                       tenant: str, subject: str, mode: str, lhost: str, lport: int,
                       tcp_backend: str | None, ttl: float) -> None:
    from pqcnet import qstp
    from pqcnet.sentry.sidecar import Sidecar, serve_grpc, serve_http, serve_tcp

    async def dial() -> Any:
        return await qstp.connect(host, port, identity)

    sidecar = Sidecar(dial, issuer, subject=subject, tenant=tenant, ttl=ttl)
    grpc_server: Any = None
    server: asyncio.Server | None = None
    if mode == "http":
        server = await serve_http(sidecar, lhost, lport)
        bound = server.sockets[0].getsockname()[1]
    elif mode == "grpc":
        grpc_server, bound = await serve_grpc(sidecar, lhost, lport)
    else:
        server = await serve_tcp(sidecar, str(tcp_backend), lhost, lport)
        bound = server.sockets[0].getsockname()[1]
    click.echo(f"sidecar ({mode}) on {lhost}:{bound} -> sentry {host}:{port}", err=True)
    try:
        await _until_signalled()
    finally:
        if server is not None:
            server.close()
        if grpc_server is not None:
            await grpc_server.stop(1.0)
        await sidecar.aclose()
