"""Governance directives applied by a real sentry, relayer and QSTP server.

The same scenario (:mod:`.scenario`) runs on the embedded in-process control plane
(always) and over the real go-waku nodes from ``scripts/services`` (``services``).
"""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import pytest

from pqcnet.mesh.transport import InProcessHub, InProcessTransport
from pqcnet.mesh.waku import WakuTransport

from ..mesh.harness import FAST
from .scenario import directive_effects

pytestmark = pytest.mark.timeout(120)


async def test_directives_take_effect_in_process(tmp_path: Path) -> None:
    hub = InProcessHub()
    await directive_effects([InProcessTransport(hub) for _ in range(4)], tmp_path,
                            config=FAST)


@pytest.mark.services
async def test_directives_take_effect_over_go_waku(waku_rest_urls: list[str],
                                                   tmp_path: Path) -> None:
    cfg = dataclasses.replace(FAST, namespace="g" + uuid.uuid4().hex[:10],
                              announce_interval_ms=300, peer_expiry_ms=3000)
    transports = [WakuTransport.connect(waku_rest_urls[i % len(waku_rest_urls)],
                                        timeout_s=3.0, retries=2, poll_interval_s=0.03)
                  for i in range(4)]
    await directive_effects(list(transports), tmp_path, config=cfg, limit_s=40)
