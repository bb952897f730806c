"""A benchmark's server side in a second process, with a throw-away identity pair.

Why a second process: on a small machine a benchmark that runs its server in the
client's event loop measures one core doing both halves; real deployments have them
in different processes. Spawned (not forked), so the child starts clean.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pqcnet._util.orphans import die_with_parent

#: How long the child may take to import pqcnet, load keys and listen.
START_TIMEOUT_S = 120


def save_identities(root: Path, passphrase: bytes, server: str, client: str) -> None:
    """A dev CA's server and client identities, saved under ``root/server`` and
    ``root/client`` (SPIFFE ids ``.../relayer/<server>`` and ``.../publisher/<client>``)."""
    from pqcnet.identity import dev_identities

    _ca, (s, c) = dev_identities("bench.test", f"spiffe://bench.test/bench/relayer/{server}",
                                 f"spiffe://bench.test/bench/publisher/{client}")
    s.save(root / "server", passphrase)
    c.save(root / "client", passphrase)


def _ending_with_us(target: Callable[[str, Any], None], root: str, ports: Any) -> None:
    die_with_parent()
    target(root, ports)


@contextlib.contextmanager
def spawned(target: Callable[[str, Any], None], root: Path) -> Iterator[Any]:
    """Run ``target(str(root), queue)`` in a spawned process; yield the first thing
    it puts on the queue (its ports); stop it on exit."""
    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    proc = ctx.Process(target=_ending_with_us, args=(target, str(root), ports), daemon=True)
    proc.start()
    try:
        yield ports.get(timeout=START_TIMEOUT_S)
    finally:
        proc.terminate()
        proc.join(10)
