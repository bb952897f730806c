"""``pqcnet sentry``, ``pqcnet assertion`` and ``pqcnet sidecar`` commands.

All three live here (``pqcnet/cli/assertion.py`` and ``pqcnet/cli/sidecar.py`` only
re-export) because they share loading of identities and issuer keys. Long-running
commands run until SIGINT/SIGTERM and shut down cleanly.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import click

from pqcnet._util.env import ISSUER_PASS_ENV, PASS_ENV, env_passphrase
from pqcnet.cli._common import hostport, passphrase, run_until_signalled
from pqcnet.cli._rotation import build_manager, rotation_options
from pqcnet.crypto.pqc import SigningKey
from pqcnet.identity import NodeIdentity
from pqcnet.sentry import assertion as sa
from pqcnet.sentry.config import check_file, load_config, require_identity, verify_key_pem
from pqcnet.sentry.errors import SentryConfigError


def _issuer(path: Path, env: str) -> SigningKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SentryConfigError(f"cannot read issuer key {path}: {exc.strerror}") from None
    return SigningKey.from_pem(data, env_passphrase(env))


# ---------------------------------------------------------------------------- sentry


@click.group()
def cli() -> None:
    """The protected RPC edge: run a sentry, check its config."""


@cli.command("check")
@click.option("--config", "config_path", required=True,
              type=click.Path(dir_okay=False, exists=True, path_type=Path))
def check(config_path: Path) -> None:
    """Validate a sentry config as `run` would; print its summary (JSON) with sanitizer
    policy digests (same as `pqcnet config check FILE --kind sentry`)."""
    click.echo(json.dumps(check_file(config_path), indent=2))


@cli.command("run")
@click.option("--config", "config_path", required=True,
              type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Sentry YAML (see examples/sentry.yaml).")
@click.option("--reload-interval", default=1.0, show_default=True,
              help="Seconds between checks of the config file for hot reload.")
@click.option("--passphrase-env", default=PASS_ENV, show_default=True,
              help="Environment variable with the node key passphrase.")
@click.option("--no-passphrase", is_flag=True, help="The node key is stored unencrypted.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Worker processes sharing the listen port (SO_REUSEPORT); token "
                   "buckets, the concurrency gate and tenant caps are shared between "
                   "them. Worker i serves its metrics on metrics_port + i.")
@rotation_options
def run(config_path: Path, reload_interval: float, passphrase_env: str,
        no_passphrase: bool, workers: int, **rotation: Any) -> None:
    """Terminate QSTP tunnels and proxy admitted RPCs to the configured backends.

    The identity directory is watched (hot reload); --renew-ca-url / --renew-ca-dir
    renew the certificate before it expires (single worker; with --workers N each
    worker loads the identity at start)."""
    from pqcnet.runtime.rotation import bind_sentry
    from pqcnet.runtime.sentry import SentryService

    cfg = load_config(config_path)
    secret = passphrase(passphrase_env, no_passphrase, what="node key")
    identity = NodeIdentity.load(require_identity(cfg), secret)
    if workers > 1:
        from pqcnet.cli._sentry_workers import run_workers

        run_workers(config_path, workers, secret, reload_interval)
        return
    manager = build_manager(Path(require_identity(cfg)), secret, **rotation)
    service = SentryService(cfg, identity, config_path=config_path,
                            reload_interval=reload_interval)

    async def start() -> SentryService:
        await service.start()
        await bind_sentry(service, manager)
        return service

    async def stop(s: SentryService) -> None:
        await manager.stop()
        await s.aclose()

    def ready(s: SentryService) -> None:
        click.echo(f"sentry {identity.spiffe_id} listening on {cfg.listen_host}:{s.port}",
                   err=True)

    run_until_signalled(start, stop, ready, fast_loop=True)


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
    from pqcnet.identity.keystore import atomic_write

    key = SigningKey.generate()
    atomic_write(out, key.to_pem(env_passphrase(passphrase_env)), mode=0o600)
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
@click.option("--sentry", "sentry_addrs", required=True, multiple=True,
              help="host:port of a sentry; repeat it (or separate with commas) for a pool: "
                   "health-checked, least-outstanding-requests, idempotent failover.")
@click.option("--identity-dir", required=True,
              type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--issuer-key", required=True,
              type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="The tenant's (delegated) issuer key used to mint per-tunnel assertions.")
@click.option("--tenant", required=True)
@click.option("--subject", required=True, help="Subject named in the assertions.")
@click.option("--mode", type=click.Choice(["http", "grpc", "tcp"]), default="http",
              show_default=True,
              help="http: HTTP/1.x, WebSocket upgrades included (ACL key 'WS /path'); "
                   "grpc: any gRPC method; tcp: raw bytes to --tcp-backend.")
@click.option("--listen", default="127.0.0.1:8080", show_default=True,
              help="Local plaintext address (loopback only).")
@click.option("--tcp-backend", default=None, help="Sentry backend name for --mode tcp.")
@click.option("--ttl", default=300.0, show_default=True, help="Assertion lifetime, seconds.")
@click.option("--health-interval", default=1.0, show_default=True,
              help="Seconds between health checks of the sentries (PING / re-dial).")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Serve /metrics, /healthz and /readyz (ready: listening, a sentry in "
                   "rotation, identity valid) on this port; 0 picks a free one (printed "
                   "at start). Off when not given.")
@click.option("--metrics-host", default="127.0.0.1", show_default=True,
              help="Address of the --metrics-port endpoint (0.0.0.0 in a container).")
@click.option("--passphrase-env", default=PASS_ENV, show_default=True)
@click.option("--no-passphrase", is_flag=True, help="The node key is stored unencrypted.")
@rotation_options
@click.option("--expect-peer", multiple=True, metavar="SPIFFE_ID",
              help="Pin the sentry: SPIFFE ID or per-segment glob the peer must present "
                   "(repeatable; default spiffe://<our trust domain>/*/sentry/*). Another "
                   "node, e.g. a relayer, is refused with a clear error.")
def sidecar_cli(sentry_addrs: tuple[str, ...], identity_dir: Path, issuer_key: Path,
                tenant: str, subject: str, mode: str, listen: str, tcp_backend: str | None,
                ttl: float, health_interval: float, metrics_port: int | None,
                metrics_host: str, passphrase_env: str, no_passphrase: bool,
                expect_peer: tuple[str, ...], **rotation: Any) -> None:
    """Let an unmodified local app reach a sentry over QSTP (plain localhost in, PQ out).

    The identity directory is watched and, with --renew-ca-url / --renew-ca-dir, renewed;
    new tunnels use the current identity, and a GOAWAY from the sentry makes the sidecar
    dial anew for new requests while open ones finish."""
    sentries = [hostport(a.strip(), param_hint="--sentry")
                for arg in sentry_addrs for a in arg.split(",") if a.strip()]
    if not sentries:
        raise click.BadParameter("no sentry address given", param_hint="--sentry")
    lhost, lport = hostport(listen, param_hint="--listen")
    if lhost not in ("127.0.0.1", "localhost", "::1"):
        raise click.BadParameter("the sidecar's plaintext port must be on loopback")
    if mode == "tcp" and not tcp_backend:
        raise click.UsageError("--mode tcp needs --tcp-backend")
    secret = passphrase(passphrase_env, no_passphrase, what="node key")
    identity = NodeIdentity.load(identity_dir, secret)
    issuer = _issuer(issuer_key, ISSUER_PASS_ENV)
    sidecar = _SidecarProcess(sentries, identity, issuer, tenant, subject, mode, lhost, lport,
                              tcp_backend, ttl, health_interval, expect_peer)
    sidecar.metrics_addr = None if metrics_port is None else (metrics_host, metrics_port)
    sidecar.manager = build_manager(identity_dir, secret, **rotation)
    run_until_signalled(sidecar.start, _SidecarProcess.aclose, _SidecarProcess.announce,
                        fast_loop=True)


class _SidecarProcess:
    """The sidecar command's service: a pool of :class:`Sidecar` (one per sentry) behind
    a local listener."""

    def __init__(self, sentries: list[tuple[str, int]], identity: NodeIdentity,
                 issuer: SigningKey, tenant: str, subject: str, mode: str, lhost: str,
                 lport: int, tcp_backend: str | None, ttl: float,
                 health_interval: float = 1.0, expect_peer: tuple[str, ...] = ()) -> None:
        self.sentries, self.identity = sentries, identity
        self.health_interval = health_interval
        self.expect_peer = expect_peer
        self.issuer, self.tenant, self.subject, self.ttl = issuer, tenant, subject, ttl
        self.mode, self.lhost, self.lport, self.tcp_backend = mode, lhost, lport, tcp_backend
        self.bound = 0
        self.sidecar: Any = None
        #: keeps the identity current (hot reload, renewal); None = load once
        self.manager: Any = None
        self.server: asyncio.Server | None = None
        self.grpc_server: Any = None
        #: (host, port) of /metrics, /healthz, /readyz; None = not served
        self.metrics_addr: tuple[str, int] | None = None
        self.ops: Any = None

    async def start(self) -> _SidecarProcess:
        from pqcnet._util.ops_http import start_ops_server
        from pqcnet.sentry.pool import SentryPool
        from pqcnet.sentry.sidecar import Sidecar, pinned_dial, serve_grpc, serve_http, serve_tcp
        from pqcnet.sentry.sidecar_metrics import SidecarMetrics

        if self.manager is not None:
            await self.manager.start()

        def dialer(host: str, port: int) -> Callable[[], Awaitable[Any]]:
            async def dial() -> Any:
                identity = self.manager.identity if self.manager is not None else self.identity
                return await pinned_dial(host, port, identity, self.expect_peer)()
            return dial

        self.sidecar = SentryPool(
            [(f"{h}:{p}", Sidecar(dialer(h, p), self.issuer, subject=self.subject,
                                  tenant=self.tenant, ttl=self.ttl))
             for h, p in self.sentries], interval=self.health_interval)
        self.sidecar.start()
        what = f"--listen {self.lhost}:{self.lport}"  # what a failing bind names
        try:
            if self.mode == "http":
                self.server = await serve_http(self.sidecar, self.lhost, self.lport)
            elif self.mode == "grpc":
                self.grpc_server, self.bound = await serve_grpc(self.sidecar, self.lhost,
                                                                self.lport)
            else:
                self.server = await serve_tcp(self.sidecar, str(self.tcp_backend), self.lhost,
                                              self.lport)
            if self.server is not None:
                self.bound = self.server.sockets[0].getsockname()[1]
            if self.metrics_addr is not None:
                host, port = self.metrics_addr
                what = f"--metrics-port {host}:{port}"
                self.ops = start_ops_server(port, host, ready=self.ready,
                                            registry=SidecarMetrics(self.sidecar).registry)
        except OSError as exc:  # the port is taken or not ours: a clear error, no traceback
            await self.aclose()
            raise SentryConfigError(f"{what}: {exc.strerror or exc}") from None
        except BaseException:
            await self.aclose()
            raise
        return self

    def ready(self) -> dict[str, bool | str]:
        """``/readyz``: listening, at least one sentry in rotation, identity valid."""
        from pqcnet._util.ops_http import not_expired

        members = self.sidecar.members
        identity = self.manager.identity if self.manager is not None else self.identity
        return {"listening": self.bound > 0 or "not listening",
                "sentries": any(m.healthy for m in members) or (
                    "no sentry in rotation: " + ", ".join(m.name for m in members)),
                "identity": not_expired(identity.not_after)}

    def announce(self) -> None:
        names = ", ".join(f"{h}:{p}" for h, p in self.sentries)
        ops = ("" if self.ops is None
               else f" (metrics on {self.ops.server_address[0]}:{self.ops.port})")
        click.echo(f"sidecar ({self.mode}) on {self.lhost}:{self.bound} -> sentry {names}"
                   f"{ops}", err=True)

    async def aclose(self) -> None:
        if self.ops is not None:
            self.ops.shutdown()
            self.ops.server_close()
            self.ops = None
        if self.manager is not None:
            await self.manager.stop()
        if self.server is not None:
            self.server.close()
        if self.grpc_server is not None:
            await self.grpc_server.stop(1.0)
        if self.sidecar is not None:
            await self.sidecar.aclose()
