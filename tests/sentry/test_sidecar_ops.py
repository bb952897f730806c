"""``pqcnet sidecar --metrics-port``: /metrics, /healthz, /readyz of a real sidecar
process with a pool of a real sentry and a dead address, read from outside with an
HTTP client and cross-checked against the sentry's own metrics."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.ports import free_port
from tests.procs import terminate

from .harness import PQCNET, HttpBackend, cli_identities

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)


def _samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample at ``url``: (name, sorted labels) -> value."""
    text = httpx.get(url, timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def _value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
           **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _until(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout:g}s: {what}"
        time.sleep(0.1)


def _sidecar(d: Path, sentries: list[str], *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*PQCNET, "sidecar", *(f"--sentry={s}" for s in sentries), "--identity-dir",
         "acme-id", "--issuer-key", "acme-issuer.pem", "--tenant", "acme", "--subject",
         "alice", "--listen", f"127.0.0.1:{free_port()}", "--no-passphrase", *extra],
        cwd=d, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stderr=subprocess.PIPE,
        text=True)


def _stop(*procs: subprocess.Popen[str] | None) -> None:
    for p in procs:
        if p is not None:
            terminate(p)


def _line(stream: IO[str] | None) -> str:
    return stream.readline() if stream is not None else ""


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A sentry (metrics on) in front of a real HTTP backend, and a sidecar whose pool
    is that sentry plus an address nobody listens on."""
    d = tmp_path
    cli_identities(d)
    sentry_port, sentry_metrics, dead = free_port(), free_port(), free_port()
    with HttpBackend() as backend:
        cfg = yaml.safe_load((ROOT / "examples" / "sentry.yaml").read_text())
        cfg["listen"] = f"127.0.0.1:{sentry_port}"
        cfg["metrics_port"] = sentry_metrics
        cfg["backends"][0]["target"] = f"http://127.0.0.1:{backend.port}"
        (d / "sentry.yaml").write_text(yaml.safe_dump(cfg))
        sentry = subprocess.Popen([*PQCNET, "sentry", "run", "--config", "sentry.yaml",
                                   "--no-passphrase"], cwd=d, stderr=subprocess.PIPE,
                                  text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        sidecar = None
        try:
            assert "listening" in _line(sentry.stderr)
            live, down = f"127.0.0.1:{sentry_port}", f"127.0.0.1:{dead}"
            sidecar = _sidecar(d, [live, down], "--metrics-port", "0",
                               "--health-interval", "0.2")
            # the pool's first health pass may log the dead address before this line
            seen = [_line(sidecar.stderr)]
            while "sidecar (http)" not in seen[-1] and seen[-1] and len(seen) < 20:
                seen.append(_line(sidecar.stderr))
            m = re.search(r"sidecar \(http\) on 127\.0\.0\.1:(\d+) .*metrics on "
                          r"127\.0\.0\.1:(\d+)", seen[-1])
            assert m, seen
            yield {"sentry": sentry, "sidecar": sidecar, "live": live, "down": down,
                   "app": f"http://127.0.0.1:{m[1]}", "ops": f"http://127.0.0.1:{m[2]}",
                   "sentry_metrics": f"http://127.0.0.1:{sentry_metrics}/metrics"}
        finally:
            _stop(sidecar, sentry)


def test_round_trips_and_pool_state_agree_with_the_sentrys_own_count(
        stack: dict[str, Any]) -> None:
    ops, live, down = stack["ops"], stack["live"], stack["down"]
    _until("a sentry in rotation", lambda: httpx.get(f"{ops}/readyz").status_code == 200)
    _until("the dead address marked down", lambda: _value(
        _samples(f"{ops}/metrics"), "pqcnet_sidecar_sentry_up", sentry=down) == 0)
    for i in range(3):
        r = httpx.post(f"{stack['app']}/rpc", json={"id": i, "params": {}}, timeout=10)
        assert r.status_code == 200 and r.json()["id"] == i
    side = _samples(f"{ops}/metrics")
    assert _value(side, "pqcnet_sidecar_sentry_up", sentry=live) == 1
    assert _value(side, "pqcnet_sidecar_sentry_responses_total", sentry=live) == 3
    assert _value(side, "pqcnet_sidecar_sentry_responses_total", sentry=down) == 0
    assert _value(side, "pqcnet_sidecar_sentry_marked_down_total", sentry=down) >= 1
    assert _value(side, "pqcnet_sidecar_sentry_marked_down_total", sentry=live) == 0
    assert _value(side, "pqcnet_sidecar_sentry_outstanding_requests", sentry=live) == 0
    assert _value(side, "pqcnet_sidecar_failovers_total") == 0
    rt = "pqcnet_sidecar_sentry_round_trip_seconds"
    assert _value(side, f"{rt}_count", sentry=live) == 3
    assert _value(side, f"{rt}_count", sentry=down) == 0
    # the sentry counted the same three, and each hop's time is inside the one before
    sentry = _samples(stack["sentry_metrics"])
    whole = "pqcnet_sentry_request_duration_seconds"
    upstream = "pqcnet_sentry_upstream_duration_seconds"
    assert _value(sentry, f"{whole}_count", kind="http") == 3
    assert _value(sentry, f"{upstream}_count", backend="jsonrpc") == 3
    assert (_value(side, f"{rt}_sum", sentry=live) >= _value(sentry, f"{whole}_sum", kind="http")
            >= _value(sentry, f"{upstream}_sum", backend="jsonrpc") > 0)
    # the process's own families ride along on the same port
    assert any(name == "process_cpu_seconds_total" for name, _ in side)
    assert httpx.get(f"{ops}/healthz").status_code == 200


def test_readiness_fails_when_no_sentry_is_left_and_says_which(
        stack: dict[str, Any]) -> None:
    ops = stack["ops"]
    _until("a sentry in rotation", lambda: httpx.get(f"{ops}/readyz").status_code == 200)
    ready = httpx.get(f"{ops}/readyz").json()
    assert ready["checks"] == {"listening": True, "sentries": True, "identity": True}
    stack["sentry"].send_signal(signal.SIGKILL)
    stack["sentry"].wait()
    _until("not ready", lambda: httpx.get(f"{ops}/readyz").status_code == 503)
    checks = httpx.get(f"{ops}/readyz").json()["checks"]
    assert checks["sentries"] == f"no sentry in rotation: {stack['live']}, {stack['down']}"
    assert checks["listening"] is True and checks["identity"] is True
    r = httpx.post(f"{stack['app']}/rpc", json={"id": 1, "params": {}}, timeout=20)
    assert r.status_code == 502 and r.json()["error"] == "backend_error"
    side = _samples(f"{ops}/metrics")
    assert _value(side, "pqcnet_sidecar_sentry_up", sentry=stack["live"]) == 0
    assert _value(side, "pqcnet_sidecar_sentry_marked_down_total", sentry=stack["live"]) >= 1
    assert _value(side, "pqcnet_sidecar_sentry_responses_total", sentry=stack["live"]) == 0
    # liveness is the process, not its sentries: still 200
    assert httpx.get(f"{ops}/healthz").status_code == 200


@pytest.mark.parametrize("flag", ["--metrics-port", "--listen"])
def test_a_taken_port_is_a_one_line_error(tmp_path: Path, flag: str) -> None:
    cli_identities(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = [flag, f"127.0.0.1:{port}" if flag == "--listen" else str(port)]
        proc = _sidecar(tmp_path, [f"127.0.0.1:{free_port()}"], *args)
        try:
            _out, err = proc.communicate(timeout=60)
        finally:
            _stop(proc)
    assert proc.returncode == 1
    assert err.startswith(f"error: {flag} 127.0.0.1:{port}: "), err
    assert "address already in use" in err.lower() and "Traceback" not in err
