"""The simulator against real go-waku nodes: same workload, delivery side by side.

Needs ``scripts/services start waku`` (3 go-waku nodes). Asserts delivery agrees and
both runs measured something; prints the latency table (timings are not asserted: the
real run is dominated by REST polling the model does not contain).
"""

from __future__ import annotations

import pytest

from pqcnet.sim.waku_check import measure_waku, side_by_side, simulate

pytestmark = [pytest.mark.services, pytest.mark.timeout(120)]


async def test_simulated_and_measured_delivery_agree(waku_rest_urls: list[str]) -> None:
    measured = await measure_waku(waku_rest_urls, count=10, interval_s=0.3)
    simulated = simulate(len(waku_rest_urls), count=10, interval_s=0.3)
    print("\n" + side_by_side(measured, simulated))
    assert measured["expected"] == simulated["expected"] > 0
    assert simulated["delivery"] == 1.0
    assert measured["delivery"] == simulated["delivery"]
    assert 0 < simulated["latency_ms"]["mean"] < measured["latency_ms"]["mean"]
