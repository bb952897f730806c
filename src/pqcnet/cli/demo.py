"""``pqcnet demo`` (and ``make demo``): a first run a new user can watch.

It does real work on loopback with the embedded defaults: creates a mesh CA, issues
two node identities (ML-DSA-65 certificates with SPIFFE IDs), opens a QSTP tunnel
(TLS 1.3 hybrid ML-KEM key exchange, mutual ML-DSA auth), pushes data through it and
checks it came back intact, then reconnects with a session ticket.

The demo is a list of :data:`STEPS`; each step is an async function that takes the
shared :class:`DemoState`, prints its own part and leaves what later steps need on
the state. Later areas (ledger, relayer, sentry) append their steps here.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from pqcnet._util.signals import stopping

TRUST_DOMAIN = "demo.pqcnet"
RELAYER_ID = f"spiffe://{TRUST_DOMAIN}/acme/relayer/r1"
PUBLISHER_ID = f"spiffe://{TRUST_DOMAIN}/acme/publisher/p1"
CHUNK = 64 * 1024


@dataclass
class DemoState:
    """What the steps share; each step reads what earlier ones left."""

    workdir: Path
    megabytes: int
    ca: Any = None
    identities: dict[str, Any] = field(default_factory=dict)
    server: Any = None
    tunnel: Any = None
    session: Any = None
    results: dict[str, object] = field(default_factory=dict)


Step = Callable[[DemoState], Awaitable[None]]


def say(title: str, **facts: object) -> None:
    """Print one step's heading and its facts, aligned."""
    click.secho(f"\n== {title}", bold=True)
    for key, value in facts.items():
        click.echo(f"   {key:<22} {value}")


async def step_ca(state: DemoState) -> None:
    """Create the mesh CA (ML-DSA-65) and save it in the work directory."""
    from pqcnet.identity import MeshCA

    state.ca = MeshCA.create(TRUST_DOMAIN)
    state.ca.save(state.workdir / "ca", None)
    say("mesh CA created", trust_domain=TRUST_DOMAIN, signature="ML-DSA-65",
        saved_to=state.workdir / "ca")


async def step_identities(state: DemoState) -> None:
    """Issue one identity per node and save each (as `pqcnet ca issue` would)."""
    for name, sid in (("relayer", RELAYER_ID), ("publisher", PUBLISHER_ID)):
        ident = state.ca.issue(sid)
        ident.save(state.workdir / name, None)
        state.identities[name] = ident
    r, p = state.identities["relayer"], state.identities["publisher"]
    say("node identities issued", relayer=r.spiffe_id, publisher=p.spiffe_id,
        valid_until=r.not_after.isoformat(timespec="seconds"))


async def _echo(tunnel: Any) -> None:
    async def one(stream: Any) -> None:
        async for chunk in stream:
            await stream.send(chunk)
        await stream.close()

    tasks = [asyncio.create_task(one(s)) async for s in tunnel]
    await asyncio.gather(*tasks, return_exceptions=True)


async def step_tunnel(state: DemoState) -> None:
    """Serve QSTP on loopback as the relayer and connect as the publisher."""
    from pqcnet import qstp
    from pqcnet.qstp.aio import client_context
    from pqcnet.qstp.tls import TlsPolicy

    state.server = await qstp.serve(_echo, "127.0.0.1", 0, state.identities["relayer"])
    client_context(state.identities["publisher"], TlsPolicy())  # load keys before timing
    started = time.perf_counter()
    state.tunnel = await qstp.connect("127.0.0.1", state.server.port,
                                      state.identities["publisher"])
    elapsed = time.perf_counter() - started
    peer = state.tunnel.peer
    state.results.update(group=peer.group, handshake_ms=round(elapsed * 1000, 2))
    say("QSTP tunnel open", listening=f"127.0.0.1:{state.server.port}",
        tls=peer.tls_version, group=peer.group, cipher=peer.cipher,
        local_id=state.identities["publisher"].spiffe_id, peer_id=peer.spiffe_id,
        post_quantum="yes" if peer.post_quantum else "NO",
        handshake=f"{elapsed * 1000:.1f} ms")


async def step_push(state: DemoState) -> None:
    """Push data through the tunnel, read the echo back, compare SHA-256."""
    total = state.megabytes * 1024 * 1024
    stream = state.tunnel.open_stream()
    sent_hash, got_hash = hashlib.sha256(), hashlib.sha256()
    block = os.urandom(CHUNK)
    received = 0

    async def writer() -> None:
        for _ in range(total // CHUNK):
            sent_hash.update(block)
            await stream.send(block)
        await stream.close()

    started = time.perf_counter()
    task = asyncio.create_task(writer())
    with tqdm(total=total, unit="B", unit_scale=True, desc="echo through QSTP",
              leave=False) as bar:
        async for chunk in stream:
            got_hash.update(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    await task
    elapsed = time.perf_counter() - started
    intact = received == total and sent_hash.digest() == got_hash.digest()
    if not intact:
        raise click.ClickException("echoed data differs from what was sent")
    gbit = total * 2 * 8 / elapsed / 1e9  # both directions crossed the tunnel
    state.results.update(bytes=total, intact=intact, gbit_s=round(gbit, 3))
    say("data pushed through the tunnel", sent=f"{state.megabytes} MiB",
        echoed_back="intact (SHA-256 match)", time=f"{elapsed:.2f} s",
        throughput=f"{gbit:.2f} Gbit/s (both directions)")


async def step_resume(state: DemoState) -> None:
    """Close and reconnect with the TLS 1.3 session ticket (no certificate signing)."""
    from pqcnet import qstp

    state.session = state.tunnel.session
    await state.tunnel.close()
    started = time.perf_counter()
    again = await qstp.connect("127.0.0.1", state.server.port, state.identities["publisher"],
                               session=state.session)
    elapsed = time.perf_counter() - started
    state.results.update(resumed=again.resumed)
    say("reconnected with a session ticket", resumed="yes" if again.resumed else "no",
        handshake=f"{elapsed * 1000:.1f} ms", rtt=f"{await again.ping() * 1000:.2f} ms")
    await again.close()


async def step_shutdown(state: DemoState) -> None:
    """Stop the server."""
    if state.server is not None:
        state.server.close()
        await state.server.wait_closed()
    say("done", workdir=state.workdir)


from pqcnet.cli._network_demo import step_network  # noqa: E402
from pqcnet.cli._relayer_demo import step_relayer  # noqa: E402

STEPS: list[Step] = [step_ca, step_identities, step_tunnel, step_push, step_resume,
                     step_relayer, step_network,
                     step_shutdown]


async def run_steps(state: DemoState, steps: list[Step] | None = None) -> DemoState:
    """Run ``steps`` (default :data:`STEPS`) in order; always stop the server."""
    try:
        for step in steps or STEPS:
            await step(state)
    finally:
        if state.server is not None:
            state.server.close()
            await state.server.wait_closed()
    return state


@click.command()
@click.option("--megabytes", default=64, show_default=True, type=click.IntRange(1, 4096),
              help="Data to push through the tunnel.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the CA and identities here (default: a temporary directory).")
def cli(megabytes: int, workdir: Path | None) -> None:
    """Run the end-to-end demo on loopback with the embedded backends."""
    # SIGINT / SIGTERM: the servers stop and the temporary directory (the demo CA's
    # private key among its files) is removed, as after a finished run
    with stopping("pqcnet demo"):
        if workdir is not None:
            workdir.mkdir(parents=True, exist_ok=True)
            asyncio.run(run_steps(DemoState(workdir, megabytes)))
            return
        with tempfile.TemporaryDirectory(prefix="pqcnet-demo-") as tmp:
            asyncio.run(run_steps(DemoState(Path(tmp), megabytes)))
