"""Idle CPU share (and Redis commands/s) of a bench-configured relayer (32 shards) on
Redis or Kafka, measured for benchmarks/README.md ("Redis relayer: where a paced
frame's Redis work goes"). Run from the repository with the services' env sourced:
``.venv/bin/python benchmarks/runs/2026-12-07-redis-paced-profile/idle.py 30 [kafka]``.
A third argument sets the relayer's ``idle_poll_timeout`` (benchmarks/README.md, "An
idle Redis relayer": ``idle.py 20 redis 0`` and ``idle.py 20 redis 2.0``, alternating)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pqcnet.bench._broker import drop_relayer_state
from pqcnet.bench._cpu import cpu_seconds
from pqcnet.bench.relayer import relayer_config, relayer_process
from pqcnet.identity import dev_identities

URL = os.environ["PQCNET_REDIS_URL"]
SECS = float(sys.argv[1]) if len(sys.argv) > 1 else 30
BACKEND = sys.argv[2] if len(sys.argv) > 2 else "redis"
BUS_URL = URL if BACKEND == "redis" else os.environ["PQCNET_KAFKA_BOOTSTRAP"]
IDLE: dict[str, Any] = {"idle_poll_timeout": float(sys.argv[3])} if len(sys.argv) > 3 else {}


def calls() -> dict[str, int]:
    """Every command Redis has run, per command (INFO commandstats, scripts' own calls
    included)."""
    out = subprocess.run(["redis-cli", "-u", URL, "INFO", "commandstats"],
                         capture_output=True, text=True, check=True).stdout
    return {m[0]: int(m[1]) for m in re.findall(r"cmdstat_(\S+?):calls=(\d+)", out)}


async def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        _, ids = dev_identities("pqcnet.bench", "spiffe://pqcnet.bench/b/relayer/r")
        ids[0].save(tmp / "ident", None)
        cfg = relayer_config(tmp, BACKEND, BUS_URL, shards=32, **IDLE)
        proc, ready = await relayer_process(cfg, 1)
        try:
            await asyncio.sleep(5)  # started and quiet
            c0, n0, t0 = sum(map(cpu_seconds, ready["pids"])), calls(), time.monotonic()
            await asyncio.sleep(SECS)
            c1, n1, t1 = sum(map(cpu_seconds, ready["pids"])), calls(), time.monotonic()
        finally:
            proc.terminate()
            await proc.wait()
        await drop_relayer_state(cfg)
    dt = t1 - t0
    per_s = {k: round((n - n0.get(k, 0)) / dt, 1) for k, n in n1.items() if n > n0.get(k, 0)}
    print(json.dumps({"backend": BACKEND, **IDLE, "cpu_share": round((c1 - c0) / dt, 4),
                      "redis_cmds_per_s": round(sum(per_s.values()), 1),
                      "by_command": per_s, "loadavg": os.getloadavg()}))


asyncio.run(main())
