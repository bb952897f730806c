"""Free loopback ports for servers the tests start (a race with other processes is
possible in principle; the ranges below keep it away from outgoing connections)."""

from __future__ import annotations

import random
import socket
from pathlib import Path


def free_port() -> int:
    """A port free on 127.0.0.1 now, below the kernel's ephemeral range (``port_run``):
    the kernel's own pick lay in that range, where any process's outgoing connection
    (three relayers connecting to Kafka and Redis at once) could take it before the
    server meant for it bound — a cluster test's relayer failed with EADDRINUSE so."""
    return port_run(0)


def port_run(n: int) -> int:
    """A port p with p+1..p+n free too (workers' own or metrics ports), below the
    kernel's ephemeral range: outgoing connections (to Redis, of any process) never
    take them."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(500):
        base = rng.randrange(max(1024, low - 12_000), low - n - 1)
        try:
            for k in range(n + 1):
                with socket.socket() as t:
                    t.bind(("127.0.0.1", base + k))
        except OSError:
            continue
        return base
    raise AssertionError("no run of free ports")
