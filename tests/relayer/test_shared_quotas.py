"""Per-customer quotas in the workers' shared segment (``relayer run --workers N``):
two :class:`SharedQuotas` attached to one segment are one frames bucket and one bytes
bucket per customer; a take is all or nothing over both; a reload's new rate applies
at the next take. (The process-level test is in test_cluster_workers.py.)"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pqcnet._util.shmlimits import SharedLimitState
from pqcnet.relayer.authz import QuotasSpec, SharedQuotas
from pqcnet.relayer.errors import QuotaExceeded


@pytest.fixture
def segment() -> Iterator[tuple[SharedLimitState, SharedLimitState]]:
    owner = SharedLimitState.create(workers=2, slots=64, prefix="pqcnet-test-quotas-")
    other = SharedLimitState.attach(owner.path)
    yield owner, other
    other.close()
    owner.close()


def test_two_workers_share_one_bucket_per_customer(
        segment: tuple[SharedLimitState, SharedLimitState]) -> None:
    spec = QuotasSpec.model_validate({"customers": {"acme": {
        "frames_per_s": 10, "frames_burst": 10, "bytes_per_s": 100, "bytes_burst": 100}}})
    a, b = SharedQuotas(segment[0], spec), SharedQuotas(segment[1], spec)
    for _ in range(5):
        a.take("acme", 1, 1, now=100.0)
        b.take("acme", 1, 1, now=100.0)
    with pytest.raises(QuotaExceeded, match="10 frames/s") as exc:
        b.take("acme", 1, 1, now=100.0)  # 10 taken between the two: the bucket is empty
    assert exc.value.retriable and 0 < exc.value.retry_after <= 0.1
    assert (a.refused, b.refused) == (0, 1)
    # 0.5 s later 5 frames are back, but 141 bytes exceed the bytes burst: all or nothing
    with pytest.raises(QuotaExceeded, match="100 bytes/s"):
        a.take("acme", 1, 141, now=100.5)
    for _ in range(5):
        a.take("acme", 1, 1, now=100.5)  # the refused take took no frame
    b.take("other", 1000, 10**6, now=100.5)  # no quota: never refused
    # a reload (each worker re-reads the config) raises the rate at the next take
    faster = QuotasSpec.model_validate({"customers": {"acme": {"frames_per_s": 1000}}})
    a.reload(faster, now=100.5)
    b.reload(faster, now=100.5)
    b.take("acme", 1, 1, now=100.6)  # +100 frames at 1000/s in 0.1 s
