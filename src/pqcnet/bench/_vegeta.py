"""Open-loop HTTP load from vegeta, the load generator the benchmark peers use.

``pqcnet bench sentry`` measures latency *under load* with its own asyncio client
(:func:`pqcnet.bench.sentry._paced`) and, when ``scripts/services install`` has built
it (``PQCNET_VEGETA`` in ``.services/env``), again with vegeta: a Go program whose own
scheduling adds far less to the tail than a Python event loop sharing the two cores,
and a tool nobody on this team wrote. vegeta sends request *i* at ``t0 + i / rate``
from up to ``connections`` keep-alive connections and stamps each result with its
send time and latency; the results are read back as CSV (``vegeta encode``) so the
percentiles leave out the first :data:`WARMUP_S` seconds, as the asyncio client does
by connecting before its clock starts (a new connection's first request is not what
the half-load figure is about). When every connection is busy vegeta sends late, and
latency counts from the late send: ``achieved_rps`` below the offered rate says so.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import subprocess
from typing import Any

from pqcnet._util.orphans import ending_with_us
from pqcnet.bench._env import services_env
from pqcnet.bench._stats import percentiles

#: Results sent in the first WARMUP_S seconds (connections being opened) are not counted.
WARMUP_S = 0.25


def find() -> str | None:
    """The vegeta binary ``scripts/services install`` built, if any."""
    return services_env("PQCNET_VEGETA") or None


def target(port: int, body: bytes, headers: dict[str, str]) -> bytes:
    """One JSON target line (vegeta's ``-format=json``): POST /rpc on loopback."""
    return json.dumps({"method": "POST", "url": f"http://127.0.0.1:{port}/rpc",
                       "body": base64.b64encode(body).decode(),
                       "header": {k: [v] for k, v in headers.items()}}).encode() + b"\n"


def paced(exe: str, line: bytes, rate: float, seconds: float, connections: int
          ) -> dict[str, Any]:
    """Offer ``rate`` requests/s of ``line`` for ``seconds`` (open loop); latency
    percentiles in ms, the rate achieved and the failures (non-200 or transport error)."""
    attack = subprocess.run(ending_with_us(
        [exe, "attack", "-format=json", f"-rate={max(1, round(rate))}/s",
         f"-duration={seconds}s", f"-connections={connections}",
         f"-max-connections={connections}", f"-workers={connections}",
         f"-max-workers={connections}", "-keepalive=true", "-http2=false", "-timeout=30s"]),
        input=line, capture_output=True, check=True, timeout=seconds + 60)
    encoded = subprocess.run([exe, "encode", "-to=csv"], input=attack.stdout,
                             capture_output=True, check=True, timeout=60)
    rows = [(int(r[0]), int(r[1]), int(r[2])) for r in
            csv.reader(io.StringIO(encoded.stdout.decode())) if r]
    if not rows:
        raise RuntimeError("vegeta returned no results")
    start = min(r[0] for r in rows)
    # a run too short to spare its warm-up is counted whole
    kept = [r for r in rows if r[0] - start >= WARMUP_S * 1e9] or rows
    latencies_s = [r[2] / 1e9 for r in kept]
    span = (max(r[0] for r in kept) - min(r[0] for r in kept)) / 1e9 if len(kept) > 1 else 0
    pct = percentiles(latencies_s)
    return {"driver": "vegeta", "offered_rps": round(rate, 1),
            "achieved_rps": round((len(kept) - 1) / span, 1) if span else 0.0,
            "p50_ms": pct["p50_ms"], "p99_ms": pct["p99_ms"],
            "max_ms": round(max(latencies_s) * 1000, 3), "counted": pct["n"],
            "sent": len(rows),
            "errors": sum(1 for r in rows if r[1] != 200)}
