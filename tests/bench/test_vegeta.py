"""The vegeta driver of ``pqcnet bench sentry``'s half-load phase, against real sockets:
what it counts, what it leaves out, and that a failing path is not reported as fast."""

from __future__ import annotations

import multiprocessing
import socket

import pytest

from pqcnet.bench import _vegeta
from pqcnet.bench import sentry as bench_sentry
from tests.conftest import require_service

pytestmark = [pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def vegeta() -> str:
    return require_service("PQCNET_VEGETA", "vegeta (scripts/services install nats)")


def _line(port: int) -> bytes:
    return _vegeta.target(port, bench_sentry._RPC, bench_sentry._RPC_HEADERS)


def test_an_answering_backend_is_counted_after_the_warm_up(vegeta: str) -> None:
    port = bench_sentry.free_port()
    backend = multiprocessing.get_context("spawn").Process(
        target=bench_sentry.backend_main, args=(port,), daemon=True)
    backend.start()
    try:
        bench_sentry._wait_port(port)
        got = _vegeta.paced(vegeta, _line(port), rate=200, seconds=1.5, connections=4)
    finally:
        backend.terminate()
        backend.join(5)
    assert got["errors"] == 0
    # 300 requests offered; the first WARMUP_S seconds' (~50, fewer if vegeta ran late
    # on a busy machine) are not counted
    assert 200 <= got["counted"] < 300, got
    assert got["counted"] < got["sent"] <= 300, got  # every request sent, warm-up included
    assert 100 <= got["achieved_rps"] <= 300, got
    assert 0 < got["p50_ms"] <= got["p99_ms"] <= got["max_ms"]


def test_a_closed_port_is_all_errors(vegeta: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        got = _vegeta.paced(vegeta, _line(port), rate=50, seconds=1, connections=2)
    assert got["errors"] == 50, got  # refused requests are failures, never latencies


def test_a_run_shorter_than_the_warm_up_is_counted_whole(vegeta: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        got = _vegeta.paced(vegeta, _line(port), rate=20, seconds=0.2, connections=1)
    assert got["counted"] == got["sent"] == 4 and got["errors"] == 4, got

