"""A sentry + sidecar under constant open-loop load for many minutes ("let time pass").

Uses ``pqcnet bench sentry``'s own pieces: the backend, a one-worker sentry and a
sidecar as subprocesses, vegeta (from ``scripts/services``) offering a constant rate in
back-to-back windows. Per window: latency percentiles, failures, each process's CPU per
RPC and its RSS. A leak, a cache that fills or work that grows with uptime shows as a
trend across the windows. Usage::

    python long_run.py RATE WINDOW_S WINDOWS > out.json
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

from pqcnet.bench import _vegeta
from pqcnet.bench.sentry import (
    _RPC,
    _RPC_HEADERS,
    _CpuWatch,
    _pqcnet_stack,
    _wait_port,
    backend_main,
    free_port,
)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return -1.0


def main(rate: float, window: float, windows: int) -> None:
    vegeta = _vegeta.find()
    assert vegeta, "vegeta (scripts/services install nats)"
    ports = {k: free_port() for k in ("backend", "sentry", "sidecar")}
    backend = multiprocessing.get_context("spawn").Process(
        target=backend_main, args=(ports["backend"],), daemon=True)
    backend.start()
    out: dict[str, object] = {"rate": rate, "window_s": window,
                              "load_before": os.getloadavg()[0], "windows": []}
    with tempfile.TemporaryDirectory(prefix="pqcnet-sentry-long-") as tmp:
        _wait_port(ports["backend"])
        procs = _pqcnet_stack(Path(tmp), ports["backend"], ports["sentry"], ports["sidecar"])
        try:
            watch = {"sidecar": procs[0].pid, "sentry": procs[1].pid}
            line = _vegeta.target(ports["sidecar"], _RPC, _RPC_HEADERS)
            for i in range(windows):
                cpu = _CpuWatch(watch)
                got = _vegeta.paced(vegeta, line, rate, window, 32)
                got["cpu"] = cpu.per_rpc(got["sent"], busy=True)
                got["rss_mib"] = {n: rss_mib(p) for n, p in watch.items()}
                got["t"] = round(time.time())
                got["load"] = os.getloadavg()[0]
                out["windows"].append(got)  # type: ignore[attr-defined]
                print(i, got["p50_ms"], got["p99_ms"], got["errors"], got["cpu"],
                      got["rss_mib"], file=sys.stderr, flush=True)
        finally:
            for p in procs:
                p.terminate()
                p.wait(10)
            backend.terminate()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]))
