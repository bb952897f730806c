"""The ``scripts/services`` contract other areas rely on, and its probes.

``.services/env`` lines must be exactly the documented ``export`` forms; bad
arguments are refused with exit status 2 and one line; the stdlib probes in
``tools/probe.py`` say "ready" for the real services and "not ready" (fast, one line)
for a closed port — the readiness checks are only as good as that distinction.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests import services_ctl

pytestmark = [pytest.mark.timeout(60)]

PROBE = [sys.executable, str(services_ctl.ROOT / "tools" / "probe.py")]
ENV_LINE = re.compile(
    r"export PQCNET_REDIS_URL=redis://127\.0\.0\.1:\d+/0"
    r"|export PQCNET_KAFKA_BOOTSTRAP=127\.0\.0\.1:\d+"
    r"|export PQCNET_WAKU_REST_URLS=http://127\.0\.0\.1:\d+(,http://127\.0\.0\.1:\d+){2}"
    r"|export SOFTHSM2_CONF=/\S+/\.services/softhsm/softhsm2\.conf"
    r"|export PQCNET_PKCS11_MODULE=/\S+\.so"
    r"|export PQCNET_PKCS11_TOKEN=pqcnet-test"
    r"|export PQCNET_PKCS11_PIN=[0-9a-f]{24}"
    r"|export PQCNET_NATS_URL=tls://127\.0\.0\.1:\d+"
    r"|export PQCNET_NATS_CA=/\S+/\.services/nats/tls/cert\.pem"
    r"|export PQCNET_NATS_CLI=/\S+/nats"
    r"|export PQCNET_NATS_PID_FILE=/\S+/\.services/nats/pid"
    r"|export PQCNET_VEGETA=/\S+/vegeta"
)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(services_ctl.SCRIPT), *args], capture_output=True, text=True, timeout=30, check=False
    )


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_env_file_lines_follow_the_contract() -> None:
    out = _run("env")
    assert out.returncode == 0
    for line in out.stdout.splitlines():
        if line and not line.startswith("#"):
            assert ENV_LINE.fullmatch(line), line


def test_status_names_every_service() -> None:
    out = _run("status")
    assert out.returncode == 0
    names = [line.split(":")[0] for line in out.stdout.splitlines()]
    assert names == ["redis", "kafka", "waku", "softhsm", "nats"]


@pytest.mark.parametrize("args", [("start", "postgres"), ("stop", "redis", "nope"), ("restart",)])
def test_bad_arguments_are_refused(args: tuple[str, ...]) -> None:
    out = _run(*args)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1
    assert out.stderr.startswith("services: ")


def test_ctl_rejects_unknown_service() -> None:
    with pytest.raises(services_ctl.ServicesCtlError, match="unknown service"):
        services_ctl.restart("postgres")


def test_probes_fail_fast_on_a_closed_port() -> None:
    port = _closed_port()
    for args in (
        ["kafka", f"127.0.0.1:{port}"],
        ["waku-peers", f"http://127.0.0.1:{port}"],
        ["waku-relay", f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}"],
    ):
        out = subprocess.run([*PROBE, *args, "--timeout", "0"], capture_output=True, text=True,
                             timeout=20, check=False)
        assert out.returncode == 1, args
        assert out.stderr.startswith("not ready after 0s:"), out.stderr


@pytest.mark.services
def test_kafka_probe_sees_the_broker(kafka_bootstrap: str) -> None:
    out = subprocess.run([*PROBE, "kafka", kafka_bootstrap, "--timeout", "10"],
                         capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr


@pytest.mark.services
def test_waku_probes_see_the_peered_nodes(waku_rest_urls: list[str]) -> None:
    first, last = waku_rest_urls[0], waku_rest_urls[-1]
    for args in (["waku-peers", first, "--min", "2"], ["waku-relay", last, first]):
        out = subprocess.run([*PROBE, *args, "--timeout", "20"], capture_output=True, text=True,
                             timeout=40, check=False)
        assert out.returncode == 0, out.stderr
    ma = subprocess.run([*PROBE, "waku-multiaddr", first], capture_output=True, text=True,
                        timeout=20, check=False)
    assert re.fullmatch(r"/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+\n", ma.stdout), ma.stdout


def _probe_module() -> object:
    import importlib.util

    spec = importlib.util.spec_from_file_location("probe", services_ctl.ROOT / "tools" / "probe.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kafka_cluster_ids_never_start_with_a_dash() -> None:
    """16 bytes whose URL-safe base64 starts with ``-`` (first byte 0xF8 to 0xFB) are drawn
    again; the id that comes back is the next draw's, 22 characters."""
    probe = _probe_module()
    draws = iter([b"\xf8" + bytes(15), b"\x01" * 16])
    cid = probe.kafka_cluster_id(lambda: next(draws))  # type: ignore[attr-defined]
    assert cid == "AQEBAQEBAQEBAQEBAQEBAQ" and len(cid) == 22


def test_kafka_storage_format_refuses_a_dash_id_and_takes_ours(
        kafka_bootstrap: str, tmp_path: Path) -> None:
    """Why the redraw exists, shown with Kafka's own StorageTool (the one
    ``scripts/services`` formats with): ``-t -…`` is refused as a missing argument —
    a cold services start failed that way — and a probe id formats the log dir."""
    cache = Path(os.environ.get("PQCNET_CACHE", Path.home() / ".cache" / "pqcnet"))
    libs = sorted(cache.glob("kafka-*/libs"))
    assert libs, f"Kafka is running ({kafka_bootstrap}) but no kafka-*/libs under {cache}"
    conf = tmp_path / "server.properties"
    conf.write_text("process.roles=broker,controller\nnode.id=1\n"
                    "controller.quorum.voters=1@127.0.0.1:1\n"
                    "listeners=PLAINTEXT://127.0.0.1:0,CONTROLLER://127.0.0.1:1\n"
                    "controller.listener.names=CONTROLLER\n"
                    f"log.dirs={tmp_path / 'data'}\n")

    def fmt(cid: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["java", "-cp", f"{libs[-1]}/*", "kafka.tools.StorageTool",
                               "format", "--ignore-formatted", "-t", cid, "-c", str(conf)],
                              capture_output=True, text=True, timeout=120, check=False)

    bad = fmt("-" + "A" * 21)
    assert bad.returncode != 0 and "expected one argument" in bad.stderr, bad.stderr[-500:]
    cid = _run_probe("kafka-id")
    good = fmt(cid)
    assert good.returncode == 0, good.stdout[-500:] + good.stderr[-500:]
    assert f"cluster.id={cid}" in (tmp_path / "data" / "meta.properties").read_text()


def _run_probe(*args: str) -> str:
    out = subprocess.run([*PROBE, *args], capture_output=True, text=True, timeout=30,
                         check=True)
    return out.stdout.strip()
