"""Stop, start and restart the real services from tests (outage and zero-loss tests).

Why a helper: relayer and mesh tests take Redis/Kafka down mid-stream and bring them
back, and their clients keep the address they were given. ``scripts/services`` keeps
each service's port and data across stop/start; this module calls it and checks that
promise, so a test never silently talks to a different (empty) instance.

    from tests import services_ctl
    services_ctl.restart("redis")   # same port, same data; raises if not
"""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "services"
ENV_FILE = ROOT / ".services" / "env"
#: Bound on one script call: Kafka's controlled shutdown plus start-up fit well inside.
CALL_TIMEOUT_S = 180.0

SERVICES = ("redis", "kafka", "waku")
_PORT_FILES = {
    "redis": ("redis/port",),
    "kafka": ("kafka/port", "kafka/controller-port"),
    "waku": tuple(f"waku/{i}/{kind}" for i in (1, 2, 3) for kind in ("rest-port", "tcp-port")),
}


class ServicesCtlError(Exception):
    """``scripts/services`` failed, or a service came back on a different port."""


def _check(name: str) -> None:
    if name not in SERVICES:
        raise ServicesCtlError(f"unknown service {name!r}; known: {', '.join(SERVICES)}")


def _run(*args: str) -> str:
    try:
        proc = subprocess.run(
            [str(SCRIPT), *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=CALL_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ServicesCtlError(f"scripts/services {' '.join(args)} timed out") from exc
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise ServicesCtlError(f"scripts/services {' '.join(args)} failed:\n{tail}")
    return proc.stderr


def ports(name: str) -> dict[str, int]:
    """The ports ``name`` is bound to (remembered under ``.services/``)."""
    _check(name)
    out: dict[str, int] = {}
    for rel in _PORT_FILES[name]:
        path = ROOT / ".services" / rel
        if path.exists():
            out[rel] = int(path.read_text().strip())
    return out


def env() -> dict[str, str]:
    """The variables in ``.services/env`` (only running services appear)."""
    result: dict[str, str] = {}
    if ENV_FILE.exists():
        for line in ENV_FILE.read_text().splitlines():
            line = line.removeprefix("export ").strip()
            if "=" in line and not line.startswith("#"):
                key, _, value = line.partition("=")
                result[key] = value
    return result


def stop(name: str) -> None:
    """Stop ``name``; its data and port are kept for the next start."""
    _check(name)
    _run("stop", name)


def start(name: str) -> None:
    """Start ``name`` (no-op if healthy) and wait until it is ready, on its old port."""
    _check(name)
    before = ports(name)
    _run("start", name)
    after = ports(name)
    if before and before != after:
        raise ServicesCtlError(f"{name} came back on different ports: {before} -> {after}")


def restart(name: str) -> None:
    """Stop and start ``name`` with the same port and the same data."""
    _check(name)
    before = ports(name)
    _run("restart", name)
    after = ports(name)
    if before and before != after:
        raise ServicesCtlError(f"{name} came back on different ports: {before} -> {after}")
