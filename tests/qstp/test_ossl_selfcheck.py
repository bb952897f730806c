"""The OpenSSL self-check child and the fallbacks when it fails.

``SSL_key_update`` and ``SSL_CTX_set_num_tickets`` are called through pointers computed
from an ELF symbol table; a child process (``python -m pqcnet.qstp._selfcheck``) makes
those calls first. Here: the real child passes on this machine; a child that aborts,
hangs, fails or disagrees disables both features with one log line; and with them
disabled, tunnels still rotate keys by GOAWAY + reconnect and servers send OpenSSL's
default tickets. The failure is forced with ``PQCNET_OSSL_SELF_CHECK_FAULT`` (read by
the child only) or an injected child command.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY

from pqcnet import qstp
from pqcnet.crypto.errors import CryptoError
from pqcnet.qstp import _ossl, _selfcheck
from pqcnet.qstp import events as ev
from pqcnet.qstp.aio import Tunnel
from pqcnet.qstp.config import QstpConfiguration
from pqcnet.qstp.connection import REKEY_BY_RECONNECT
from pqcnet.qstp.tls import TICKETS_PER_HANDSHAKE, TlsPolicy, build_context, new_connection

from .qstputil import make_mesh, running_server
from .test_connection import drain, open_pair, pump

pytestmark = pytest.mark.timeout(120)

FAULT = _selfcheck.FAULT_ENV


def _feature(name: str) -> float | None:
    return REGISTRY.get_sample_value("pqcnet_qstp_openssl_feature_enabled", {"feature": name})


@pytest.fixture
def crippled(monkeypatch: pytest.MonkeyPatch,
             caplog: pytest.LogCaptureFixture) -> Iterator[_ossl.Capabilities]:
    """This process as if its self-check child had died: forget the verdict, make the
    child abort, and let the next use run the real parent path."""
    previous = _ossl.override_capabilities(None)
    monkeypatch.setenv(FAULT, "abort")
    try:
        with caplog.at_level(logging.INFO, logger="pqcnet.qstp._ossl"):
            caps = _ossl.capabilities()
        yield caps
    finally:
        _ossl.override_capabilities(previous)


# ---------------------------------------------------------------------------- happy path


def test_the_real_child_enables_both_features_here() -> None:
    caps = _ossl.run_self_check()
    assert caps == _ossl.Capabilities(True, True, "self-check", "ok")


def test_this_process_took_its_verdict_from_a_child() -> None:
    caps = _ossl.capabilities()
    assert caps.ok and caps.source == "self-check"
    assert _feature("key_update") == 1.0 and _feature("num_tickets") == 1.0


def test_the_child_compares_the_same_binary() -> None:
    out = subprocess.run([sys.executable, "-m", _ossl.SELF_CHECK_MODULE], capture_output=True,
                         timeout=60, check=True)
    report = json.loads(out.stdout)
    assert report == {**_ossl.symbol_report(), "key_update": True, "num_tickets": True,
                      "detail": "ok"}


# ---------------------------------------------------------------------------- failures


def test_a_child_killed_by_a_signal_disables_both(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULT, "abort")
    caps = _ossl.run_self_check()
    assert not caps.key_update and not caps.num_tickets
    assert caps.detail == "self-check child killed by SIGABRT"


def test_a_hanging_child_is_killed_at_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULT, "hang")
    caps = _ossl.run_self_check(timeout=3.0)
    assert not caps.key_update and not caps.num_tickets
    assert caps.detail == "self-check child timed out after 3s"


@pytest.mark.parametrize(("code", "detail"), [
    ("import sys; sys.exit('boom: no OpenSSL here')",
     "self-check child exited 1: boom: no OpenSSL here"),
    ("print('hello')", "self-check child printed no verdict: hello"),
    ("import json; print(json.dumps({'module': '/elsewhere/_rust.so', 'offsets': {}, "
     "'key_update': True, 'num_tickets': True}))",
     "self-check child resolved another binary: /elsewhere/_rust.so"),
])
def test_a_child_that_fails_or_disagrees_disables_both(code: str, detail: str) -> None:
    caps = _ossl.run_self_check(command=[sys.executable, "-c", code])
    assert caps == _ossl.Capabilities(False, False, "self-check", detail)


def test_a_child_that_cannot_start_disables_both() -> None:
    caps = _ossl.run_self_check(command=["/nonexistent/python"])
    assert not caps.ok and caps.detail.startswith("cannot start the self-check child")


def test_unresolvable_symbols_disable_both_without_a_child(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_ossl, "_resolved", ("/stripped/_rust.so", {}, {}))
    caps = _ossl.run_self_check(command=["/nonexistent/python"])  # never started
    assert caps == _ossl.Capabilities(False, False, "unresolved",
                                      "symbols not resolvable in /stripped/_rust.so")


def test_failure_is_one_clear_log_line_and_a_metric(
        crippled: _ossl.Capabilities, caplog: pytest.LogCaptureFixture) -> None:
    assert crippled == _ossl.Capabilities(False, False, "self-check",
                                          "self-check child killed by SIGABRT")
    def lines() -> list[logging.LogRecord]:  # the check ran in the fixture (setup)
        return [r for r in caplog.get_records("setup") + caplog.records
                if r.name == "pqcnet.qstp._ossl"]

    assert len(lines()) == 1 and lines()[0].levelno == logging.WARNING
    msg = lines()[0].getMessage()
    assert msg == ("OpenSSL self-check: TLS KeyUpdate and SSL_CTX_set_num_tickets disabled "
                   "(self-check child killed by SIGABRT); rekey by GOAWAY + reconnect, "
                   "OpenSSL's default ticket count")
    assert _feature("key_update") == 0.0 and _feature("num_tickets") == 0.0
    assert _ossl.capabilities() is crippled  # cached: no second child, no second line
    assert len(lines()) == 1


def test_a_whole_process_falls_back_when_its_child_aborts() -> None:
    """Not this test process: a fresh one, whose first TLS context triggers the check."""
    code = ("import json\n"
            "from pqcnet.identity import dev_identities\n"
            "from pqcnet.qstp import _ossl\n"
            "from pqcnet.qstp.tls import TlsPolicy, build_context\n"
            "_, (s,) = dev_identities('t.test', 'spiffe://t.test/a/relayer/r')\n"
            "build_context(s, TlsPolicy(), server=True)\n"
            "c = _ossl.capabilities()\n"
            "print(json.dumps([c.key_update, c.num_tickets, c.detail]))\n")
    env = {**_ossl._child_env(), FAULT: "abort"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60,
                         env=env, check=True, text=True)
    assert json.loads(out.stdout) == [False, False, "self-check child killed by SIGABRT"]
    assert out.stderr.count("OpenSSL self-check") == 1, out.stderr
    assert "Traceback" not in out.stderr


# ---------------------------------------------------------------------------- fallbacks


def test_disabled_tickets_leave_openssls_default(crippled: _ossl.Capabilities) -> None:
    mesh = make_mesh()
    server = new_connection(build_context(mesh.server, TlsPolicy(), server=True), server=True)
    client = new_connection(build_context(mesh.client, TlsPolicy(), server=False),
                            server=False)
    assert _selfcheck._handshake(client, server) == 2 != TICKETS_PER_HANDSHAKE


def test_disabled_key_update_rekeys_by_goaway(crippled: _ossl.Capabilities) -> None:
    # the default configuration (tls_key_update=True): only the self-check says no
    cfg = QstpConfiguration(rekey_after_bytes=100_000, rekey_interval=0, keepalive=False)
    c, s = open_pair(cfg)
    assert not c.key_update_available and not s.key_update_available
    with pytest.raises(CryptoError, match="reconnect"):
        c.rekey(0.0)
    sid = c.open_stream()
    c.send_data(sid, b"a" * 60_000)
    pump(c, s)
    drain(s)
    c.send_data(sid, b"b" * 50_000)  # crosses the rekey point
    assert c.rekey_overdue and c.key_updates == 0
    pump(c, s)
    events = drain(s)
    goaways = [e for e in events if isinstance(e, ev.GoAwayReceived)]
    assert len(goaways) == 1 and goaways[0].reason == REKEY_BY_RECONNECT
    assert b"".join(e.data for e in events if isinstance(e, ev.DataReceived)) == b"b" * 50_000


async def test_over_sockets_a_reconnect_brings_fresh_keys(
        crippled: _ossl.Capabilities) -> None:
    """The application's answer to the rekey GOAWAY is a new tunnel: new handshake,
    new keys (a different channel binding), and traffic goes on."""
    mesh = make_mesh()
    cfg = QstpConfiguration(rekey_after_bytes=200_000, rekey_interval=0)
    received: list[int] = []
    both = asyncio.Event()

    async def sink(tunnel: Tunnel) -> None:
        async for stream in tunnel:
            received.append(len(await stream.read_all(1 << 20)))
            if len(received) == 2:
                both.set()

    async with running_server(mesh, sink, config=cfg) as server:
        first = await qstp.connect("127.0.0.1", server.port, mesh.client, config=cfg)
        stream = first.open_stream()
        await stream.send(b"x" * 250_000, end=True)  # past the rekey point: GOAWAY
        assert first.connection.rekey_overdue and first.key_updates == 0
        binding = first.channel_binding()
        second = await qstp.connect("127.0.0.1", server.port, mesh.client, config=cfg)
        assert second.channel_binding() != binding
        s2 = second.open_stream()
        await s2.send(b"y" * 1000, end=True)
        async with asyncio.timeout(10):
            await both.wait()
        assert sorted(received) == [1000, 250_000]
        await first.close()
        await second.close()


def test_a_partial_verdict_disables_only_that_feature(
        caplog: pytest.LogCaptureFixture) -> None:
    report = {**_ossl.symbol_report(), "key_update": True, "num_tickets": False,
              "detail": "server sent 2 tickets, expected 1"}
    code = f"import json; print(json.dumps({report!r}))"
    caps = _ossl.run_self_check(command=[sys.executable, "-c", code])
    assert caps == _ossl.Capabilities(True, False, "self-check",
                                      "server sent 2 tickets, expected 1")
    previous = _ossl.override_capabilities(None)
    try:
        with caplog.at_level(logging.INFO, logger="pqcnet.qstp._ossl"):
            _ossl._install(caps, announce=True)
        assert _ossl.key_update_supported()
        (line,) = [r.getMessage() for r in caplog.records if r.name == "pqcnet.qstp._ossl"]
        assert line == ("OpenSSL self-check: SSL_CTX_set_num_tickets disabled (server sent 2 "
                        "tickets, expected 1); OpenSSL's default ticket count")
    finally:
        _ossl.override_capabilities(previous)
