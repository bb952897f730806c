"""``pqcnet qstp serve|connect``: the ``openssl s_server`` / ``s_client`` of pqcnet.

Both ends print what a handshake negotiated (TLS version, group, cipher, peer SPIFFE
ID, certificate expiry, resumption) so an operator can check a link by hand. A
refused handshake exits non-zero with the reason on one line (``error: ...``).
Identities are directories written by ``NodeIdentity.save`` (``pqcnet ca issue``).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import click

from pqcnet._util.env import PASS_ENV
from pqcnet.cli._common import hostport, load_identity
from pqcnet.cli._rotation import build_manager, rotation_options
from pqcnet.errors import PqcnetError
from pqcnet.qstp.errors import HandshakeError

GROUP_POLICIES = ("hybrid", "strict", "classical-allowed")


def _policy(groups: str, allow_peer: tuple[str, ...]) -> Any:
    from pqcnet.qstp.tls import TlsPolicy

    return TlsPolicy(groups=groups, allowed_peers=allow_peer)  # type: ignore[arg-type]


def describe(peer: Any, *, rtt: float | None = None) -> dict[str, object]:
    """The handshake facts both commands print."""
    out: dict[str, object] = {
        "tls_version": peer.tls_version,
        "group": peer.group,
        "cipher": peer.cipher,
        "alpn": peer.alpn,
        "peer": str(peer.spiffe_id),
        "peer_cert_not_after": peer.cert_not_after.isoformat(),
        "resumed": bool(peer.resumed),
    }
    if rtt is not None:
        out["rtt_ms"] = round(rtt * 1000, 3)
    return out


def _emit(info: dict[str, object], as_json: bool, title: str) -> None:
    if as_json:
        click.echo(json.dumps({"event": title, **info}), nl=True)
        return
    click.echo(f"-- {title}")
    for key, value in info.items():
        shown = ("yes" if value else "no") if isinstance(value, bool) else value
        click.echo(f"{key:>20}: {shown}")


identity_option = click.option(
    "--identity", "identity_dir", required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Identity directory (written by `pqcnet ca issue --out DIR`).")
passphrase_option = click.option(
    "--passphrase-env", default=PASS_ENV, show_default=True,
    help="Environment variable holding the node key passphrase (unset: key unencrypted).")
groups_option = click.option(
    "--groups", type=click.Choice(GROUP_POLICIES), default="hybrid", show_default=True,
    help="Key-exchange group policy.")
allow_option = click.option(
    "--allow-peer", multiple=True,
    help="Allowed peer SPIFFE ID or glob (repeat); default: any ID in our trust domain.")
json_option = click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")


@click.group()
def cli() -> None:
    """QSTP diagnostics: a test server and a test client."""


@cli.command()
@identity_option
@passphrase_option
@groups_option
@allow_option
@json_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=4433, show_default=True, type=click.IntRange(0, 65535),
              help="TCP port (0: pick a free one and print it).")
@click.option("--echo/--no-echo", default=True, show_default=True,
              help="Echo every stream back (otherwise read and discard).")
@click.option("--count", default=0, type=click.IntRange(0), show_default=True,
              help="Exit after this many tunnels have ended (0: run until interrupted).")
@rotation_options
def serve(identity_dir: Path, passphrase_env: str, groups: str, allow_peer: tuple[str, ...],
          as_json: bool, host: str, port: int, echo: bool, count: int, **rotation: Any) -> None:
    """Accept QSTP tunnels and print what each handshake negotiated.

    The identity directory is watched: a certificate re-issued into it is served from
    the next handshake on (tunnels of the old one get a GOAWAY before it expires);
    with --renew-ca-url / --renew-ca-dir the server renews its own certificate."""
    from pqcnet._util.env import env_passphrase

    identity = load_identity(identity_dir, passphrase_env)
    manager = build_manager(identity_dir, env_passphrase(passphrase_env), **rotation)
    policy = _policy(groups, allow_peer)
    try:
        asyncio.run(_serve(identity, policy, host, port, echo, count, as_json, manager))
    except KeyboardInterrupt:
        click.echo("stopped", err=True)


async def _serve(identity: Any, policy: Any, host: str, port: int, echo: bool, count: int,
                 as_json: bool, manager: Any = None) -> None:
    from pqcnet import qstp
    from pqcnet.qstp.aio import Stream, Tunnel

    finished = asyncio.Event()
    ended = 0

    async def one(stream: Stream) -> None:
        async for chunk in stream:
            if echo:
                await stream.send(chunk)
        await stream.close()

    async def handler(tunnel: Tunnel) -> None:
        nonlocal ended
        _emit(describe(tunnel.peer), as_json, "tunnel")
        tasks = []
        try:
            async for stream in tunnel:
                tasks.append(asyncio.create_task(one(stream)))
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            ended += 1
            if count and ended >= count:
                finished.set()

    try:
        server = await qstp.serve(handler, host, port, identity, policy)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: "
                                   f"{exc.strerror or exc}") from None
    _emit({"listening": f"{host}:{server.port}", "identity": str(identity.spiffe_id),
           "groups": policy.groups}, as_json, "listening")
    binding = None
    if manager is not None:
        from pqcnet.runtime.rotation import ServerBinding

        async def announce(new: Any, certificate_changed: bool) -> None:
            _emit({"identity": str(new.spiffe_id), "serial": format(new.serial, "x"),
                   "not_after": new.not_after.isoformat(),
                   "certificate_changed": certificate_changed}, as_json, "identity")

        binding = ServerBinding(server, manager)
        manager.on_change(announce)
        await manager.start()
        await binding.start()
    try:
        await finished.wait()
    finally:
        if manager is not None and binding is not None:
            await binding.stop()
            await manager.stop()
        server.close()
        await server.wait_closed()


@cli.command()
@click.argument("target")
@identity_option
@passphrase_option
@groups_option
@allow_option
@json_option
@click.option("--send", "message", default=None,
              help="Send this text on a stream and print the reply (needs a --echo server).")
@click.option("--resume", is_flag=True,
              help="Reconnect with the session ticket and report whether it resumed.")
@click.option("--timeout", default=10.0, show_default=True, type=click.FloatRange(0.1),
              help="Handshake timeout in seconds.")
def connect(target: str, identity_dir: Path, passphrase_env: str, groups: str,
            allow_peer: tuple[str, ...], as_json: bool, message: str | None, resume: bool,
            timeout: float) -> None:
    """Open a QSTP tunnel to TARGET (HOST:PORT) and print the negotiated parameters."""
    host, port = hostport(target, param_hint="TARGET")
    identity = load_identity(identity_dir, passphrase_env)
    policy = _policy(groups, allow_peer)
    asyncio.run(_connect(identity, policy, host, port, message, resume, timeout, as_json))


async def _connect(identity: Any, policy: Any, host: str, port: int, message: str | None,
                   resume: bool, handshake_timeout: float, as_json: bool) -> None:
    from pqcnet import qstp
    from pqcnet.qstp.aio import client_context
    from pqcnet.qstp.config import QstpConfiguration

    config = QstpConfiguration(handshake_timeout=handshake_timeout)
    client_context(identity, policy)  # load keys now so handshake_ms is the handshake
    session = None
    for attempt in range(2 if resume else 1):
        started = time.perf_counter()
        try:
            tunnel = await qstp.connect(host, port, identity, policy, config=config,
                                        session=session)
        except HandshakeError as exc:
            raise HandshakeError(f"handshake with {host}:{port} refused: {exc}") from None
        elapsed = time.perf_counter() - started
        try:
            rtt = await tunnel.ping()
            info = describe(tunnel.peer, rtt=rtt)
            info["handshake_ms"] = round(elapsed * 1000, 3)
            _emit(info, as_json, "resumed connection" if attempt else "connection")
            if message is not None:
                stream = tunnel.open_stream()
                await stream.send(message.encode(), end=True)
                reply = await stream.read_all(1 << 20)
                _emit({"sent": message, "reply": reply.decode(errors="replace")}, as_json,
                      "echo")
            session = tunnel.session
        except PqcnetError:
            await tunnel.close()
            raise
        await tunnel.close()
    if resume and session is None:
        raise HandshakeError("server issued no session ticket; cannot resume")
