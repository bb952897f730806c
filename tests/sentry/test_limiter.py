"""Token buckets and the concurrency gate, driven by an explicit clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pqcnet.sentry.errors import RateLimited, SentryConfigError
from pqcnet.sentry.limiter import ConcurrencyGate, Plan, RateLimiter


def test_burst_then_rate() -> None:
    lim = RateLimiter({"acme": Plan(rate=10, burst=5, tenant_rate=100, tenant_burst=50)},
                      Plan(rate=1, burst=1))
    for _ in range(5):
        lim.check("acme", "alice", 0.0)
    with pytest.raises(RateLimited) as info:
        lim.check("acme", "alice", 0.0)
    assert info.value.retry_after == pytest.approx(0.1)
    lim.check("acme", "alice", 0.1)
    # another client has its own bucket (the tenant's is larger); another tenant gets
    # the default plan
    lim.check("acme", "bob", 0.1)
    lim.check("globex", "carol", 0.1)
    with pytest.raises(RateLimited):
        lim.check("globex", "carol", 0.1)


@given(st.floats(1, 1000), st.integers(1, 50), st.lists(st.floats(0, 0.05), max_size=300))
def test_never_more_than_rate_times_time_plus_burst(rate: float, burst: int,
                                                    gaps: list[float]) -> None:
    lim = RateLimiter({}, Plan(rate=rate, burst=burst))
    now = 0.0
    accepted = 0
    for gap in gaps:
        now += gap
        try:
            lim.check("t", "c", now)
            accepted += 1
        except RateLimited as exc:
            assert exc.retry_after > 0
    assert accepted <= rate * now + burst + 1e-6


def test_hot_reload_keeps_level_and_applies_new_rate() -> None:
    lim = RateLimiter({}, Plan(rate=1, burst=10))
    for _ in range(10):
        lim.check("t", "c", 0.0)
    lim.set_plans({"t": Plan(rate=100, burst=2)}, Plan(rate=1, burst=10), 0.0)
    with pytest.raises(RateLimited):
        lim.check("t", "c", 0.0)  # level kept (0), not reset to a full bucket
    lim.check("t", "c", 0.01)  # new rate: 1 token per 10 ms
    assert lim.level("t", "c", 10.0) == 2  # clamped to the new burst


def test_bucket_table_is_bounded() -> None:
    lim = RateLimiter({}, Plan(rate=1, burst=1, tenant_burst=100), max_clients=4)
    for i in range(10):
        lim.check("t", f"c{i}", 0.0)
    assert len(list(lim.levels(0.0))) == 4


def test_gate() -> None:
    gate = ConcurrencyGate(2)
    gate.acquire()
    gate.acquire()
    with pytest.raises(RateLimited):
        gate.acquire()
    gate.release()
    gate.acquire()
    assert gate.peak == 2
    gate.set_limit(1)
    gate.release()
    with pytest.raises(RateLimited):
        gate.acquire()
    with pytest.raises(SentryConfigError):
        ConcurrencyGate(0)
    with pytest.raises(SentryConfigError):
        Plan(rate=0, burst=1)


def test_minting_subjects_does_not_multiply_the_tenant_rate() -> None:
    """The earlier evasion: two (or ten) subjects each got the plan's rate. Driven for
    100 simulated seconds at 4x the plan, the tenant is held to the plan rate +-10 %."""
    rate, burst, seconds = 10.0, 5.0, 100.0
    for subjects in (1, 2, 10):
        lim = RateLimiter({"acme": Plan(rate=rate, burst=burst)}, Plan(rate=1, burst=1))
        accepted = refused = 0
        step = 1 / (4 * rate)
        now = 0.0
        while now < seconds:
            for i in range(subjects):
                try:
                    lim.check("acme", f"subject-{i}", now, tunnel=f"spiffe://td/acme/sidecar/{i}")
                    accepted += 1
                except RateLimited as exc:
                    refused += 1
                    assert "tenant-wide" in str(exc) or "per-client" in str(exc)
            now += step
        allowed = rate * seconds + burst
        assert 0.9 * allowed <= accepted <= 1.1 * allowed, (subjects, accepted, allowed)
        assert refused > 0


def test_tenant_and_tunnel_buckets_and_a_refusal_takes_nothing() -> None:
    plan = Plan(rate=100, burst=100, tenant_rate=10, tenant_burst=4, tunnel_rate=10,
                tunnel_burst=2)
    lim = RateLimiter({"acme": plan}, Plan(rate=1, burst=1))
    lim.check("acme", "a", 0.0, tunnel="t1")
    lim.check("acme", "b", 0.0, tunnel="t1")
    with pytest.raises(RateLimited, match="per-tunnel"):  # t1 used its 2
        lim.check("acme", "c", 0.0, tunnel="t1")
    assert lim.level("acme", "c", 0.0) == 100  # the refused request took no subject token
    lim.check("acme", "c", 0.0, tunnel="t2")
    lim.check("acme", "d", 0.0, tunnel="t3")
    with pytest.raises(RateLimited, match="tenant-wide"):  # the tenant used its 4
        lim.check("acme", "e", 0.0, tunnel="t4")
    lim.check("globex", "x", 0.0)  # another tenant is unaffected
    with pytest.raises(SentryConfigError):
        Plan(rate=1, burst=1, tenant_rate=0)
