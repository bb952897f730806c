"""The operations endpoint every long-running role serves: /metrics, /healthz, /readyz
over a real socket, readiness flipping with the role's checks."""

from __future__ import annotations

import datetime as dt
import json
import urllib.error
import urllib.request

from prometheus_client import CollectorRegistry, Counter

from pqcnet._util.ops_http import not_expired, start_ops_server


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_metrics_healthz_readyz() -> None:
    registry = CollectorRegistry()
    Counter("pqcnet_test_things", "things", registry=registry).inc(3)
    state: dict[str, bool | str] = {"listening": True, "bus": "kafka unreachable"}
    httpd = start_ops_server(0, registry=registry, ready=lambda: state)
    try:
        code, body = _get(httpd.port, "/metrics")
        assert code == 200 and b"pqcnet_test_things_total 3.0" in body
        # the process-wide registry rides along: process internals and module-level
        # families (identity, QSTP) reach Prometheus through the one ops port
        assert b"\nprocess_resident_memory_bytes " in body, body[-2000:]
        assert b"\npython_gc_objects_collected_total{" in body
        assert body.count(b"# TYPE pqcnet_test_things_total") <= 1
        assert _get(httpd.port, "/healthz") == (200, b"ok\n")
        code, body = _get(httpd.port, "/readyz")
        assert code == 503
        assert json.loads(body) == {"ready": False, "checks": state}
        state["bus"] = True
        code, body = _get(httpd.port, "/readyz")
        assert code == 200 and json.loads(body)["ready"] is True
        assert _get(httpd.port, "/nope")[0] == 404
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_raising_check_is_not_ready() -> None:
    def boom() -> dict[str, bool | str]:
        raise RuntimeError("ledger closed")

    httpd = start_ops_server(0, ready=boom)
    try:
        code, body = _get(httpd.port, "/readyz")
        assert code == 503 and "ledger closed" in json.loads(body)["checks"]["check"]
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_not_expired() -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert not_expired(now + dt.timedelta(days=1), now) is True
    assert "expired" in str(not_expired(now - dt.timedelta(seconds=1), now))
