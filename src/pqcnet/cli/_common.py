"""What every ``pqcnet`` command shares: address and passphrase options, identity
loading, and the one runner of long-lived services.

:func:`run_until_signalled` is how ``relayer run``, ``sentry run``, ``sidecar`` and
``node run`` live: signal handlers first (a SIGTERM during start-up still stops the
process cleanly), start the service, announce it, wait for SIGINT/SIGTERM, stop it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
import multiprocessing.process
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import click

from pqcnet._util.env import PASS_ENV, env_passphrase
from pqcnet._util.schema import split_hostport
from pqcnet._util.signals import STOP_SIGNALS
from pqcnet.identity import NodeIdentity
from pqcnet.identity.errors import IdentityError, PassphraseRequired

S = TypeVar("S")


def hostport(value: str, *, param_hint: str | None = None) -> tuple[str, int]:
    """``host:port`` from the command line (``:7400`` means 127.0.0.1; ``[::1]:7400``
    is IPv6), or a usage error naming the option."""
    try:
        host, port = split_hostport(value, default_host="127.0.0.1")
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=param_hint) from None
    return host.strip("[]"), port


def passphrase(env: str, no_passphrase: bool, *, what: str, confirm: bool = False) -> bytes | None:
    """Passphrase from ``$env``, else a hidden prompt; None when ``no_passphrase``."""
    if no_passphrase:
        return None
    value = env_passphrase(env)
    if value is None:
        value = click.prompt(f"{what} passphrase (or set ${env})", hide_input=True,
                             confirmation_prompt=confirm).encode()
    if not value:
        raise click.BadParameter(f"empty {what} passphrase (use --no-passphrase for none)")
    return value


def load_identity(directory: Path, passphrase_env: str = PASS_ENV) -> NodeIdentity:
    """A node identity whose key passphrase (if any) is in ``$passphrase_env``; a failure
    says whether that variable was set."""
    secret = env_passphrase(passphrase_env)
    try:
        return NodeIdentity.load(directory, secret)
    except IdentityError as exc:
        # only an encrypted key without a passphrase gets the hint; a missing or bad
        # file is named by the error itself (e.g. "trust bundle file not found: ...")
        hint = f" (set ${passphrase_env})" if isinstance(exc, PassphraseRequired) else ""
        raise IdentityError(f"cannot load identity from {directory}: {exc}{hint}") from None


#: young-generation threshold of a serving hot-path process (CPython's default is 700):
#: the relayer allocates a few short-lived objects per frame, the sentry and sidecar per
#: RPC, so at 700 a young collection ran every ~150 frames and promoted in-flight
#: objects into older generations
GC_YOUNG_THRESHOLD = 20_000


def tune_gc() -> None:
    """Once a hot-path process has started: move everything allocated so far (modules,
    config, identity, the service's own structures) out of the collector's reach with
    ``gc.freeze()`` — none of it is garbage, yet every full collection walked it — and
    collect the young generation less often. Cycles are still collected."""
    gc.collect()
    gc.freeze()
    _, g1, g2 = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, g1, g2)


def run_until_signalled(start: Callable[[], Awaitable[S]], stop: Callable[[S], Awaitable[None]],
                        ready: Callable[[S], None] = lambda _s: None, *,
                        fast_loop: bool = False) -> None:
    """Run ``start()``; call ``ready(service)``; serve until SIGINT/SIGTERM; ``stop``.

    ``start`` must clean up after itself if it fails. ``fast_loop`` is for services on
    a per-frame or per-RPC hot path (relayer, sentry, sidecar): they run on uvloop when
    available (see :mod:`pqcnet._util.loop`) and get :func:`tune_gc` once serving.
    """

    async def main() -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, stopping.set)
        try:
            service = await start()
            try:
                if fast_loop:
                    tune_gc()
                ready(service)
                await stopping.wait()
            finally:
                await stop(service)
        finally:
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)

    if fast_loop:
        from pqcnet._util import loop as fast

        fast.run(main())
    else:
        asyncio.run(main())


__all__ = ["STOP_SIGNALS", "hostport", "load_identity", "passphrase", "run_until_signalled"]


def worker_metrics_port(port: int | None, index: int) -> int | None:
    """Worker ``index``'s metrics port under ``--workers N``: ``port + index`` (stable
    across restarts, so scrape targets stay right); ``0`` and None stay as they are
    (a role's own meaning: any free port, or none)."""
    return port if not port else port + index


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound, non-listening SO_REUSEPORT socket a ``--workers`` supervisor holds: the
    port is the workers' (``port`` 0 picks a free one, read back from the socket)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((host, port))
    return s


#: A worker that ran this long before it died is restarted at once (a fresh streak).
STABLE_S = 60.0
#: The wait before restarting a worker that died again within STABLE_S of its start;
#: it doubles with each such death, up to RESTART_MAX_S.
RESTART_FIRST_S = 0.5
RESTART_MAX_S = 30.0


class Respawner:
    """Restarts the dead workers of a ``--workers`` supervisor (call :meth:`poll`
    every few tenths of a second), backing off when they die again soon: a death after
    ``STABLE_S`` of running is restarted at once; each death within ``STABLE_S`` of the
    worker's (re)start doubles the wait (0.5 s, 1 s, 2 s … 30 s). A worker that cannot
    start — a full disk, a key it cannot read — is so not respawned five times a
    second for ever, spending the cores its siblings serve with. ``on_death(i)`` runs
    as soon as worker ``i`` is found dead (the sentry frees its gate slots there)."""

    def __init__(self, role: str, procs: dict[int, Any], spawn: Callable[[int], Any], *,
                 on_death: Callable[[int], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.role, self.procs, self._spawn, self._on_death = role, procs, spawn, on_death
        self._clock = clock
        now = clock()
        self._started = dict.fromkeys(procs, now)
        self._streak = dict.fromkeys(procs, 0)
        #: worker -> when it is to be started again
        self.due: dict[int, float] = {}

    def poll(self) -> None:
        """Note the workers that died since the last call; start those whose wait
        is over."""
        now = self._clock()
        for i, p in self.procs.items():
            if i in self.due or p.is_alive():
                continue
            soon = now - self._started[i] < STABLE_S
            streak = self._streak[i] = self._streak[i] + 1 if soon else 1
            delay = 0.0 if streak == 1 else min(RESTART_MAX_S,
                                                RESTART_FIRST_S * 2 ** (streak - 2))
            self.due[i] = now + delay
            if self._on_death is not None:
                self._on_death(i)
            when = "now" if not delay else f"in {delay:g} s ({streak} quick exits in a row)"
            click.echo(f"{self.role} worker {i} exited ({p.exitcode}); restarting {when}",
                       err=True)
        for i, at in list(self.due.items()):
            if now >= at:
                del self.due[i]
                self.procs[i] = self._spawn(i)
                self._started[i] = self._clock()


def stop_workers(procs: Iterable[multiprocessing.process.BaseProcess], timeout: float) -> None:
    """SIGTERM every live worker process, give them ``timeout`` seconds together to
    finish, then SIGKILL the rest (the supervisors of ``sentry/relayer run --workers``)."""
    procs = list(procs)
    for p in procs:
        if p.is_alive() and p.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
    end = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(5)
