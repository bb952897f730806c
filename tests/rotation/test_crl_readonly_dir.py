"""A CRL fetched from the CA service reaches a node whose identity directory is
read-only (a mounted Kubernetes Secret, a compose ``:ro`` bind): it is applied in
memory. Writing it there used to raise ``OSError`` out of the manager's tick, which
ended its loop — no CRL, renewal or reload for the rest of the run.

Real parts: the CA service (``/v1/revoke``, ``/v1/crl`` over PQ TLS) and a directory
the filesystem refuses to write (``chattr +i`` as root, mode 0555 otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pqcnet.identity.crl import load_crl
from pqcnet.runtime import enroll as client
from pqcnet.runtime.rotation import IdentityManager, RotationConfig
from tests.ca.conftest import TD, start_service

pytestmark = pytest.mark.timeout(120)


@contextlib.contextmanager
def _read_only(directory: Path) -> Iterator[None]:
    """Make ``directory`` unwritable even for root; proven, not assumed."""
    root = os.geteuid() == 0
    if root:
        subprocess.run(["chattr", "+i", str(directory)], check=True)
    else:
        directory.chmod(0o555)
    try:
        with pytest.raises(OSError):
            (directory / "probe").write_bytes(b"x")
        yield
    finally:
        if root:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
        else:
            directory.chmod(0o755)


async def test_crl_applies_in_memory_when_the_directory_is_read_only(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    svc = await start_service(tmp_path / "ca")
    try:
        node = svc.ca.issue(f"spiffe://{TD}/acme/relayer/r1")
        peer = svc.ca.issue(f"spiffe://{TD}/acme/publisher/p1")
        other = svc.ca.issue(f"spiffe://{TD}/acme/publisher/p2")
        admin = svc.ca.issue(f"spiffe://{TD}/ops/admin/a1")
        directory = tmp_path / "id"
        node.save(directory, None)
        on_disk = (directory / "crl.pem").read_bytes()
        manager = IdentityManager(directory, lambda: node, lambda _i: None, initial=node,
                                  config=RotationConfig(poll_s=0.5, crl_url=svc.url,
                                                        crl_refresh_s=0.5, rotate_key=False))
        await client.revoke(svc.url, admin, serial=peer.serial, reason="key_compromise")
        with _read_only(directory):
            await manager.tick()  # raised PermissionError before
            held = manager.identity.crl_pem
            assert held is not None
            assert load_crl(held, node.trust_bundle_pem).is_revoked(peer.serial)
            assert manager.reloads == 1
            assert (directory / "crl.pem").read_bytes() == on_disk  # untouched
            # the next CRL is taken too, and the read-only directory is said only once
            await client.revoke(svc.url, admin, serial=other.serial, reason="superseded")
            await asyncio.sleep(0.6)  # crl_refresh_s
            await manager.tick()
            held = manager.identity.crl_pem
            assert held is not None
            assert load_crl(held, node.trust_bundle_pem).is_revoked(other.serial)
            assert manager.reloads == 2
        warned = [r for r in caplog.records
                  if r.levelno == logging.WARNING and "in memory only" in r.getMessage()]
        assert len(warned) == 1, warned
    finally:
        await svc.service.close()
        svc.ledger.close()
