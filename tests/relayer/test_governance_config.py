"""Governance gRPC (GetVolume, WatchVolume, GetPerformanceReport, TLS with a classical
certificate, loopback-only plaintext), config validation, and the CLI commands end
to end against a relayer subprocess."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import ValidationError

from pqcnet.crypto.pqc import SigningKey
from pqcnet.proto import relayer_pb2 as pb
from pqcnet.proto import relayer_pb2_grpc as pb_grpc
from pqcnet.relayer.config import RelayerConfig
from pqcnet.relayer.errors import ConfigError, GovernanceError
from pqcnet.relayer.frame import Frame
from pqcnet.relayer.governance import (
    VolumeFilter,
    VolumeMetricsService,
    pull_volume,
    serve_governance,
)
from pqcnet.relayer.metering import VolumeMeter
from pqcnet.relayer.proof import PerformanceReport, sign_report
from tests.relayer.e2e import identities
from tests.relayer.proc import RelayerProcess, write_config

pytestmark = pytest.mark.timeout(120)


def _service(meter: VolumeMeter) -> VolumeMetricsService:
    key = SigningKey.generate()
    return VolumeMetricsService(
        meter, lambda a, b: sign_report(PerformanceReport("r", a, b or a, (), (), 1.0), key))


async def test_get_and_watch_volume() -> None:
    meter = VolumeMeter(60.0)
    server, port = await serve_governance(_service(meter), "127.0.0.1", 0)
    try:
        meter.record(0, [Frame("a", "x", 1, b"123"), Frame("b", "y", 1, b"1")])
        got = await pull_volume(f"127.0.0.1:{port}", VolumeFilter(customer="a"))
        assert (got.total_bytes, got.total_frames) == (3, 1)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.VolumeMetricsStub(ch)  # type: ignore[no-untyped-call]
            call = stub.WatchVolume(pb.VolumeQuery(customer="a"))
            first = await asyncio.wait_for(call.read(), 10)
            assert (first.customer, first.bytes, first.frames) == ("a", 3, 1)
            meter.record(0, [Frame("a", "x", 2, b"4567"), Frame("b", "y", 2, b"zz")])
            update = await asyncio.wait_for(call.read(), 10)  # only "a" changes are sent
            assert (update.customer, update.bytes, update.frames) == ("a", 7, 2)
            call.cancel()
            report = await stub.GetPerformanceReport(pb.ReportQuery(epoch_from=5))
            assert report.relayer_id == "r" and report.epoch_from == 5 and report.signature
    finally:
        await server.stop(0)


def _classical_cert(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cp, kp = tmp / "grpc.crt", tmp / "grpc.key"
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    return cp, kp


async def test_tls_with_classical_cert_and_plaintext_only_on_loopback(tmp_path: Path) -> None:
    cert, key = _classical_cert(tmp_path)
    meter = VolumeMeter(60.0)
    meter.record(0, [Frame("a", "x", 1, b"abc")])
    server, port = await serve_governance(_service(meter), "127.0.0.1", 0,
                                          tls=(key.read_bytes(), cert.read_bytes()))
    try:
        got = await pull_volume(f"localhost:{port}", VolumeFilter(), ca_cert=str(cert))
        assert got.total_bytes == 3
        with pytest.raises(GovernanceError, match="UNAVAILABLE"):  # plaintext client refused
            await pull_volume(f"localhost:{port}", VolumeFilter(), deadline=3)
    finally:
        await server.stop(0)
    with pytest.raises(ConfigError, match="loopback"):
        await serve_governance(_service(meter), "0.0.0.0", 0)


def test_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^relayer\.bogus: unknown key$"):
        RelayerConfig.from_mapping({"relayer": {"bogus": 1}})
    with pytest.raises(ConfigError, match=r"^redis_url: required for backend redis$"):
        RelayerConfig.from_mapping({"backend": "redis"})
    with pytest.raises(ConfigError, match="low_water"):
        RelayerConfig.from_mapping({"high_water": 10, "low_water": 10})
    with pytest.raises(ConfigError, match="owned_shards"):
        RelayerConfig.from_mapping({"shards": 4, "owned_shards": [4]})
    with pytest.raises(ValidationError):  # in code, a mistake is pydantic's own error
        RelayerConfig(backend="redis")
    with pytest.raises(ConfigError, match="owned_shards"):  # replace() validates again
        RelayerConfig(shards=4).replace(owned_shards=(4,))
    bad = tmp_path / "bad.yaml"
    bad.write_text("relayer: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        RelayerConfig.load(bad)
    good = tmp_path / "good.yaml"
    good.write_text("relayer:\n  data_dir: d\n  owned_shards: [1, 2]\n")
    cfg = RelayerConfig.load(good)
    assert cfg.data_dir == str(tmp_path / "d") and cfg.shards_owned == [1, 2]
    example = Path(__file__).resolve().parents[2] / "examples" / "relayer.yaml"
    assert RelayerConfig.load(example).shards == 32


def _pqcnet(*args: str) -> subprocess.CompletedProcess[str]:
    exe = str(Path(sys.executable).parent / "pqcnet")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60, check=False)


async def test_cli_publish_subscribe_governance_pull(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, grpc_port=0, metrics_port=0)
    proc = await RelayerProcess(cfg).start()
    try:
        pub_dir, sub_dir = tmp_path / "pub", tmp_path / "sub"
        identities()[1].save(pub_dir, None)
        identities()[2].save(sub_dir, None)
        target = f"127.0.0.1:{proc.port}"
        sub = asyncio.create_task(asyncio.to_thread(
            _pqcnet, "subscribe", "--relayer", target, "--identity", str(sub_dir),
            "--customer", "acme", "--count", "30", "--timeout", "50"))
        await asyncio.sleep(1.0)
        out = await asyncio.to_thread(
            _pqcnet, "publish", "--relayer", target, "--identity", str(pub_dir),
            "--customer", "acme", "--channel", "c1", "--count", "30", "--size", "10")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout.splitlines()[-1])["accepted"] == 30
        res = await sub
        lines = [json.loads(x) for x in res.stdout.splitlines()]
        assert [x["seq"] for x in lines[:-1]] == list(range(1, 31))
        assert lines[-1] == {"frames": 30, "bytes": 300, "duplicates_dropped": 0,
                             "reconnects": 0}
        pull = await asyncio.to_thread(
            _pqcnet, "governance", "pull", "--target", f"127.0.0.1:{proc.ready['grpc_port']}")
        assert pull.returncode == 0, pull.stderr
        assert json.loads(pull.stdout)["total_frames"] == 30
        bad = await asyncio.to_thread(
            _pqcnet, "publish", "--relayer", target, "--identity", str(pub_dir),
            "--customer", "acme", "--channel", "c1", "--message", "x" * 10, "--qos", "1")
        # seq 1 again, not a retry: the topic moved past it -> LateFrame before any ack
        # (decision 0012); the summary names the next seq
        assert bad.returncode == 1
        assert "code 15" in bad.stdout and "next seq is 31" in bad.stdout, bad.stdout
        refused = await asyncio.to_thread(
            _pqcnet, "governance", "pull", "--target", "127.0.0.1:1")
        assert refused.returncode == 1 and refused.stderr.startswith("error: GetVolume")
    finally:
        await proc.stop()
