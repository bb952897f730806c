"""Shared fixtures. Real services come from ``scripts/services`` via ``.services/env``.

A test that needs Redis/Kafka/Waku asks for the matching fixture. When the service
is not running the test is skipped — unless ``PQCNET_REQUIRE_SERVICES=1`` (CI),
where a missing service is a failure, never a skip.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

# Imported up front on purpose: otherwise hypothesis's pytest plugin imports it lazily
# in the terminal summary, and pytest's assertion rewriter calls ast.parse then. On
# CPython 3.11 the AST converter keeps its recursion counter per interpreter, so a
# garbage-collection finaliser that formats a traceback (3.11 tracebacks ast.parse
# the failing line) in the middle of that parse trips "SystemError: AST constructor
# recursion depth mismatch" and pytest exits 1 after every test passed.
import hypothesis  # noqa: F401
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _services_env() -> dict[str, str]:
    env: dict[str, str] = {}
    path = ROOT / ".services" / "env"
    if path.exists():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line.startswith("export "):
                line = line[len("export "):]
            if "=" in line and not line.startswith("#"):
                key, _, value = line.partition("=")
                env[key.strip()] = value.strip().strip('"').strip("'")
    env.update({k: v for k, v in os.environ.items() if k.startswith("PQCNET_")})
    return env


def require_service(var: str, what: str) -> str:
    """Return the service address in ``var`` or skip/fail as the run demands."""
    value = _services_env().get(var, "")
    if value:
        return value
    msg = f"{what} not running ({var} unset; start it with `scripts/services start`)"
    if os.environ.get("PQCNET_REQUIRE_SERVICES") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """``redis://127.0.0.1:<port>/0`` of the test Redis."""
    return require_service("PQCNET_REDIS_URL", "Redis")


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """``127.0.0.1:<port>`` of the test Kafka broker."""
    return require_service("PQCNET_KAFKA_BOOTSTRAP", "Kafka")


@pytest.fixture(scope="session")
def waku_rest_urls() -> list[str]:
    """REST base URLs of the go-waku nodes (comma-separated in the env)."""
    return require_service("PQCNET_WAKU_REST_URLS", "go-waku").split(",")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Run pending finalisers now, not in the middle of the summary's imports."""
    gc.collect()
