"""Issue 12 §4: minting subjects no longer multiplies a tenant's rate.

Before: each (tenant, subject) had its own bucket, so a sidecar holding the tenant's
issuer key could mint ``bob`` next to ``alice`` and get twice the plan. Now a
tenant-wide bucket sits above the per-subject ones. Real sentry, real sidecars and
tunnels; the test counts answers (200 vs 429), never timing: the bound is the plan's
burst plus rate x elapsed, +10 %.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import pytest

from pqcnet.errors import PqcnetError
from pqcnet.sentry.sidecar import Sidecar
from pqcnet.sentry.wire import RequestHead

from .conftest import Env

pytestmark = pytest.mark.timeout(90)
RATE, BURST, PER_SUBJECT = 1.0, 20.0, 30
STATUS = RequestHead("http", "GET", "/status")


@pytest.fixture
def stack_options() -> dict[str, Any]:
    return {"rate": RATE, "burst": BURST}


async def _status(sidecar: Sidecar) -> int:
    head, stream, _rest = await sidecar.call(STATUS, b"")
    with contextlib.suppress(PqcnetError):
        await stream.read_all(1 << 20)
    return head.status


async def test_two_subjects_are_held_to_the_tenant_rate(env: Env) -> None:
    alice = env.stack.sidecar(env.mesh.acme, env.mesh.acme_issuer, subject="alice")
    bob = env.stack.sidecar(env.mesh.acme, env.mesh.acme_issuer, subject="bob")
    try:
        start = time.monotonic()
        answers = []
        for _ in range(PER_SUBJECT):  # interleaved: each subject alone stays under burst
            answers.append(await _status(alice))
            answers.append(await _status(bob))
        elapsed = time.monotonic() - start
    finally:
        await alice.aclose()
        await bob.aclose()
    assert set(answers) <= {200, 429}, answers
    ok = answers.count(200)
    tenant_allows = BURST + RATE * elapsed
    # with per-subject buckets only, both subjects would have had BURST each (40+)
    assert 0.9 * BURST <= ok <= 1.1 * tenant_allows, (ok, tenant_allows, elapsed)
    assert answers.count(429) >= 2 * PER_SUBJECT - 1.1 * tenant_allows
